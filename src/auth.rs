//! Client authentication at the WebSocket handshake.
//!
//! A client presents a JWT (HS256, signed with the node's `secret`) in `Authorization: Bearer`
//! or `?token=`. Claims: `sub` is the user id (required), `exp` is honoured when present (no
//! leeway beyond a few seconds of clock skew), `dev` names the device, `pub` lists the topic
//! patterns the user may publish to. In `--dev` mode `?user=NAME` is trusted instead and the
//! user may publish anywhere. Everything here is pure: no sockets, and the clock comes in
//! through jsonwebtoken's validation only.

use std::sync::Arc;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Who a connection is, decided once at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id (`sub`).
    pub user: Arc<str>,
    /// Device name (`dev` claim), if the token names one.
    pub device: Option<Box<str>>,
    /// Which topics this user may publish to.
    pub publish: PublishRights,
}

/// Topic patterns a user may publish to: `*` for all, `prefix.*` for a prefix, or exact names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishRights(Option<Arc<[Box<str>]>>);

impl PublishRights {
    /// Publish anywhere (dev mode).
    pub fn all() -> Self {
        PublishRights(Some(Arc::from(vec![Box::from("*")])))
    }

    /// Publish nowhere.
    pub fn none() -> Self {
        PublishRights(None)
    }

    /// Rights from a token's `pub` claim.
    pub fn from_patterns(patterns: Vec<String>) -> Self {
        if patterns.is_empty() {
            return Self::none();
        }
        PublishRights(Some(
            patterns.into_iter().map(String::into_boxed_str).collect(),
        ))
    }

    /// Whether `topic` matches one of the patterns.
    pub fn allows(&self, topic: &str) -> bool {
        let Some(patterns) = &self.0 else {
            return false;
        };
        patterns
            .iter()
            .any(|pattern| match pattern.strip_suffix('*') {
                Some(prefix) => topic.starts_with(prefix),
                None => **pattern == *topic,
            })
    }
}

/// Why a handshake's credentials were refused; each becomes HTTP 401 and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No token and no dev-mode user.
    #[error("missing credentials")]
    Missing,
    /// Signature, algorithm or format is wrong.
    #[error("invalid token")]
    Invalid,
    /// `exp` is in the past.
    #[error("token expired")]
    Expired,
    /// `sub` is empty, too long or contains control characters.
    #[error("invalid user id")]
    BadUser,
}

impl AuthError {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "auth_missing",
            AuthError::Invalid => "auth_invalid",
            AuthError::Expired => "auth_expired",
            AuthError::BadUser => "auth_bad_user",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default, rename = "pub")]
    publish: Vec<String>,
}

/// Verifies handshake credentials. Built once per node and shared by every shard.
pub struct Authenticator {
    key: Option<DecodingKey>,
    validation: Validation,
    dev: bool,
    max_name_bytes: usize,
}

impl Authenticator {
    /// `secret` may be absent only in dev mode (config validation enforces it).
    pub fn new(secret: Option<&str>, dev: bool, max_name_bytes: usize) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.required_spec_claims.clear();
        validation.validate_exp = true;
        validation.leeway = 5;
        Authenticator {
            key: secret.map(|s| DecodingKey::from_secret(s.as_bytes())),
            validation,
            dev,
            max_name_bytes,
        }
    }

    /// Decides who the client is from the bearer token (header or query) or, in dev mode,
    /// the `user` query parameter. A token, when given, always wins over `?user=`.
    pub fn authenticate(
        &self,
        token: Option<&str>,
        dev_user: Option<&str>,
    ) -> Result<Identity, AuthError> {
        if let Some(token) = token {
            let key = self.key.as_ref().ok_or(AuthError::Invalid)?;
            let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(
                |e| match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                    _ => AuthError::Invalid,
                },
            )?;
            let claims = data.claims;
            let user = self.check_name(&claims.sub)?;
            return Ok(Identity {
                user,
                device: claims.dev.map(String::into_boxed_str),
                publish: PublishRights::from_patterns(claims.publish),
            });
        }
        match dev_user {
            Some(name) if self.dev => Ok(Identity {
                user: self.check_name(name)?,
                device: None,
                publish: PublishRights::all(),
            }),
            _ => Err(AuthError::Missing),
        }
    }

    fn check_name(&self, name: &str) -> Result<Arc<str>, AuthError> {
        if valid_name(name, self.max_name_bytes) {
            Ok(Arc::from(name))
        } else {
            Err(AuthError::BadUser)
        }
    }
}

/// A user id or topic name: 1 to `max` bytes, no control characters.
pub fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty() && name.len() <= max && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    #[test]
    fn accepts_a_good_token_with_claims() {
        let auth = Authenticator::new(Some("s3"), false, 128);
        let t = token(
            json!({"sub":"alice","dev":"phone","pub":["room.*"],"exp":now()+60}),
            "s3",
        );
        let id = auth.authenticate(Some(&t), None).expect("valid");
        assert_eq!(&*id.user, "alice");
        assert_eq!(id.device.as_deref(), Some("phone"));
        assert!(id.publish.allows("room.1"));
        assert!(!id.publish.allows("other"));
    }

    #[test]
    fn refuses_bad_tokens() {
        let auth = Authenticator::new(Some("s3"), false, 128);
        let wrong_key = token(json!({"sub":"alice"}), "other");
        assert_eq!(
            auth.authenticate(Some(&wrong_key), None),
            Err(AuthError::Invalid)
        );
        let expired = token(json!({"sub":"alice","exp":now()-600}), "s3");
        assert_eq!(
            auth.authenticate(Some(&expired), None),
            Err(AuthError::Expired)
        );
        let empty = token(json!({"sub":""}), "s3");
        assert_eq!(
            auth.authenticate(Some(&empty), None),
            Err(AuthError::BadUser)
        );
        assert_eq!(
            auth.authenticate(Some("garbage"), None),
            Err(AuthError::Invalid)
        );
        assert_eq!(auth.authenticate(None, None), Err(AuthError::Missing));
    }

    #[test]
    fn dev_user_only_in_dev_mode() {
        let prod = Authenticator::new(Some("s3"), false, 128);
        assert_eq!(
            prod.authenticate(None, Some("bob")),
            Err(AuthError::Missing)
        );
        let dev = Authenticator::new(None, true, 128);
        let id = dev.authenticate(None, Some("bob")).expect("dev user");
        assert_eq!(&*id.user, "bob");
        assert!(id.publish.allows("anything"));
    }

    #[test]
    fn publish_patterns() {
        let rights = PublishRights::from_patterns(vec!["news".into(), "chat.*".into()]);
        assert!(rights.allows("news"));
        assert!(!rights.allows("news2"));
        assert!(rights.allows("chat.room1"));
        assert!(!rights.allows("chat"));
        assert!(!PublishRights::none().allows("news"));
        assert!(PublishRights::all().allows("x"));
    }
}
