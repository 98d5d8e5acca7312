//! Signed tokens: what a client may read and write on a relay.
//!
//! A token is an HS256 JWT whose claims are the subject (`sub`), the expiry (`exp`, seconds
//! since the Unix epoch), the time it was issued (`iat`) and two lists of collections, `read`
//! and `write` (`"*"` for every collection). The relay and whoever issues tokens share one
//! secret (`weft token issue --secret-file F`, `weft serve --auth-secret-file F`).
//!
//! Writing implies nothing about reading: a session sees only collections in `read`, and can
//! write only collections in both lists.
//!
//! HS256 is HMAC-SHA256 over `base64url(header).base64url(claims)`, done here with ring's HMAC
//! (the crypto stack TLS already uses): a JWT library would bring RSA, P-256, P-384 and Ed25519
//! stacks for one algorithm we use. Only `{"alg":"HS256"}` is accepted (no `none`, no algorithm
//! chosen by the token), the signature is checked in constant time before anything of the
//! claims is read, and expiry has no grace period.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::Scope;

/// The shortest secret accepted: HS256 keys should carry at least 256 bits.
pub const MIN_SECRET_BYTES: usize = 32;

/// The longest token accepted (a token's lists of collections make it grow; this is plenty).
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The only header weft issues and accepts.
const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// A token's header, as far as it matters: its algorithm.
#[derive(Deserialize)]
struct Header {
    alg: String,
}

/// The collection-list entry that means "every collection".
const ALL: &str = "*";

/// Why a secret could not be loaded or a token not be issued or accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    #[error("cannot read the secret file {path}: {source}")]
    SecretFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the secret in {path} is too short ({len} bytes; at least {MIN_SECRET_BYTES}): \
         create one with `head -c 48 /dev/urandom | base64 > {path}`"
    )]
    WeakSecret { path: String, len: usize },
    #[error("no token: this relay requires one")]
    Missing,
    #[error("the token expired {ago} s ago")]
    Expired { ago: u64 },
    #[error("the token's signature does not match this relay's secret")]
    BadSignature,
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("invalid collection {0:?} in the token's lists")]
    BadCollection(String),
    #[error("signing the token failed: {0}")]
    Signing(String),
}

/// The claims a weft token carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    iat: u64,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
}

/// What a verified token allows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Who the token was issued to.
    pub subject: String,
    /// When it expires, in seconds since the Unix epoch.
    pub expires_at: u64,
    /// The collections it may read.
    pub read: Scope,
    /// The collections it may write.
    pub write: Scope,
}

impl Grant {
    /// How long until the token expires (zero if it already has).
    pub fn remaining(&self) -> Duration {
        Duration::from_secs(self.expires_at.saturating_sub(unix_now()))
    }
}

/// The shared secret that signs and verifies tokens.
#[derive(Clone)]
pub struct TokenKey {
    key: hmac::Key,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from secret bytes (at least [`MIN_SECRET_BYTES`]).
    pub fn from_secret(secret: &[u8]) -> Result<Self, AuthError> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(AuthError::WeakSecret {
                path: "the secret".into(),
                len: secret.len(),
            });
        }
        Ok(TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        })
    }

    /// A key from a file holding the secret (surrounding whitespace, such as a final newline,
    /// is not part of it).
    pub fn from_file(path: &Path) -> Result<Self, AuthError> {
        let bytes = std::fs::read(path).map_err(|source| AuthError::SecretFile {
            path: path.display().to_string(),
            source,
        })?;
        let secret = bytes.trim_ascii();
        TokenKey::from_secret(secret).map_err(|e| match e {
            AuthError::WeakSecret { len, .. } => AuthError::WeakSecret {
                path: path.display().to_string(),
                len,
            },
            other => other,
        })
    }

    /// Signs a token for `subject`, valid for `ttl`, reading and writing the given collections.
    pub fn issue(
        &self,
        subject: &str,
        read: &Scope,
        write: &Scope,
        ttl: Duration,
    ) -> Result<String, AuthError> {
        let expires_at = unix_now().saturating_add(ttl.as_secs());
        self.issue_until(subject, read, write, expires_at)
    }

    /// Signs a token that expires at `expires_at` (seconds since the Unix epoch; a time in the
    /// past gives an expired token, which tests use).
    pub fn issue_until(
        &self,
        subject: &str,
        read: &Scope,
        write: &Scope,
        expires_at: u64,
    ) -> Result<String, AuthError> {
        self.sign(&Claims {
            sub: subject.to_owned(),
            iat: unix_now(),
            exp: expires_at,
            read: to_list(read),
            write: to_list(write),
        })
    }

    fn sign(&self, claims: &Claims) -> Result<String, AuthError> {
        let claims = serde_json::to_vec(claims).map_err(|e| AuthError::Signing(e.to_string()))?;
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(HEADER),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let tag = hmac::sign(&self.key, signed.as_bytes());
        Ok(format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref())))
    }

    /// Checks a token's algorithm, signature and expiry and returns what it allows.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        let malformed = |what: &str| AuthError::Malformed(what.to_owned());
        if token.len() > MAX_TOKEN_BYTES {
            return Err(malformed("longer than any weft token"));
        }
        let mut parts = token.split('.');
        let (Some(header), Some(claims), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed("not three dot-separated parts"));
        };
        let decode = |part: &str, what: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| AuthError::Malformed(format!("{what}: {e}")))
        };
        let alg = serde_json::from_slice::<Header>(&decode(header, "header")?)
            .map_err(|e| AuthError::Malformed(format!("header: {e}")))?
            .alg;
        if alg != "HS256" {
            return Err(AuthError::Malformed(format!(
                "algorithm {alg:?}: only HS256 is accepted"
            )));
        }
        let signature = decode(signature, "signature")?;
        let signed = &token[..header.len() + 1 + claims.len()];
        hmac::verify(&self.key, signed.as_bytes(), &signature)
            .map_err(|_| AuthError::BadSignature)?;
        let claims: Claims = serde_json::from_slice(&decode(claims, "claims")?)
            .map_err(|e| AuthError::Malformed(format!("claims: {e}")))?;
        // No grace period: an expired token is refused the second it expires, and a live
        // session ends then too.
        let now = unix_now();
        if claims.exp < now {
            return Err(AuthError::Expired {
                ago: now - claims.exp,
            });
        }
        Ok(Grant {
            subject: claims.sub,
            expires_at: claims.exp,
            read: from_list(claims.read)?,
            write: from_list(claims.write)?,
        })
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn to_list(scope: &Scope) -> Vec<String> {
    match scope {
        Scope::All => vec![ALL.to_owned()],
        Scope::Collections(names) => names.clone(),
    }
}

fn from_list(list: Vec<String>) -> Result<Scope, AuthError> {
    if list.iter().any(|c| c == ALL) {
        return Ok(Scope::All);
    }
    if let Some(bad) = list
        .iter()
        .find(|c| crate::engine::validate_collection(c).is_err())
    {
        return Err(AuthError::BadCollection(bad.clone()));
    }
    Ok(Scope::Collections(list))
}

/// Parses a command-line collection list: `a,b`, `*` for all, empty for none.
pub fn parse_list(list: &str) -> Result<Scope, AuthError> {
    from_list(
        list.split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect(),
    )
}

/// The part of `requested` that `allowed` covers: `Err` names the requested collections it
/// does not cover.
pub fn narrow(requested: &Scope, allowed: &Scope) -> Result<Scope, Vec<String>> {
    match (requested, allowed) {
        (_, Scope::All) => Ok(requested.clone()),
        (Scope::All, Scope::Collections(_)) => Ok(allowed.clone()),
        (Scope::Collections(asked), Scope::Collections(_)) => {
            let missing: Vec<String> = asked
                .iter()
                .filter(|c| !allowed.contains(c))
                .cloned()
                .collect();
            if missing.is_empty() {
                Ok(requested.clone())
            } else {
                Err(missing)
            }
        }
    }
}

/// Where `b` is narrower than `a`: the collections in both.
pub fn intersect(a: &Scope, b: &Scope) -> Scope {
    match (a, b) {
        (Scope::All, other) | (other, Scope::All) => other.clone(),
        (Scope::Collections(x), Scope::Collections(_)) => {
            Scope::Collections(x.iter().filter(|c| b.contains(c)).cloned().collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> TokenKey {
        TokenKey::from_secret(&[byte; 32]).expect("a 32-byte secret")
    }

    #[test]
    fn a_token_round_trips_with_its_lists() {
        let k = key(1);
        let token = k
            .issue(
                "alice",
                &Scope::Collections(vec!["a".into(), "b".into()]),
                &Scope::collection("a"),
                Duration::from_secs(60),
            )
            .expect("issue");
        let grant = k.verify(&token).expect("verify");
        assert_eq!(grant.subject, "alice");
        assert_eq!(grant.read, Scope::Collections(vec!["a".into(), "b".into()]));
        assert_eq!(grant.write, Scope::collection("a"));
        assert!(grant.remaining() > Duration::from_secs(50));
        let all = k
            .issue("root", &Scope::All, &Scope::All, Duration::from_secs(60))
            .expect("issue");
        assert_eq!(k.verify(&all).expect("verify").write, Scope::All);
    }

    #[test]
    fn forged_expired_and_garbage_tokens_are_refused_with_the_reason() {
        let token = key(1)
            .issue("alice", &Scope::All, &Scope::All, Duration::from_secs(60))
            .expect("issue");
        assert!(matches!(
            key(2).verify(&token),
            Err(AuthError::BadSignature)
        ));
        let expired = key(1)
            .sign(&Claims {
                sub: "alice".into(),
                iat: unix_now() - 100,
                exp: unix_now() - 10,
                read: vec!["*".into()],
                write: vec![],
            })
            .expect("sign");
        let err = key(1).verify(&expired).expect_err("expired");
        assert!(
            matches!(err, AuthError::Expired { ago } if ago >= 10),
            "{err}"
        );
        for garbage in ["", "abc", "a.b.c", "eyJhbGciOiJub25lIn0.e30."] {
            let err = key(1).verify(garbage).expect_err(garbage);
            assert!(matches!(err, AuthError::Malformed(_)), "{garbage}: {err}");
        }
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(matches!(
            TokenKey::from_secret(b"short"),
            Err(AuthError::WeakSecret { len: 5, .. })
        ));
    }

    #[test]
    fn narrowing_a_requested_scope() {
        let ab = Scope::Collections(vec!["a".into(), "b".into()]);
        let a = Scope::collection("a");
        assert_eq!(narrow(&Scope::All, &ab), Ok(ab.clone()));
        assert_eq!(narrow(&a, &ab), Ok(a.clone()));
        assert_eq!(narrow(&ab, &a), Err(vec!["b".to_owned()]));
        assert_eq!(narrow(&ab, &Scope::All), Ok(ab.clone()));
        assert_eq!(intersect(&ab, &a), a);
        assert_eq!(intersect(&Scope::All, &a), a);
        assert_eq!(parse_list("a, b").expect("list"), ab);
        assert_eq!(parse_list("*").expect("list"), Scope::All);
        assert_eq!(
            parse_list("").expect("list"),
            Scope::Collections(Vec::new())
        );
    }
}
