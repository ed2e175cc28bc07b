//! JWT authentication of hub clients (`listen({ auth })`): HS256 with a shared secret and/or
//! RS256 with a public key; `exp` is required and enforced on open connections too; the
//! channels a client may subscribe to come from a claim holding channel patterns. Secrets and
//! tokens never appear in messages or logs.

use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::protocol::Channel;
use crate::error::{Error, Result};

/// What a valid token grants.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    /// Channel patterns: `kv:<key>`, `kv:<prefix>*` (`kv:*` all keys), `table:<name>`,
    /// `table:*` (all tables).
    pub channels: Vec<Channel>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

impl Grant {
    /// Whether `c` is covered by one of the granted patterns.
    pub fn allows(&self, c: &Channel) -> bool {
        self.channels.iter().any(|p| match (p, c) {
            (Channel::Key(a), Channel::Key(b)) => a == b,
            (Channel::Prefix(a), Channel::Key(b)) => b.starts_with(a.as_str()),
            (Channel::Prefix(a), Channel::Prefix(b)) => b.starts_with(a.as_str()),
            (Channel::Table(a), Channel::Table(b)) => a == "*" || a == b,
            _ => false,
        })
    }
}

/// Validated `auth` options.
#[derive(Clone)]
pub struct Auth {
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    claim: String,
    leeway: u64,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Auth")
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .field("claim", &self.claim)
            .finish()
    }
}

const AUTH_KEYS: &[&str] = &[
    "secret",
    "publicKey",
    "issuer",
    "audience",
    "channelsClaim",
    "leeway",
];

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(format!("listen(): {msg}"))
}

impl Auth {
    pub fn from_json(v: &Value) -> Result<Auth> {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        let o: &Map<String, Value> = v.as_object().ok_or_else(|| {
            invalid("`auth` must be an object like { secret: '…' } or { publicKey: '-----BEGIN PUBLIC KEY-----…' }".into())
        })?;
        for k in o.keys() {
            if !AUTH_KEYS.contains(&k.as_str()) {
                return Err(invalid(format!(
                    "unknown option `auth.{k}`; allowed: {}",
                    AUTH_KEYS.join(", ")
                )));
            }
        }
        let s = |k: &str| -> Result<Option<&str>> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() => Ok(Some(s)),
                // The value itself is never echoed: it may be a secret.
                Some(_) => Err(invalid(format!("`auth.{k}` must be a non-empty string"))),
            }
        };
        let hs256 = match s("secret")? {
            Some(secret) if secret.len() < 32 => return Err(invalid(
                "`auth.secret` must be at least 32 characters (HS256 needs a long random secret)"
                    .into(),
            )),
            Some(secret) => Some(DecodingKey::from_secret(secret.as_bytes())),
            None => None,
        };
        let rs256 = match s("publicKey")? {
            Some(pem) => Some(DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|_| {
                invalid("`auth.publicKey` is not an RSA public key in PEM form".into())
            })?),
            None => None,
        };
        if hs256.is_none() && rs256.is_none() {
            return Err(invalid(
                "`auth` needs `secret` (HS256) or `publicKey` (RS256)".into(),
            ));
        }
        let leeway = match o.get("leeway") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_u64()
                .filter(|n| *n <= 300)
                .ok_or_else(|| invalid("`auth.leeway` must be 0 to 300 seconds".into()))?,
        };
        Ok(Auth {
            hs256,
            rs256,
            issuer: s("issuer")?.map(str::to_string),
            audience: s("audience")?.map(str::to_string),
            claim: s("channelsClaim")?.unwrap_or("channels").to_string(),
            leeway,
        })
    }

    /// Checks a token; the error says why in words safe to send to the client.
    pub fn verify(&self, token: &str) -> std::result::Result<Grant, String> {
        let header = decode_header(token).map_err(|_| "the token is not a JWT".to_string())?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| format!("tokens signed with {:?} are not accepted here", header.alg))?;
        let mut v = Validation::new(header.alg);
        v.leeway = self.leeway;
        v.set_required_spec_claims(&["exp"]);
        v.validate_exp = true;
        match &self.issuer {
            Some(i) => v.set_issuer(&[i]),
            None => v.iss = None,
        }
        match &self.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        let data = decode::<Map<String, Value>>(token, key, &v).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => "the token has expired".to_string(),
                K::InvalidSignature => "the token's signature is not valid".to_string(),
                K::InvalidIssuer => "the token's issuer is not accepted".to_string(),
                K::InvalidAudience => "the token's audience is not accepted".to_string(),
                K::MissingRequiredClaim(c) => format!("the token has no `{c}` claim"),
                _ => "the token is not valid".to_string(),
            }
        })?;
        let exp = data.claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let channels = match data.claims.get(&self.claim) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|c| c.as_str().and_then(|s| Channel::parse(s).ok()))
                .collect(),
            _ => {
                return Err(format!(
                    "the token has no `{}` claim listing the channels it may subscribe to",
                    self.claim
                ))
            }
        };
        Ok(Grant { channels, exp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: Value) -> String {
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn hs256_tokens_grant_their_channels() {
        let a = Auth::from_json(&json!({"secret": SECRET})).unwrap();
        let g = a
            .verify(&token(
                json!({"exp": now() + 60, "channels": ["kv:price:*", "table:orders"]}),
            ))
            .unwrap();
        let ch = |s| Channel::parse(s).unwrap();
        assert!(g.allows(&ch("kv:price:BTC")));
        assert!(g.allows(&ch("kv:price:B*")));
        assert!(!g.allows(&ch("kv:*")));
        assert!(!g.allows(&ch("kv:user:1")));
        assert!(g.allows(&ch("table:orders")));
        assert!(!g.allows(&ch("table:audit")));
        let e = a
            .verify(&token(json!({"exp": now() - 10, "channels": []})))
            .unwrap_err();
        assert!(e.contains("expired"), "{e}");
        assert!(a
            .verify(&token(json!({"channels": []})))
            .unwrap_err()
            .contains("exp"));
        assert!(a
            .verify(&token(json!({"exp": now() + 60})))
            .unwrap_err()
            .contains("channels"));
        assert!(a.verify("not.a.jwt").is_err());
        let other =
            Auth::from_json(&json!({"secret": "another-secret-another-secret-xx"})).unwrap();
        let e = other
            .verify(&token(json!({"exp": now() + 60, "channels": []})))
            .unwrap_err();
        assert!(e.contains("signature"), "{e}");
    }

    #[test]
    fn options_are_checked_and_secrets_never_echoed() {
        for bad in [
            json!({}),
            json!({"secret": "short"}),
            json!({"publicKey": "not a pem"}),
            json!({"secret": SECRET, "what": 1}),
            json!("x"),
        ] {
            let e = Auth::from_json(&bad).unwrap_err();
            assert_eq!(e.code(), "USP_INVALID_ARGUMENT");
            assert!(!e.to_string().contains("short"));
        }
        let a = Auth::from_json(&json!({"secret": SECRET})).unwrap();
        assert!(!format!("{a:?}").contains(SECRET));
    }
}
