//! Tokens already verified: a client's next request with the same token
//! costs a lookup instead of a signature check (50 µs for ES256 here), as
//! Envoy's jwt_authn keeps a cache too. An entry holds until its token
//! expires (`exp` plus the skew), at most [`HOLD`], and only for the key set
//! and the rule's issuer and audiences it was verified with: a reload or a
//! newly fetched key set means fresh checks. Bounded: at most
//! [`MAX_ENTRIES`] tokens of at most [`MAX_TOKEN`] bytes.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use super::{CLOCK_SKEW_SECS, JwtError, Verified, verify};
use crate::state::security::{JwtKey, JwtRule};

pub const MAX_ENTRIES: usize = 1024;
pub const MAX_TOKEN: usize = 4096;
/// How long a token without `exp` (or with a far one) is trusted before it
/// is checked again.
pub const HOLD: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct VerifiedCache(Mutex<HashMap<String, Entry>>);

struct Entry {
    keys: Arc<[JwtKey]>,
    issuer: String,
    audiences: Vec<String>,
    verified: Arc<Verified>,
    until: Instant,
}

impl VerifiedCache {
    /// [`verify`], or its earlier answer for this token under the same rule
    /// and keys.
    pub fn check(&self, token: &str, rule: &JwtRule, keys: &Arc<[JwtKey]>) -> Result<Arc<Verified>, JwtError> {
        let now = Instant::now();
        {
            let entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(e) = entries.get(token)
                && now < e.until
                && Arc::ptr_eq(&e.keys, keys)
                && e.issuer == rule.issuer
                && e.audiences == rule.audiences
            {
                return Ok(e.verified.clone());
            }
        }
        let verified = Arc::new(verify(token, rule, keys)?);
        if token.len() <= MAX_TOKEN {
            let until = now + lifetime(&verified);
            let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if entries.len() >= MAX_ENTRIES {
                // Full: start over (only valid tokens get here).
                entries.clear();
            }
            let entry = Entry {
                keys: keys.clone(),
                issuer: rule.issuer.clone(),
                audiences: rule.audiences.clone(),
                verified: verified.clone(),
                until,
            };
            entries.insert(token.to_owned(), entry);
        }
        Ok(verified)
    }
}

/// How long a verified token may be trusted from now: until `exp` (with
/// the skew verification allowed), at most [`HOLD`].
fn lifetime(v: &Verified) -> Duration {
    let Some(exp) = v.claims.get("exp").and_then(serde_json::Value::as_f64) else { return HOLD };
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let left = exp + CLOCK_SKEW_SECS as f64 - now;
    if left <= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(left.min(HOLD.as_secs_f64())) }
}
