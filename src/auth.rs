//! Client authentication at the WebSocket handshake.
//!
//! A client presents a JWT (HS256, signed with the node's `secret`) in `Authorization: Bearer`
//! or `?token=`. Claims: `sub` is the user id (required), `exp` and `nbf` are honoured when
//! present (with [`CLOCK_LEEWAY_SECS`] of clock skew either way), `dev` names the device, `pub`
//! lists the topic patterns the user may publish to. In `--dev` mode `?user=NAME` is trusted
//! instead and the user may publish anywhere. Everything here is pure: no sockets, and the
//! clock comes in through jsonwebtoken's validation only.
//!
//! A time claim that is present must be a NumericDate (RFC 7519 §2: seconds since the epoch,
//! a non-negative JSON number; a fraction is allowed and rounded, as jsonwebtoken does). A
//! string, a negative number, `null` or anything else refuses the token (`auth_bad_claims`):
//! jsonwebtoken skips the time check of a claim it cannot read, so a token with
//! `"exp":"never"` would otherwise never expire.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Deserializer};

/// Clock skew tolerated on `exp` and `nbf`, in seconds: clients and token issuers run on
/// other machines, whose clocks NTP keeps within a second or so of ours.
pub const CLOCK_LEEWAY_SECS: u64 = 5;

/// Who a connection is, decided once at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User id (`sub`).
    pub user: Arc<str>,
    /// Device name (`dev` claim), if the token names one.
    pub device: Option<Box<str>>,
    /// Which topics this user may publish to.
    pub publish: PublishRights,
    /// Which upstream streams this user may send `up` messages to (the `up` claim, the
    /// same patterns as `pub`).
    pub up: PublishRights,
    /// The token's `exp` (seconds since the epoch), if it has one: the connection is closed
    /// with 4402 when it passes unless the client sends a fresher token (`refresh`).
    pub expires: Option<u64>,
}

/// Topic patterns a user may publish to: `*` for all, `prefix.*` for a prefix, or exact names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PublishRights(Option<Arc<[Box<str>]>>);

impl PublishRights {
    /// Publish anywhere (dev mode). Every connection shares one list: a dev node's
    /// connections pay a reference count for their rights, not an allocation.
    pub fn all() -> Self {
        static ALL: std::sync::OnceLock<Arc<[Box<str>]>> = std::sync::OnceLock::new();
        PublishRights(Some(
            ALL.get_or_init(|| Arc::from(vec![Box::from("*")])).clone(),
        ))
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
    /// `nbf` is in the future.
    #[error("token not yet valid")]
    NotYetValid,
    /// Claims of the wrong shape: `sub` missing, or `exp`/`nbf` present but not a NumericDate.
    #[error("malformed claims")]
    BadClaims,
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
            AuthError::NotYetValid => "auth_not_yet_valid",
            AuthError::BadClaims => "auth_bad_claims",
            AuthError::BadUser => "auth_bad_user",
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    // Checked for shape here (a malformed one refuses the token); jsonwebtoken checks the
    // times themselves. `exp` is kept: an open connection is closed when it passes.
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    #[serde(default, rename = "nbf", deserialize_with = "numeric_date")]
    _nbf: Option<u64>,
    #[serde(default)]
    dev: Option<String>,
    #[serde(default, rename = "pub")]
    publish: Vec<String>,
    #[serde(default)]
    up: Vec<String>,
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
        validation.validate_nbf = true;
        validation.leeway = CLOCK_LEEWAY_SECS;
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
                    ErrorKind::ExpiredSignature => AuthError::Expired,
                    ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                    ErrorKind::Json(_) => AuthError::BadClaims,
                    _ => AuthError::Invalid,
                },
            )?;
            let claims = data.claims;
            let user = self.check_name(&claims.sub)?;
            return Ok(Identity {
                user,
                device: claims.dev.map(String::into_boxed_str),
                publish: PublishRights::from_patterns(claims.publish),
                up: PublishRights::from_patterns(claims.up),
                expires: claims.exp,
            });
        }
        match dev_user {
            Some(name) if self.dev => Ok(Identity {
                user: self.check_name(name)?,
                device: None,
                publish: PublishRights::all(),
                up: PublishRights::all(),
                expires: None,
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

/// Reads a present time claim: a non-negative, finite JSON number below `u64::MAX`, the
/// values jsonwebtoken validates (anything else it would silently skip), rounded to whole
/// seconds as jsonwebtoken does.
fn numeric_date<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let number = serde_json::Number::deserialize(d)?;
    let seconds = number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f.round() as u64)
    });
    if seconds.is_some() {
        Ok(seconds)
    } else {
        Err(serde::de::Error::custom(
            "a time claim must be a non-negative number of seconds",
        ))
    }
}

/// The credentials of an `Authorization: Bearer <credentials>` value, on the WebSocket
/// port and the API alike; the scheme is case-insensitive (RFC 9110 §11.1).
pub(crate) fn bearer(value: &str) -> Option<&str> {
    let scheme = value.get(..7)?;
    scheme
        .eq_ignore_ascii_case("bearer ")
        .then(|| value.get(7..))
        .flatten()
        .map(str::trim)
}

/// A user id or topic name: 1 to `max` bytes, no control characters.
pub fn valid_name(name: &str, max: usize) -> bool {
    !name.is_empty() && name.len() <= max && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer("Bearer k"), Some("k"));
        assert_eq!(bearer("bearer k"), Some("k"));
        assert_eq!(bearer("BEARER  k "), Some("k"));
        assert_eq!(bearer("Basic k"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearé k"), None, "not a char boundary at 7");
    }
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
    fn malformed_time_claims_refuse_the_token() {
        let auth = Authenticator::new(Some("s3"), false, 128);
        let bad = [
            json!({"sub":"a","exp":"never"}),
            json!({"sub":"a","exp":-1}),
            json!({"sub":"a","exp":null}),
            json!({"sub":"a","exp":true}),
            json!({"sub":"a","exp":[now() + 60]}),
            json!({"sub":"a","nbf":"now"}),
            json!({"sub":"a","nbf":-5}),
            json!({"sub":"a","exp":now() + 60,"nbf":{"t":0}}),
        ];
        for claims in bad {
            let t = token(claims.clone(), "s3");
            assert_eq!(
                auth.authenticate(Some(&t), None),
                Err(AuthError::BadClaims),
                "{claims}"
            );
        }
        let no_sub = token(json!({"exp":now() + 60}), "s3");
        assert_eq!(
            auth.authenticate(Some(&no_sub), None),
            Err(AuthError::BadClaims)
        );
    }

    #[test]
    fn fractional_times_are_numeric_dates() {
        let auth = Authenticator::new(Some("s3"), false, 128);
        let live = token(json!({"sub":"a","exp":now() as f64 + 60.5}), "s3");
        assert!(auth.authenticate(Some(&live), None).is_ok());
        let dead = token(json!({"sub":"a","exp":now() as f64 - 600.5}), "s3");
        assert_eq!(
            auth.authenticate(Some(&dead), None),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn nbf_is_honoured_with_the_leeway() {
        let auth = Authenticator::new(Some("s3"), false, 128);
        let early = token(json!({"sub":"a","nbf":now() + 600}), "s3");
        assert_eq!(
            auth.authenticate(Some(&early), None),
            Err(AuthError::NotYetValid)
        );
        let skewed = token(json!({"sub":"a","nbf":now() + CLOCK_LEEWAY_SECS - 2}), "s3");
        assert!(
            auth.authenticate(Some(&skewed), None).is_ok(),
            "within the leeway"
        );
        let started = token(json!({"sub":"a","nbf":now() - 60,"exp":now() + 60}), "s3");
        assert!(auth.authenticate(Some(&started), None).is_ok());
        let skewed_exp = token(json!({"sub":"a","exp":now() - CLOCK_LEEWAY_SECS + 2}), "s3");
        assert!(
            auth.authenticate(Some(&skewed_exp), None).is_ok(),
            "exp has the same leeway"
        );
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
