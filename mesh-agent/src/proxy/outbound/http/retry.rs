//! Retries (VirtualService `retries`): whether a try's outcome is retried,
//! as a pure function of the policy and the outcome, and what a retried
//! request needs (its body kept, a pause between tries).
use super::*;
use crate::{proxy::http::cluster::Outcome, state::traffic::Retries};

/// The largest request body kept in memory so that the request can be retried;
/// larger (or unsized and long) bodies stream and are tried once.
pub(super) const RETRY_BUFFER: usize = 64 * 1024;
/// Pause between tries (Envoy's base interval).
pub(super) const RETRY_BACKOFF: Duration = Duration::from_millis(25);

/// Whether a request body is small enough (or absent) to keep for retries.
pub(super) fn fits_retry_buffer(headers: &HeaderMap, body: &Incoming) -> bool {
    use hyper::body::Body as _;
    if body.is_end_stream() {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_some_and(|n| n <= RETRY_BUFFER)
}

/// What follows try number `try_no` (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Try again (after [`RETRY_BACKOFF`]).
    Retry,
    /// Answer with this try's outcome; `exhausted`: it was retried and still
    /// failed as the policy retries (Envoy's `URX`).
    Answer { exhausted: bool },
}

/// Envoy's retry decision: a try whose outcome the policy's `retryOn` names
/// is tried again while attempts remain.
pub(super) fn after_try(try_no: u32, retries: Option<&Retries>, outcome: &Outcome) -> Next {
    let Some(r) = retries else { return Next::Answer { exhausted: false } };
    let retried = match *outcome {
        Outcome::Status(code) => r.on.status(code),
        Outcome::ConnectFailure => r.on.failure(true),
        Outcome::NoResponse => r.on.failure(false),
    };
    if retried && try_no <= r.attempts {
        return Next::Retry;
    }
    let failed = !matches!(outcome, Outcome::Status(_));
    Next::Answer { exhausted: try_no > 1 && (retried || failed) }
}

#[cfg(test)]
mod tests {
    use super::{Next, Outcome, after_try};
    use crate::state::traffic::{Retries, RetryOn};

    #[test]
    fn retries_what_retry_on_names_while_attempts_remain() {
        let policy = |on: RetryOn| Retries { attempts: 2, per_try_timeout: None, on };
        let five_xx = policy(RetryOn { five_xx: true, ..RetryOn::default() });
        let connect = policy(RetryOn { connect_failure: true, ..RetryOn::default() });
        let codes = policy(RetryOn { status_codes: vec![429], ..RetryOn::default() });
        let answer = |exhausted| Next::Answer { exhausted };
        let cases = [
            ("no policy", None, 1, Outcome::Status(503), answer(false)),
            ("5xx, first try", Some(&five_xx), 1, Outcome::Status(503), Next::Retry),
            ("5xx, last retry", Some(&five_xx), 2, Outcome::Status(503), Next::Retry),
            ("5xx, attempts spent", Some(&five_xx), 3, Outcome::Status(503), answer(true)),
            ("5xx, success after a retry", Some(&five_xx), 2, Outcome::Status(200), answer(false)),
            ("5xx, 404 is an answer", Some(&five_xx), 1, Outcome::Status(404), answer(false)),
            ("5xx covers resets", Some(&five_xx), 1, Outcome::NoResponse, Next::Retry),
            ("connect-failure: refused connection", Some(&connect), 1, Outcome::ConnectFailure, Next::Retry),
            ("connect-failure: not a reset", Some(&connect), 1, Outcome::NoResponse, answer(false)),
            ("connect-failure: failed again", Some(&connect), 3, Outcome::ConnectFailure, answer(true)),
            ("connect-failure: 503 is an answer", Some(&connect), 1, Outcome::Status(503), answer(false)),
            ("retriable-status-codes", Some(&codes), 1, Outcome::Status(429), Next::Retry),
            ("retriable-status-codes: other codes", Some(&codes), 1, Outcome::Status(503), answer(false)),
        ];
        for (name, retries, try_no, outcome, want) in cases {
            assert_eq!(after_try(try_no, retries, &outcome), want, "{name}");
        }
    }
}
