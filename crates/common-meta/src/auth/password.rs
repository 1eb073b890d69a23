//! Password hashes: argon2id with the crate's recommended cost, as PHC strings
//! (`$argon2id$v=19$m=...$salt$hash`) that carry their own parameters, so a later
//! change of cost still verifies older hashes.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use super::state::AuthError;

/// The hash of `password` with a fresh random salt. Slow on purpose (tens of
/// milliseconds): call it off the async threads.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    if password.is_empty() {
        return Err(AuthError::Invalid(
            "the password is empty; give one (or add the user without a password)".to_string(),
        ));
    }
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt)
        .map_err(|e| AuthError::Invalid(format!("cannot draw a password salt: {e}")))?;
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| AuthError::Invalid(format!("cannot encode a password salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| AuthError::Invalid(format!("cannot hash the password: {e}")))
}

/// Whether `password` matches `hash` (a PHC string from [`hash_password`]); a hash that
/// does not parse matches nothing.
pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// A hash of no one's password, checked for unknown users so that refusing them takes
/// as long as refusing a wrong password.
pub(crate) fn decoy() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        hash_password("decoy password of no user").unwrap_or_else(|_| {
            // Hashing fails only without randomness for the salt; a hash that does not
            // parse is then checked instead (faster, but still a refusal).
            String::new()
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        assert!(verify_password(&hash, "s3cret"));
        assert!(!verify_password(&hash, "s3cret "));
        assert!(!verify_password("not a hash", "s3cret"));
        // Salted: the same password hashes differently each time.
        assert_ne!(hash, hash_password("s3cret").unwrap());
        assert!(hash_password("").is_err());
    }
}
