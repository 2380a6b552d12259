//! Standard Webhooks signatures (<https://www.standardwebhooks.com>), so receivers can check
//! a request came from Keel, unaltered and recently, with any of that specification's
//! libraries.
//!
//! Three headers: `webhook-id` (the job id: the same on every attempt of a job, so a
//! receiver can drop duplicates of at-least-once delivery), `webhook-timestamp` (Unix
//! seconds, so it can refuse replays) and `webhook-signature`: `v1,` and the base64
//! HMAC-SHA256, keyed with the secret, of `"{id}.{timestamp}.{body}"`.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::SigningSecret;

/// The `webhook-id` header.
pub(super) const ID: &str = "webhook-id";
/// The `webhook-timestamp` header.
pub(super) const TIMESTAMP: &str = "webhook-timestamp";
/// The `webhook-signature` header.
pub(super) const SIGNATURE: &str = "webhook-signature";

/// The `webhook-signature` value for one request.
pub(super) fn sign(secret: &SigningSecret, id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.key()).expect("HMAC accepts keys of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's published example, so a receiver using any Standard Webhooks
    /// library verifies what Keel sends (a vector computed here would only prove the code
    /// agrees with itself).
    #[test]
    fn matches_the_standard_webhooks_test_vector() {
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            sign(
                &secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn every_input_is_covered() {
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let base = sign(&secret, "a", 1, b"{}");
        assert_ne!(base, sign(&secret, "b", 1, b"{}"));
        assert_ne!(base, sign(&secret, "a", 2, b"{}"));
        assert_ne!(base, sign(&secret, "a", 1, b"[]"));
        let other = SigningSecret::parse(&format!(
            "whsec_{}",
            base64::engine::general_purpose::STANDARD.encode([7u8; 32])
        ))
        .unwrap();
        assert_ne!(base, sign(&other, "a", 1, b"{}"));
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        let ok = SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            ok,
            SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
            "the prefix is optional"
        );
        assert_eq!(format!("{ok:?}"), "SigningSecret(<redacted>)");
        let bad = SigningSecret::parse("whsec_not base64!").unwrap_err();
        assert!(
            bad.contains("does not decode") && !bad.contains("not base64"),
            "{bad}"
        );
        let short = SigningSecret::parse("whsec_c2hvcnQ=").unwrap_err();
        assert!(short.contains("24 to 64 bytes, got 5"), "{short}");
    }
}
