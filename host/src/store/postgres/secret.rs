//! Keeping the database password out of every log line and error message.
//!
//! The URL's password is known only here; everything the PostgreSQL backend shows a user (its
//! errors, its log fields) goes through [`Redactor::redact`] or [`redacted_url`] first.

/// What a redacted password is replaced with.
pub const MASK: &str = "***";

/// The URL with its password replaced by [`MASK`] (`postgres://u:***@host/db`); the URL is
/// otherwise unchanged, so the user still sees which database is meant.
pub fn redacted_url(url: &str) -> String {
    match password_span(url) {
        Some((start, end)) => format!("{}{MASK}{}", &url[..start], &url[end..]),
        None => url.to_string(),
    }
}

/// Byte range of the password inside `scheme://user:password@host/...`, if there is one.
fn password_span(url: &str) -> Option<(usize, usize)> {
    let after_scheme = url.find("://")? + 3;
    let rest = &url[after_scheme..];
    // The authority ends at the first '/', '?' or '#'; the user info at its last '@'.
    let authority_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let at = rest[..authority_len].rfind('@')?;
    let colon = rest[..at].find(':')?;
    let (start, end) = (after_scheme + colon + 1, after_scheme + at);
    (start < end).then_some((start, end))
}

/// Decodes `%XX` escapes (what the driver sends as the password); invalid escapes stay as-is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes one URL's password (as written and percent-decoded) from any text.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redactor(..)")
    }
}

impl Redactor {
    /// A redactor for the password of `url` (none when the URL has no password).
    pub fn for_url(url: &str) -> Redactor {
        let mut secrets = Vec::new();
        if let Some((s, e)) = password_span(url) {
            let raw = url[s..e].to_string();
            let decoded = percent_decode(&raw);
            if decoded != raw && !decoded.is_empty() {
                secrets.push(decoded);
            }
            secrets.push(raw);
        }
        // Longest first, so a password that contains the other form is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Redactor { secrets }
    }

    /// `text` with every occurrence of the password replaced by [`MASK`].
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_password_is_masked_and_nothing_else() {
        let u = "postgres://wharf:s3cr%40t@db.example:5432/wharf?sslmode=disable";
        assert_eq!(
            redacted_url(u),
            "postgres://wharf:***@db.example:5432/wharf?sslmode=disable"
        );
        let r = Redactor::for_url(u);
        assert_eq!(
            r.redact("auth failed for s3cr@t and s3cr%40t"),
            "auth failed for *** and ***"
        );
        for plain in [
            "postgres://wharf@db/wharf",
            "postgres://db/wharf",
            "postgresql://:@db/x",
            "postgres://db/path@x:y",
            "not a url",
        ] {
            assert_eq!(redacted_url(plain), plain, "{plain}");
        }
        assert_eq!(Redactor::for_url("postgres://db/x").redact("abc"), "abc");
        assert_eq!(format!("{r:?}"), "Redactor(..)");
    }

    proptest! {
        // '*' is left out of the alphabet: a password made of mask characters is "found" in
        // the mask itself.
        #[test]
        fn no_password_survives(pw in "[A-Za-z0-9!$&'()+,;=._~-]{1,24}", host in "[a-z]{1,10}") {
            let url = format!("postgres://user:{pw}@{host}:5432/db");
            let shown = redacted_url(&url);
            let exposed = format!(":{pw}@");
            prop_assert!(!shown.contains(&exposed));
            prop_assert!(shown.contains(&host));
            let r = Redactor::for_url(&url);
            let text = format!("error near {pw} in {url}");
            prop_assert!(!r.redact(&text).contains(&pw));
        }
    }
}
