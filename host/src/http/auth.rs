//! Request signing (contract "Auth") and per-key publish/subscribe permissions.
//!
//! `Authorization: WHARF <AccessKey>:<Base64(HMAC-SHA1(SecretKey, StringToSign))>` with
//! `StringToSign = METHOD\nContent-MD5\nContent-Type\nDate\nPath-and-query`. The client (CLI) and
//! the server share these functions so they cannot drift apart.

use std::collections::HashMap;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

use crate::clock::SharedClock;
use crate::config::{AccessKey, AuthConfig};
use crate::error::{ErrorCode, ErrorKind, WharfError};

/// How far the `Date` header may be from the host clock, either way.
pub const MAX_CLOCK_SKEW_MS: u64 = 15 * 60 * 1000;

/// The scheme word at the start of the `Authorization` header.
pub const SCHEME: &str = "WHARF";

/// The contract's `StringToSign`.
pub fn string_to_sign(
    method: &str,
    content_md5: &str,
    content_type: &str,
    date: &str,
    path_and_query: &str,
) -> String {
    format!("{method}\n{content_md5}\n{content_type}\n{date}\n{path_and_query}")
}

/// `Base64(HMAC-SHA1(secret, data))`.
pub fn sign(secret: &str, data: &str) -> String {
    B64.encode(hmac_sha1(secret, data))
}

fn hmac_sha1(secret: &str, data: &str) -> Vec<u8> {
    hmac_sha1_bytes(secret.as_bytes(), data.as_bytes())
}

fn hmac_sha1_bytes(secret: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = match Hmac::<Sha1>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// `Base64(MD5(body))`, the `Content-MD5` header value.
pub fn content_md5(body: &[u8]) -> String {
    B64.encode(Md5::digest(body))
}

/// The signed headers of one request, as received.
#[derive(Debug, Clone, Copy, Default)]
pub struct SignedParts<'a> {
    /// `GET`, `POST`, …
    pub method: &'a str,
    /// Raw path and query as sent (`/v1/topics?x=1`).
    pub path_and_query: &'a str,
    /// `Authorization` header, if any.
    pub authorization: Option<&'a str>,
    /// `Date` header, if any.
    pub date: Option<&'a str>,
    /// `Content-MD5` header, if any.
    pub content_md5: Option<&'a str>,
    /// `Content-Type` header, if any.
    pub content_type: Option<&'a str>,
}

/// What an authenticated caller may do.
#[derive(Debug, Clone)]
pub struct Principal {
    /// Access key, or `None` when the host runs open.
    pub access_key: Option<String>,
    publish: Allow,
    subscribe: Allow,
    admin: bool,
}

#[derive(Debug, Clone)]
enum Allow {
    All,
    Only(Vec<String>),
}

impl Allow {
    fn from_list(list: &[String]) -> Allow {
        if list.iter().any(|t| t == "*") {
            Allow::All
        } else {
            Allow::Only(list.to_vec())
        }
    }

    fn permits(&self, name: &str) -> bool {
        match self {
            Allow::All => true,
            Allow::Only(names) => names.iter().any(|n| n == name),
        }
    }
}

impl Principal {
    /// The caller on an open host: may do everything.
    pub fn open() -> Principal {
        Principal {
            access_key: None,
            publish: Allow::All,
            subscribe: Allow::All,
            admin: true,
        }
    }

    fn from_key(k: &AccessKey) -> Principal {
        Principal {
            access_key: Some(k.access_key.clone()),
            publish: Allow::from_list(&k.allow_publish),
            subscribe: Allow::from_list(&k.allow_subscribe),
            admin: k.admin,
        }
    }

    /// `NO_PERMISSION` unless this caller may send to `topic`.
    pub fn check_publish(&self, topic: &str) -> Result<(), WharfError> {
        if self.publish.permits(topic) {
            Ok(())
        } else {
            Err(self.denied(&format!("publish to topic '{topic}'"), "allow_publish"))
        }
    }

    /// `NO_PERMISSION` unless this caller may read `name` (a topic or a consumer group).
    pub fn check_subscribe(&self, what: &str, name: &str) -> Result<(), WharfError> {
        if self.subscribe.permits(name) {
            Ok(())
        } else {
            Err(self.denied(&format!("read {what} '{name}'"), "allow_subscribe"))
        }
    }

    /// True when this caller may read `name` (a topic or a consumer group).
    pub fn may_subscribe(&self, name: &str) -> bool {
        self.subscribe.permits(name)
    }

    /// True when this caller may read every topic and group (`allow_subscribe = ["*"]`).
    pub fn subscribes_all(&self) -> bool {
        matches!(self.subscribe, Allow::All)
    }

    /// `NO_PERMISSION` when this caller may read nothing at all, so `action` is refused before
    /// any lookup (its answer could only say whether something exists).
    pub fn check_subscribe_any(&self, action: &str) -> Result<(), WharfError> {
        match &self.subscribe {
            Allow::Only(names) if names.is_empty() => Err(WharfError::new(
                ErrorCode::NoPermission,
                ErrorKind::Forbidden,
                format!(
                    "access key '{}' may not {action}: it may read no topic; add the topics to the key's allow_subscribe in [[auth.keys]]",
                    self.access_key.as_deref().unwrap_or("")
                ),
            )),
            _ => Ok(()),
        }
    }

    /// True when this caller may send to every topic (`allow_publish = ["*"]`).
    pub fn publishes_all(&self) -> bool {
        matches!(self.publish, Allow::All)
    }

    /// `NO_PERMISSION` unless this caller may re-send `group`'s dead letter of `topic`: the
    /// re-send delivers that topic's message again, so it needs the right to publish to it.
    pub fn check_resend(&self, group: &str, topic: &str) -> Result<(), WharfError> {
        if self.publish.permits(topic) {
            Ok(())
        } else {
            Err(WharfError::new(
                ErrorCode::NoPermission,
                ErrorKind::Forbidden,
                format!(
                    "access key '{}' may not re-send dead letters of group '{group}' from topic '{topic}': that needs the right to publish to the topic; add \"{topic}\" to the key's allow_publish in [[auth.keys]]",
                    self.access_key.as_deref().unwrap_or("")
                ),
            ))
        }
    }

    /// `NO_PERMISSION` unless this caller may manage resources.
    pub fn check_admin(&self, action: &str) -> Result<(), WharfError> {
        if self.admin {
            Ok(())
        } else {
            Err(WharfError::new(
                ErrorCode::NoPermission,
                ErrorKind::Forbidden,
                format!(
                    "access key '{}' may not {action}; set admin = true for it in [[auth.keys]]",
                    self.access_key.as_deref().unwrap_or("")
                ),
            ))
        }
    }

    fn denied(&self, action: &str, setting: &str) -> WharfError {
        WharfError::new(
            ErrorCode::NoPermission,
            ErrorKind::Forbidden,
            format!(
                "access key '{}' may not {action}; add it to the key's {setting} in [[auth.keys]]",
                self.access_key.as_deref().unwrap_or("")
            ),
        )
    }
}

/// Checks signatures against the configured keys.
pub struct Authenticator {
    keys: HashMap<String, (String, Arc<Principal>)>,
    clock: SharedClock,
    open: Arc<Principal>,
    /// `/metrics` without a signature.
    pub metrics_open: bool,
}

fn unauthenticated(message: impl Into<String>) -> WharfError {
    WharfError::new(ErrorCode::NoPermission, ErrorKind::Unauthenticated, message)
}

impl Authenticator {
    /// Builds the key table; `clock` is the wall clock `Date` headers are compared with.
    pub fn new(config: &AuthConfig, clock: SharedClock) -> Authenticator {
        let keys = config
            .keys
            .iter()
            .map(|k| {
                (
                    k.access_key.clone(),
                    (k.secret_key.clone(), Arc::new(Principal::from_key(k))),
                )
            })
            .collect();
        Authenticator {
            keys,
            clock,
            open: Arc::new(Principal::open()),
            metrics_open: config.metrics_open,
        }
    }

    /// The principal of unsigned requests on an open host (and of always-open paths).
    pub fn anonymous(&self) -> Arc<Principal> {
        self.open.clone()
    }

    /// True when no keys are configured: every request is accepted unsigned.
    pub fn is_open(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies one request's signature and `Date`; returns who is calling.
    pub fn authenticate(&self, req: &SignedParts<'_>) -> Result<Arc<Principal>, WharfError> {
        if self.is_open() {
            return Ok(self.open.clone());
        }
        let header = req.authorization.ok_or_else(|| {
            unauthenticated(
                "this host requires signed requests: send `Authorization: WHARF <AccessKey>:<Signature>` and a `Date` header",
            )
        })?;
        let rest = header
            .strip_prefix(SCHEME)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| {
                unauthenticated(format!(
                    "Authorization header must start with '{SCHEME} ' followed by <AccessKey>:<Signature>"
                ))
            })?;
        let (access_key, signature) = rest.trim().split_once(':').ok_or_else(|| {
            unauthenticated("Authorization header must be `WHARF <AccessKey>:<Signature>`")
        })?;
        let (secret, principal) = self.keys.get(access_key).ok_or_else(|| {
            unauthenticated(format!(
                "unknown access key '{access_key}'; use a key listed in the host's [[auth.keys]]"
            ))
        })?;
        let date = req.date.ok_or_else(|| {
            unauthenticated("signed requests need a `Date` header (HTTP date, e.g. `Wed, 25 Nov 2026 17:00:00 GMT`)")
        })?;
        let when = httpdate::parse_http_date(date).map_err(|_| {
            unauthenticated(format!(
                "Date header '{date}' is not an HTTP date such as `Wed, 25 Nov 2026 17:00:00 GMT`"
            ))
        })?;
        let when_ms = when
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let now = self.clock.now_ms();
        if now.abs_diff(when_ms) > MAX_CLOCK_SKEW_MS {
            return Err(unauthenticated(format!(
                "Date header '{date}' is more than 15 minutes from the host clock; sync the client's clock and sign again"
            )));
        }
        let expected = hmac_sha1(
            secret,
            &string_to_sign(
                req.method,
                req.content_md5.unwrap_or(""),
                req.content_type.unwrap_or(""),
                date,
                req.path_and_query,
            ),
        );
        let given = B64.decode(signature.trim()).unwrap_or_default();
        if !constant_time_eq(&expected, &given) {
            return Err(unauthenticated(
                "signature does not match: sign METHOD\\nContent-MD5\\nContent-Type\\nDate\\nPath-and-query with HMAC-SHA1 and the secret key, then Base64",
            ));
        }
        Ok(principal.clone())
    }
}

impl Authenticator {
    /// For front ends with their own signing scheme (MQTT passwords, ONS signatures): checks that
    /// `signature` (Base64) is HMAC-SHA1 of `data` under `access_key`'s secret and returns the key's
    /// principal. The error says which part failed without echoing any secret.
    pub fn verify_hmac(
        &self,
        access_key: &str,
        data: &[u8],
        signature: &str,
    ) -> Result<Arc<Principal>, WharfError> {
        let (secret, principal) = self.keys.get(access_key).ok_or_else(|| {
            unauthenticated(format!(
                "unknown access key '{access_key}'; use a key listed in the host's [[auth.keys]]"
            ))
        })?;
        let expected = hmac_sha1_bytes(secret.as_bytes(), data);
        let given = B64.decode(signature.trim()).unwrap_or_default();
        if !constant_time_eq(&expected, &given) {
            return Err(unauthenticated(format!(
                "signature for access key '{access_key}' does not match: it must be Base64(HMAC-SHA1(SecretKey, signed data))"
            )));
        }
        Ok(principal.clone())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[test]
    fn hmac_sha1_matches_rfc_2202() {
        // RFC 2202 test case 2: key "Jefe".
        assert_eq!(
            hex::encode(hmac_sha1("Jefe", "what do ya want for nothing?")),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
    }

    #[test]
    fn fixed_vector() {
        let sts = string_to_sign(
            "POST",
            "",
            "application/json",
            "Wed, 25 Nov 2026 17:00:00 GMT",
            "/v1/topics/Trade/messages",
        );
        assert_eq!(
            sts,
            "POST\n\napplication/json\nWed, 25 Nov 2026 17:00:00 GMT\n/v1/topics/Trade/messages"
        );
        // Computed independently (python: base64(hmac.new(b"secret", sts, sha1).digest())).
        assert_eq!(sign("secret", &sts), "githGth5WcCrGcVq6s/PpyoDzu0=");
    }

    fn auth(now_ms: u64) -> Authenticator {
        let cfg = AuthConfig {
            keys: vec![AccessKey {
                access_key: "AK".into(),
                secret_key: "SK".into(),
                allow_publish: vec!["Trade".into()],
                allow_subscribe: vec!["*".into()],
                admin: false,
            }],
            metrics_open: false,
        };
        Authenticator::new(&cfg, ManualClock::new(now_ms))
    }

    const DATE: &str = "Wed, 25 Nov 2026 17:00:00 GMT";
    const DATE_MS: u64 = 1_795_626_000_000;

    fn signed<'a>(date: &'a str, header: &'a str) -> SignedParts<'a> {
        SignedParts {
            method: "GET",
            path_and_query: "/v1/topics?x=1",
            authorization: Some(header),
            date: Some(date),
            content_md5: None,
            content_type: None,
        }
    }

    fn header_for(secret: &str, date: &str) -> String {
        let sig = sign(
            secret,
            &string_to_sign("GET", "", "", date, "/v1/topics?x=1"),
        );
        format!("WHARF AK:{sig}")
    }

    #[test]
    fn good_signature_passes_and_carries_permissions() {
        assert_eq!(
            httpdate::parse_http_date(DATE)
                .unwrap()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
            DATE_MS
        );
        let a = auth(DATE_MS);
        let h = header_for("SK", DATE);
        let p = a.authenticate(&signed(DATE, &h)).unwrap();
        assert!(p.check_publish("Trade").is_ok());
        let e = p.check_publish("Other").unwrap_err();
        assert_eq!((e.code.code(), e.http_status()), (16, 403));
        assert!(p.check_subscribe("group", "GID_any").is_ok());
        assert_eq!(
            p.check_admin("create topics").unwrap_err().http_status(),
            403
        );
    }

    #[test]
    fn clock_skew_rule_is_fifteen_minutes_either_way() {
        let h = header_for("SK", DATE);
        for (offset, ok) in [
            (0i64, true),
            (MAX_CLOCK_SKEW_MS as i64, true),
            (-(MAX_CLOCK_SKEW_MS as i64), true),
            (MAX_CLOCK_SKEW_MS as i64 + 1000, false),
            (-(MAX_CLOCK_SKEW_MS as i64) - 1000, false),
        ] {
            let a = auth((DATE_MS as i64 + offset) as u64);
            let r = a.authenticate(&signed(DATE, &h));
            assert_eq!(r.is_ok(), ok, "offset {offset}");
            if let Err(e) = r {
                assert_eq!(e.http_status(), 401);
                assert!(e.message.contains("15 minutes"));
            }
        }
    }

    #[test]
    fn wrong_missing_or_malformed_credentials_are_401() {
        let a = auth(DATE_MS);
        let bad = [
            header_for("wrong", DATE),
            "WHARF AK".to_string(),
            "Basic abc".to_string(),
            "WHARF NOPE:abc".to_string(),
        ];
        for h in &bad {
            let e = a.authenticate(&signed(DATE, h)).unwrap_err();
            assert_eq!(e.http_status(), 401, "{h}");
        }
        let mut p = signed(DATE, "");
        p.authorization = None;
        assert_eq!(a.authenticate(&p).unwrap_err().http_status(), 401);
        let h = header_for("SK", DATE);
        let mut p = signed(DATE, &h);
        p.date = None;
        assert_eq!(a.authenticate(&p).unwrap_err().http_status(), 401);
        // Changing any signed part breaks the signature.
        let mut p = signed(DATE, &h);
        p.path_and_query = "/v1/topics?x=2";
        assert_eq!(a.authenticate(&p).unwrap_err().http_status(), 401);
    }

    #[test]
    fn resend_needs_publish_to_the_topic_and_queries_need_some_read_right() {
        let key = |publish: &[&str], subscribe: &[&str]| {
            Principal::from_key(&AccessKey {
                access_key: "AK".into(),
                secret_key: "SK".into(),
                allow_publish: publish.iter().map(|s| s.to_string()).collect(),
                allow_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
                admin: false,
            })
        };
        let reader = key(&[], &["*"]);
        let e = reader.check_resend("GID_a", "Trade").unwrap_err();
        assert_eq!((e.code.code(), e.http_status()), (16, 403));
        assert!(e.message.contains("allow_publish") && e.message.contains("\"Trade\""));
        assert!(!reader.publishes_all());
        // Publishing for the group's name is not the right: the topic is.
        assert!(key(&["GID_a"], &[]).check_resend("GID_a", "Trade").is_err());
        assert!(key(&["Trade"], &[]).check_resend("GID_a", "Trade").is_ok());
        assert!(key(&["*"], &[]).publishes_all());
        assert!(reader.check_subscribe_any("query").is_ok() && reader.subscribes_all());
        let nothing = key(&["*"], &[]);
        assert_eq!(
            nothing
                .check_subscribe_any("query")
                .unwrap_err()
                .http_status(),
            403
        );
        let some = key(&[], &["Trade"]);
        assert!(some.check_subscribe_any("query").is_ok() && !some.subscribes_all());
        assert!(some.may_subscribe("Trade") && !some.may_subscribe("Other"));
    }

    #[test]
    fn open_host_allows_everything() {
        let a = Authenticator::new(&AuthConfig::default(), ManualClock::new(0));
        assert!(a.is_open());
        let p = a.authenticate(&SignedParts::default()).unwrap();
        assert!(p.check_publish("x").is_ok() && p.check_admin("x").is_ok());
    }
}
