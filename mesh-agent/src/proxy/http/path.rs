//! Request path normalisation before anything looks at the path (Istio's
//! MeshConfig `pathNormalization`, Envoy's `normalize_path`,
//! `merge_slashes` and escaped-slash handling). The path is rewritten in
//! place, so VirtualService matching and the path forwarded upstream always
//! agree: `/public/../admin` is routed, and sent, as `/admin`.
use crate::state::PathNormalization;

/// A path no normalisation can make safe: an encoded NUL (`%00`), which
/// Envoy's path canonicalisation refuses (400).
#[derive(Debug, PartialEq, Eq)]
pub struct Unsafe;

/// The request's path normalised in place as `mode` says (the query is
/// kept); `Err` when the request must be refused (400).
pub(crate) fn apply(req: &mut hyper::Request<hyper::body::Incoming>, mode: PathNormalization) -> Result<(), Unsafe> {
    match normalize(req.uri().path(), mode)? {
        Some(path) => super::headers::set_path(req, &path).map_err(|_| Unsafe),
        None => Ok(()),
    }
}

/// The path (without the query) normalised as `mode` says; `None` when it is
/// already so. The query string is never touched. Every mode but NONE turns
/// `\` into `/` (as Envoy's canonicalisation does, so `/public\..\admin` is
/// `/admin` to routing and policy alike) and refuses `%00`.
pub fn normalize(path: &str, mode: PathNormalization) -> Result<Option<String>, Unsafe> {
    if mode == PathNormalization::None || !path.starts_with('/') {
        return Ok(None);
    }
    // Nearly every path is already normal: answer without allocating.
    let merge = matches!(mode, PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes);
    let maybe_abnormal =
        path.contains('%') || path.contains("/.") || path.contains('\\') || (merge && path.contains("//"));
    if !maybe_abnormal {
        return Ok(None);
    }
    if path.as_bytes().windows(3).any(|w| w == b"%00") {
        return Err(Unsafe);
    }
    let decode_slashes = mode == PathNormalization::DecodeAndMergeSlashes;
    let decoded = percent_normalize(path, decode_slashes).replace('\\', "/");
    let mut out = remove_dot_segments(&decoded);
    if merge {
        out = merge_slashes(&out);
    }
    Ok((out != path).then_some(out))
}

/// RFC 3986 §6.2.2: percent-encoded unreserved characters decoded, other
/// encodings in upper case; `%2F` and `%5C` decoded too when asked.
fn percent_normalize(path: &str, decode_slashes: bool) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (bytes.get(i + 1).and_then(|b| hex(*b)), bytes.get(i + 2).and_then(|b| hex(*b)))
        {
            let c = (h * 16 + l) as u8;
            let unreserved = c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~');
            if unreserved || (decode_slashes && matches!(c, b'/' | b'\\')) {
                out.push(c as char);
            } else {
                out.push_str(&format!("%{c:02X}"));
            }
            i += 3;
            continue;
        }
        // Not UTF-8 safe to index further by bytes: push the whole character.
        let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

/// RFC 3986 §5.2.4: `.` and `..` segments removed (never above the root).
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    for (i, seg) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *seg {
            "." => {
                if last {
                    segments.push("");
                }
            }
            ".." => {
                segments.pop();
                if last {
                    segments.push("");
                }
            }
            s => segments.push(s),
        }
    }
    format!("/{}", segments.join("/"))
}

fn merge_slashes(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalize;
    use crate::state::PathNormalization::{self, *};

    #[test]
    fn normalises_as_istio_defines_each_mode() {
        let cases: [(&str, PathNormalization, &str); 23] = [
            ("/a/b", Base, "/a/b"),
            ("/helloworld/../admin", Base, "/admin"),
            ("/helloworld/%2e%2e/admin", Base, "/admin"),
            ("/helloworld/%2E%2E/admin", Base, "/admin"),
            ("/helloworld/.%2e/admin", Base, "/admin"),
            ("/../../admin", Base, "/admin"),
            ("/a/./b/.", Base, "/a/b/"),
            ("/a/b/..", Base, "/a/"),
            ("/%7Euser/%41bc", Base, "/~user/Abc"),
            ("/a%2fb", Base, "/a%2Fb"),
            ("/a%zz", Base, "/a%zz"),
            ("/caf\u{e9}/%c3%a9", Base, "/caf\u{e9}/%C3%A9"),
            ("//admin", Base, "//admin"),
            ("/helloworld//../admin", Base, "/helloworld/admin"),
            ("//admin", MergeSlashes, "/admin"),
            ("/a///b//", MergeSlashes, "/a/b/"),
            ("/a%2F%2Fb", MergeSlashes, "/a%2F%2Fb"),
            ("/a%2F%2fb", DecodeAndMergeSlashes, "/a/b"),
            ("/a%5Cb", DecodeAndMergeSlashes, "/a/b"),
            // Backslashes are slashes (Envoy's canonicalisation) before dot segments.
            ("/public\\..\\admin", Base, "/admin"),
            ("/a\\b", MergeSlashes, "/a/b"),
            ("/public\\..\\admin", None, "/public\\..\\admin"),
            ("/helloworld/../admin", None, "/helloworld/../admin"),
        ];
        for (path, mode, want) in cases {
            let got = normalize(path, mode).expect("not refused");
            assert_eq!(got.as_deref().unwrap_or(path), want, "{path} {mode:?}");
        }
        for mode in [Base, MergeSlashes, DecodeAndMergeSlashes] {
            assert_eq!(normalize("/admin%00.png", mode), Err(super::Unsafe), "{mode:?}");
        }
    }
}
