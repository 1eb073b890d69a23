//! Signed text tokens, `{body}.{mac}`, where `mac` is the hex HMAC-SHA256 of `body`
//! under a secret: join tokens and auth tokens are both made and checked here.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::hex;

/// Why a token did not open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unsealed {
    /// Not `{body}.{hex mac}`.
    Malformed,
    /// Well formed, but not signed with this secret.
    Forged,
}

fn mac(secret: &[u8], body: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body.as_bytes());
    mac
}

/// `body` with its signature under `secret` appended.
pub(crate) fn seal(secret: &[u8], body: &str) -> String {
    let signature = hex::encode(&mac(secret, body).finalize().into_bytes());
    format!("{body}.{signature}")
}

/// The body of `token` when its signature is `secret`'s (compared in constant time).
pub(crate) fn open<'a>(secret: &[u8], token: &'a str) -> Result<&'a str, Unsealed> {
    let (body, signature) = token.rsplit_once('.').ok_or(Unsealed::Malformed)?;
    let signature = hex::decode(signature).ok_or(Unsealed::Malformed)?;
    mac(secret, body)
        .verify_slice(&signature)
        .map_err(|_| Unsealed::Forged)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_body_opens_with_its_secret_only() {
        let token = seal(b"secret", "a.b");
        assert_eq!(open(b"secret", &token), Ok("a.b"));
        assert_eq!(open(b"other", &token), Err(Unsealed::Forged));
        assert_eq!(open(b"secret", "a.b.zz"), Err(Unsealed::Malformed));
        assert_eq!(open(b"secret", "nodot"), Err(Unsealed::Malformed));
        let tampered = token.replacen("a.b", "a.c", 1);
        assert_eq!(open(b"secret", &tampered), Err(Unsealed::Forged));
    }
}
