//! Gitaly's v2 authentication token: `v2.<hex HMAC-SHA256(token, ts)>.<ts>`,
//! sent as `authorization: Bearer …` on every call and checked by servers
//! within a clock skew window.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How far a token's timestamp may be from the server's clock (Gitaly's value).
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

fn signature(secret: &str, timestamp: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    mac.update(timestamp.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn unix_seconds(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The token for one call made at `now`.
pub fn v2_token(secret: &str, now: SystemTime) -> String {
    let ts = unix_seconds(now).to_string();
    format!("v2.{}.{}", signature(secret, &ts), ts)
}

/// Why a server refused a token; maps to `UNAUTHENTICATED` except
/// `WrongVersion`, which Gitaly answers with `PERMISSION_DENIED`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required")]
    Missing,
    #[error("malformed authorization header")]
    Malformed,
    #[error("unsupported token version")]
    WrongVersion,
    #[error("token timestamp is outside the accepted window")]
    Stale,
    #[error("invalid token signature")]
    BadSignature,
}

/// Checks an `authorization` header value against the node's token.
pub fn verify(header: Option<&str>, secret: &str, now: SystemTime) -> Result<(), AuthError> {
    let header = header.ok_or(AuthError::Missing)?;
    let token = header.strip_prefix("Bearer ").ok_or(AuthError::Malformed)?;
    let mut parts = token.splitn(3, '.');
    let (version, sig, ts) = match (parts.next(), parts.next(), parts.next()) {
        (Some(v), Some(s), Some(t)) => (v, s, t),
        _ => return Err(AuthError::Malformed),
    };
    if version != "v2" {
        return Err(AuthError::WrongVersion);
    }
    let issued: u64 = ts.parse().map_err(|_| AuthError::Malformed)?;
    if unix_seconds(now).abs_diff(issued) > MAX_CLOCK_SKEW.as_secs() {
        return Err(AuthError::Stale);
    }
    // Compare the MACs in constant time.
    let expected = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mut m) => {
            m.update(ts.as_bytes());
            m
        }
        Err(_) => unreachable!("HMAC-SHA256 takes keys of any length"),
    };
    let given = hex::decode(sig).map_err(|_| AuthError::BadSignature)?;
    expected
        .verify_slice(&given)
        .map_err(|_| AuthError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_matches_gitaly_reference_vector() {
        // HMAC-SHA256(key="secret", "1600000000"), computed independently with
        // `printf 1600000000 | openssl dgst -sha256 -hmac secret`.
        let now = UNIX_EPOCH + Duration::from_secs(1_600_000_000);
        let token = v2_token("secret", now);
        assert_eq!(
            token,
            "v2.931e1addb3bdbd13a10c1ca50d3118a30fdeff78b1ec60c8bde7827fcf4f4dc1.1600000000"
        );
        assert!(token.starts_with("v2.") && token.ends_with(".1600000000"));
    }

    #[test]
    fn verify_accepts_fresh_tokens_and_refuses_the_rest() {
        let now = SystemTime::now();
        let good = format!("Bearer {}", v2_token("s3cret", now));
        assert_eq!(verify(Some(&good), "s3cret", now), Ok(()));
        assert_eq!(
            verify(Some(&good), "other", now),
            Err(AuthError::BadSignature)
        );
        assert_eq!(verify(None, "s3cret", now), Err(AuthError::Missing));
        assert_eq!(
            verify(Some(&good), "s3cret", now + Duration::from_secs(31)),
            Err(AuthError::Stale)
        );
        let v1 = good.replacen("v2.", "v1.", 1);
        assert_eq!(
            verify(Some(&v1), "s3cret", now),
            Err(AuthError::WrongVersion)
        );
        assert_eq!(
            verify(Some("Bearer x"), "s3cret", now),
            Err(AuthError::Malformed)
        );
    }
}
