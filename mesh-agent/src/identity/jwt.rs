//! End-user authentication with JWTs, as Istio's `RequestAuthentication`
//! defines it: where a request's tokens are found, and whether each is a
//! valid token of a configured issuer. The signature checks are
//! `jsonwebtoken`'s (ring underneath); what is decided here is which key and
//! algorithm may be used, and which claims must hold.
//!
//! Semantics (Istio's): a request with no token passes (AuthorizationPolicy
//! decides what an unauthenticated request may do); a request with a token
//! that fails any check is refused with 401; the principal of a valid token
//! is `iss/sub`.
use std::{collections::HashSet, sync::Arc};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, jwk};
use serde_json::{Map, Value};

use crate::state::security::{JwtKey, JwtRule};

/// Why a token was refused; the message is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("Jwt is not in the form of Header.Payload.Signature")]
    Malformed,
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwt header alg is not allowed: only RS256/384/512, PS256/384/512, ES256/384 and EdDSA")]
    Algorithm,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    NoKey,
    #[error("Jwt verification fails")]
    Signature,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    Audience,
    #[error("Jwt claim {0} is malformed")]
    Claim(&'static str),
    #[error("too many Jwts in the request")]
    TooMany,
}

impl JwtError {
    /// The message as a static string (what the client is told).
    pub fn text(&self) -> &'static str {
        match self {
            JwtError::Malformed => "Jwt is not in the form of Header.Payload.Signature",
            JwtError::UnknownIssuer => "Jwt issuer is not configured",
            JwtError::Algorithm => "Jwt header alg is not allowed",
            JwtError::NoKey => "Jwks doesn't have key to match kid or alg from Jwt",
            JwtError::Signature => "Jwt verification fails",
            JwtError::Expired => "Jwt is expired",
            JwtError::NotYetValid => "Jwt not yet valid",
            JwtError::Audience => "Audiences in Jwt are not allowed",
            JwtError::Claim(_) => "Jwt verification fails",
            JwtError::TooMany => "too many Jwts in the request",
        }
    }
}

/// A valid token's contents, for policy (`request.auth.*`) and for the
/// headers the rule asks to add.
#[derive(Debug, Clone)]
pub struct Verified {
    /// `iss/sub`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    pub claims: Map<String, Value>,
    /// The token's payload segment, base64url as it came.
    pub payload: String,
}

/// Clock skew allowed on `exp` and `nbf`, as Envoy's default.
pub(crate) const CLOCK_SKEW_SECS: u64 = 60;

const ALLOWED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Parses a JSON Web Key Set (RFC 7517) into the keys a token may be checked
/// with. Symmetric (`oct`) keys and encryption keys are refused: a shared
/// secret in a key set would let anyone who reads the configuration sign.
pub fn parse_jwks(text: &str) -> Result<Arc<[JwtKey]>, String> {
    let set: jwk::JwkSet = serde_json::from_str(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))?;
    if set.keys.is_empty() {
        return Err("the key set has no keys".into());
    }
    let mut keys = Vec::with_capacity(set.keys.len());
    for (i, k) in set.keys.iter().enumerate() {
        let kid = k.common.key_id.clone();
        let named = || format!("keys[{i}]{}", kid.as_deref().map(|k| format!(" (kid {k:?})")).unwrap_or_default());
        if matches!(k.common.public_key_use, Some(jwk::PublicKeyUse::Encryption)) {
            return Err(format!("{}: an encryption key (use: enc)", named()));
        }
        let kty = match &k.algorithm {
            jwk::AlgorithmParameters::RSA(_) => "RSA",
            jwk::AlgorithmParameters::EllipticCurve(p) => match p.curve {
                jwk::EllipticCurve::P256 | jwk::EllipticCurve::P384 => "EC",
                jwk::EllipticCurve::P521 => {
                    return Err(format!("{}: curve P-521 is not supported (P-256, P-384)", named()));
                }
                jwk::EllipticCurve::Ed25519 => {
                    return Err(format!("{}: kty EC with curve Ed25519 (use kty OKP)", named()));
                }
            },
            jwk::AlgorithmParameters::OctetKeyPair(p) if p.curve == jwk::EllipticCurve::Ed25519 => "OKP",
            jwk::AlgorithmParameters::OctetKeyPair(_) => return Err(format!("{}: only Ed25519 OKP keys", named())),
            jwk::AlgorithmParameters::OctetKey(_) => {
                return Err(format!("{}: symmetric (oct) keys are not accepted; publish the public key", named()));
            }
        };
        let alg = match k.common.key_algorithm {
            None => None,
            Some(a) => match key_algorithm(a).filter(|a| ALLOWED.contains(a)) {
                Some(a) => Some(a),
                None => return Err(format!("{}: alg {a:?} is not a signature algorithm accepted here", named())),
            },
        };
        let key = DecodingKey::from_jwk(k).map_err(|e| format!("{}: {e}", named()))?;
        keys.push(JwtKey { kid, alg, kty, key });
    }
    Ok(keys.into())
}

fn key_algorithm(a: jwk::KeyAlgorithm) -> Option<Algorithm> {
    use jwk::KeyAlgorithm as K;
    Some(match a {
        K::RS256 => Algorithm::RS256,
        K::RS384 => Algorithm::RS384,
        K::RS512 => Algorithm::RS512,
        K::PS256 => Algorithm::PS256,
        K::PS384 => Algorithm::PS384,
        K::PS512 => Algorithm::PS512,
        K::ES256 => Algorithm::ES256,
        K::ES384 => Algorithm::ES384,
        K::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

fn kty_of(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::ES256 | Algorithm::ES384 => "EC",
        Algorithm::EdDSA => "OKP",
        _ => "RSA",
    }
}

/// The issuer a token claims, read without checking anything: which rule
/// (and so which keys) to check it with.
pub fn claimed_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    #[derive(serde::Deserialize)]
    struct Iss {
        iss: Option<String>,
    }
    serde_json::from_slice::<Iss>(&bytes).ok()?.iss
}

/// Checks `token` against `rule` with the rule's `keys`: a key that fits the
/// token's `kid` and `alg`, the signature, `iss`, `aud` (when the rule names
/// audiences), `exp` and `nbf` (when present, with a minute's skew).
pub fn verify(token: &str, rule: &JwtRule, keys: &[JwtKey]) -> Result<Verified, JwtError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed);
    };
    let header = jsonwebtoken::decode_header(token).map_err(|_| JwtError::Algorithm)?;
    if !ALLOWED.contains(&header.alg) {
        return Err(JwtError::Algorithm);
    }
    let fits = |k: &&JwtKey| {
        k.kty == kty_of(header.alg)
            && k.alg.is_none_or(|a| a == header.alg)
            && header.kid.as_ref().is_none_or(|kid| k.kid.as_ref() == Some(kid))
    };
    let mut validation = Validation::new(header.alg);
    validation.required_spec_claims = HashSet::new();
    validation.leeway = CLOCK_SKEW_SECS;
    validation.validate_nbf = true;
    // Issuer and audience are checked below, on the claims as they are.
    validation.validate_aud = false;
    let mut result = Err(JwtError::NoKey);
    for key in keys.iter().filter(fits) {
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
            Ok(data) => {
                result = Ok(data.claims);
                break;
            }
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                result = Err(match e.kind() {
                    K::ExpiredSignature => JwtError::Expired,
                    K::ImmatureSignature => JwtError::NotYetValid,
                    K::InvalidAlgorithm => JwtError::Algorithm,
                    K::Json(_) | K::Utf8(_) | K::Base64(_) => JwtError::Malformed,
                    _ => JwtError::Signature,
                });
                // A wrong signature may be another key's: try the next one.
                if result != Err(JwtError::Signature) {
                    break;
                }
            }
        }
    }
    let claims = result?;
    check_claims(&claims, rule)?;
    let string = |k: &str| claims.get(k).and_then(Value::as_str).map(str::to_owned);
    let sub = string("sub").unwrap_or_default();
    let audiences = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => Vec::new(),
    };
    Ok(Verified {
        principal: format!("{}/{sub}", rule.issuer),
        audiences,
        presenter: string("azp"),
        payload: payload.to_owned(),
        claims,
    })
}

/// What `jsonwebtoken` leaves to the caller: claims of the wrong type are
/// refused rather than skipped, the issuer must be the rule's, and the
/// audience one of the rule's (if it names any).
fn check_claims(claims: &Map<String, Value>, rule: &JwtRule) -> Result<(), JwtError> {
    for time in ["exp", "nbf", "iat"] {
        if claims.get(time).is_some_and(|v| !v.is_number()) {
            return Err(JwtError::Claim(time));
        }
    }
    match claims.get("iss") {
        Some(Value::String(iss)) if *iss == rule.issuer => {}
        Some(Value::String(_)) | None => return Err(JwtError::UnknownIssuer),
        Some(_) => return Err(JwtError::Claim("iss")),
    }
    if claims.get("sub").is_some_and(|v| !v.is_string()) {
        return Err(JwtError::Claim("sub"));
    }
    if rule.audiences.is_empty() {
        return Ok(());
    }
    let allowed = |a: &Value| a.as_str().is_some_and(|a| rule.audiences.iter().any(|r| r == a));
    match claims.get("aud") {
        Some(Value::String(_)) if allowed(&claims["aud"]) => Ok(()),
        Some(Value::Array(list)) if list.iter().any(allowed) => Ok(()),
        _ => Err(JwtError::Audience),
    }
}

/// Where a token was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location<'a> {
    /// A header, by its lowercase name.
    Header(&'a str),
    Param(&'a str),
    Cookie(&'a str),
}

/// The outcome of a request's authentication: nothing to check (no token),
/// or the first valid token, the rule it passed, and where it was.
pub struct Authenticated<'r> {
    pub verified: Arc<Verified>,
    pub rule: &'r JwtRule,
    /// Headers the tokens came from, removed before the request goes on
    /// unless the rule says `forwardOriginalToken`.
    pub consumed: Vec<&'r str>,
}

/// A request's tokens refused: why, and the rule that refused (none when no
/// rule is for the token's issuer).
#[derive(Debug)]
pub struct Refused<'r> {
    pub error: JwtError,
    pub rule: Option<&'r JwtRule>,
}

/// More tokens than this in one request are refused unread: each costs a
/// signature check.
pub const MAX_TOKENS: usize = 8;

/// Finds every token the rules look for in the request and checks each with
/// the rule of its issuer (among those that look where it was) and that
/// rule's keys: all must be valid. `Ok(None)`: no token at all.
pub fn authenticate<'r>(
    rules: &[(&'r JwtRule, Arc<[JwtKey]>)],
    headers: &http::HeaderMap,
    query: Option<&str>,
    cache: &cache::VerifiedCache,
) -> Result<Option<Authenticated<'r>>, Refused<'r>> {
    let refused = |error, rule| Refused { error, rule };
    let mut found: Vec<(Location<'r>, String)> = Vec::new();
    for (rule, _) in rules {
        for (at, token) in tokens(rule, headers, query) {
            if found.iter().any(|(l, t)| *l == at && *t == token) {
                continue;
            }
            if found.len() == MAX_TOKENS {
                return Err(refused(JwtError::TooMany, None));
            }
            found.push((at, token));
        }
    }
    let mut first: Option<Authenticated<'r>> = None;
    for (at, token) in &found {
        let issuer = claimed_issuer(token).ok_or(refused(JwtError::Malformed, None))?;
        let (rule, keys) = rules
            .iter()
            .find(|(r, _)| r.issuer == issuer && looks_at(r, at))
            .ok_or(refused(JwtError::UnknownIssuer, None))?;
        let verified = cache.check(token, rule, keys).map_err(|e| refused(e, Some(*rule)))?;
        let header = match at {
            Location::Header(h) if !rule.forward_original_token => Some(*h),
            _ => None,
        };
        match &mut first {
            None => first = Some(Authenticated { verified, rule, consumed: header.into_iter().collect() }),
            Some(a) => a.consumed.extend(header),
        }
    }
    Ok(first)
}

fn uses_defaults(rule: &JwtRule) -> bool {
    rule.from_headers.is_empty() && rule.from_params.is_empty() && rule.from_cookies.is_empty()
}

fn looks_at(rule: &JwtRule, at: &Location<'_>) -> bool {
    match *at {
        Location::Header(h) if uses_defaults(rule) => h == "authorization",
        Location::Param(p) if uses_defaults(rule) => p == "access_token",
        Location::Header(h) => rule.from_headers.iter().any(|f| f.name == h),
        Location::Param(p) => rule.from_params.iter().any(|f| f == p),
        Location::Cookie(c) => rule.from_cookies.iter().any(|f| f == c),
    }
}

/// The tokens `rule` looks for: Istio's defaults (`Authorization: Bearer`,
/// `?access_token=`) unless it names its own places.
fn tokens<'r>(rule: &'r JwtRule, headers: &http::HeaderMap, query: Option<&str>) -> Vec<(Location<'r>, String)> {
    // Past the bound the request is refused anyway: stop collecting there.
    let full = |out: &Vec<(Location<'r>, String)>| out.len() > MAX_TOKENS;
    let mut out = Vec::new();
    let default = [("authorization", "Bearer ")];
    let from_headers: Vec<(&'r str, &'r str)> = if uses_defaults(rule) {
        default.to_vec()
    } else {
        rule.from_headers.iter().map(|h| (h.name.as_str(), h.prefix.as_str())).collect()
    };
    for (name, prefix) in from_headers {
        for v in headers.get_all(name) {
            let Ok(v) = v.to_str() else { continue };
            // A scheme's name is case-insensitive (`bearer` as `Bearer`).
            let token = match v.get(..prefix.len()) {
                Some(p) if p.eq_ignore_ascii_case(prefix) => v[prefix.len()..].trim(),
                _ => continue,
            };
            if !token.is_empty() && !full(&out) {
                out.push((Location::Header(name), token.to_owned()));
            }
        }
    }
    let params: Vec<&'r str> =
        if uses_defaults(rule) { vec!["access_token"] } else { rule.from_params.iter().map(String::as_str).collect() };
    for name in params {
        // Names and values as the application decodes them: a token sent as
        // `?access%5Ftoken=` is the application's `access_token` too.
        let pairs = query.into_iter().flat_map(|q| q.split('&')).filter_map(|kv| kv.split_once('='));
        for (_, v) in pairs.filter(|(k, _)| percent_decode(k) == name) {
            let v = percent_decode(v);
            if !v.is_empty() && !full(&out) {
                out.push((Location::Param(name), v.into_owned()));
            }
        }
    }
    for name in &rule.from_cookies {
        let cookies = headers.get_all(http::header::COOKIE).into_iter().filter_map(|v| v.to_str().ok());
        for pair in cookies.flat_map(|c| c.split(';')) {
            if let Some(v) = pair.trim().strip_prefix(name.as_str()).and_then(|r| r.strip_prefix('='))
                && !v.is_empty()
                && !full(&out)
            {
                out.push((Location::Cookie(name), v.trim_matches('"').to_owned()));
            }
        }
    }
    out
}

/// `%XX` sequences decoded (others kept as they are), as a query string's
/// names and values are to the application.
pub fn percent_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b))) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// A request's path and query for a log line: the values of the query
/// parameters that carry tokens (`names`, compared decoded) replaced by
/// `REDACTED`, so that a log never holds a bearer credential.
pub fn redact_query<'a>(
    path_and_query: &'a str,
    names: &std::collections::BTreeSet<String>,
) -> std::borrow::Cow<'a, str> {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return std::borrow::Cow::Borrowed(path_and_query);
    };
    let secret = |kv: &str| kv.split_once('=').is_some_and(|(k, _)| names.contains(percent_decode(k).as_ref()));
    if !query.split('&').any(secret) {
        return std::borrow::Cow::Borrowed(path_and_query);
    }
    let redacted: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if secret(kv) => format!("{k}=REDACTED"),
            _ => kv.to_owned(),
        })
        .collect();
    std::borrow::Cow::Owned(format!("{path}?{}", redacted.join("&")))
}

pub mod cache;
pub mod jwks;
#[cfg(test)]
pub(crate) mod tests;
