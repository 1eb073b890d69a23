//! The tokens `Authenticate` hands out.
//!
//! A token is `mat1.{user hex}.{generation}.{expires_at_ms}.{nonce}.{mac}`, where `mac` is
//! HMAC-SHA256 keyed by the auth state's secret over everything before it. Any member
//! verifies one against its own copy of the state, without a write: the signature, the
//! expiry, that the user still exists and that its password has not changed since
//! (the generation). Disabling and enabling auth again draws a new secret, so every
//! older token stops verifying. A client whose token stops verifying authenticates
//! again (etcd's clients do so on "invalid auth token").

use super::state::{AuthError, AuthState};
use crate::hex;

/// Version tag at the start of every token.
const TAG: &str = "mat1";

fn invalid(why: &'static str) -> AuthError {
    AuthError::InvalidToken(why)
}

impl AuthState {
    /// A token for `user` valid until `expires_at_ms` (Unix ms). Needs auth on.
    pub fn mint_token(&self, user: &str, expires_at_ms: u64) -> Result<String, AuthError> {
        if !self.enabled {
            return Err(AuthError::NotEnabled);
        }
        let generation = self.user(user)?.generation;
        let mut nonce = [0u8; 8];
        getrandom::fill(&mut nonce)
            .map_err(|e| AuthError::Invalid(format!("cannot draw a token nonce: {e}")))?;
        let body = format!(
            "{TAG}.{}.{generation}.{expires_at_ms}.{}",
            hex::encode(user.as_bytes()),
            hex::encode(&nonce)
        );
        Ok(crate::signed::seal(&self.secret, &body))
    }

    /// The user `token` names, if it verifies at `now_ms` (see the module doc).
    pub fn verify_token(&self, token: &str, now_ms: u64) -> Result<String, AuthError> {
        if !self.enabled {
            return Err(AuthError::NotEnabled);
        }
        let malformed = || invalid("");
        let body = crate::signed::open(&self.secret, token).map_err(|why| match why {
            crate::signed::Unsealed::Malformed => malformed(),
            crate::signed::Unsealed::Forged => {
                invalid(": not signed by this cluster's current secret")
            }
        })?;
        let mut parts = body.split('.');
        let (Some(TAG), Some(user), Some(generation), Some(expires), Some(_nonce), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed());
        };
        let user = hex::decode(user)
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(malformed)?;
        let (Ok(generation), Ok(expires_at_ms)) = (generation.parse::<u64>(), expires.parse())
        else {
            return Err(malformed());
        };
        if now_ms >= expires_at_ms {
            return Err(invalid(": expired; authenticate again"));
        }
        match self.users.get(&user) {
            None => Err(invalid(": its user no longer exists")),
            Some(u) if u.generation != generation => {
                Err(invalid(": its user's password changed since"))
            }
            Some(_) => Ok(user),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::state::MIN_SECRET_BYTES;
    use crate::auth::{AuthChange, ROOT};

    fn enabled() -> AuthState {
        let mut state = AuthState::default();
        for name in [ROOT, "alice"] {
            state
                .apply(AuthChange::UserAdd {
                    name: name.into(),
                    password: Some("h".into()),
                })
                .unwrap();
        }
        state
            .apply(AuthChange::UserGrant {
                name: ROOT.into(),
                role: ROOT.into(),
            })
            .unwrap();
        state
            .apply(AuthChange::Enable {
                secret: vec![1; MIN_SECRET_BYTES],
            })
            .unwrap();
        state
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let state = enabled();
        let token = state.mint_token("alice", 1_000).unwrap();
        assert_eq!(state.verify_token(&token, 999).unwrap(), "alice");
        assert!(matches!(
            state.verify_token(&token, 1_000),
            Err(AuthError::InvalidToken(why)) if why.contains("expired")
        ));
    }

    #[test]
    fn forged_or_outdated_tokens_are_refused() {
        let mut state = enabled();
        let token = state.mint_token("alice", u64::MAX).unwrap();
        // Another user's name under the same signature.
        let forged = token.replacen(&hex::encode(b"alice"), &hex::encode(b"root"), 1);
        for bad in [
            forged.as_str(),
            "",
            "mat1",
            "garbage.00",
            &token[..token.len() - 2],
        ] {
            assert!(
                matches!(state.verify_token(bad, 0), Err(AuthError::InvalidToken(_))),
                "{bad}"
            );
        }
        // Another cluster's secret.
        let mut other = state.clone();
        other.secret = vec![2; MIN_SECRET_BYTES];
        assert!(other.verify_token(&token, 0).is_err());
        // A password change outdates the token; so does deleting the user.
        state
            .apply(AuthChange::UserPassword {
                name: "alice".into(),
                password: "h2".into(),
            })
            .unwrap();
        assert!(state.verify_token(&token, 0).is_err());
        let fresh = state.mint_token("alice", u64::MAX).unwrap();
        assert!(state.verify_token(&fresh, 0).is_ok());
        state
            .apply(AuthChange::UserDelete {
                name: "alice".into(),
            })
            .unwrap();
        assert!(state.verify_token(&fresh, 0).is_err());
        // A new user of the same name is not the old one.
        state
            .apply(AuthChange::UserAdd {
                name: "alice".into(),
                password: Some("h3".into()),
            })
            .unwrap();
        assert!(state.verify_token(&fresh, 0).is_err());
        // Auth off: no token verifies.
        state.apply(AuthChange::Disable).unwrap();
        assert_eq!(state.verify_token(&fresh, 0), Err(AuthError::NotEnabled));
    }
}
