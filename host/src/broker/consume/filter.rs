//! The broker-side tag filter: a parsed tag expression plus the tag hashes the store's index
//! filters by.
//!
//! Parsing is `wharf_codec::tags` (one parser and one wording for the broker, plugin manifests
//! and the remoting front end). The store filters by 32-bit tag hash so it never reads bodies of
//! excluded messages; hashes can collide, so every candidate is checked again against the exact
//! tag here.

use wharf_codec::tags::TagExpression;

use crate::error::Result;
use crate::model::tag_hash;

/// A parsed tag expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    /// `*`: every message, tagged or not.
    All,
    /// One or more exact tags; an untagged message never matches.
    Tags {
        /// The tags, de-duplicated, in expression order.
        tags: Vec<String>,
        /// Their hashes, for the store's index filter.
        hashes: Vec<u32>,
    },
}

impl TagFilter {
    /// Parses `*`, `TagA` or `TagA||TagB||…`; anything else is `SUBSCRIPTION_PARSE_FAILED`.
    pub fn parse(expression: &str) -> Result<TagFilter> {
        Ok(match TagExpression::parse(expression)? {
            TagExpression::All => TagFilter::All,
            TagExpression::Tags(tags) => {
                let hashes = tags.iter().map(|t| tag_hash(Some(t))).collect();
                TagFilter::Tags { tags, hashes }
            }
        })
    }

    /// Hashes to hand to `Store::read_queue` (`None` = no filtering).
    pub fn hashes(&self) -> Option<&[u32]> {
        match self {
            TagFilter::All => None,
            TagFilter::Tags { hashes, .. } => Some(hashes),
        }
    }

    /// Exact check of one message's tag.
    pub fn matches(&self, tag: Option<&str>) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::Tags { tags, .. } => tag.is_some_and(|t| tags.iter().any(|x| x == t)),
        }
    }

    /// The expression in canonical form (tags sorted, `TagA||TagB`), to compare subscriptions.
    pub fn canonical(&self) -> String {
        match self {
            TagFilter::All => TagExpression::All.canonical(),
            TagFilter::Tags { tags, .. } => TagExpression::Tags(tags.clone()).canonical(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(TagFilter::parse("*").unwrap(), TagFilter::All);
        assert_eq!(TagFilter::parse(" * ").unwrap(), TagFilter::All);
        let one = TagFilter::parse("TagA").unwrap();
        assert_eq!(one.hashes(), Some(&[tag_hash(Some("TagA"))][..]));
        let many = TagFilter::parse("TagA||TagB || TagC||TagA").unwrap();
        assert_eq!(many.canonical(), "TagA||TagB||TagC");
        assert_eq!(many.hashes().map(<[u32]>::len), Some(3));
    }

    #[test]
    fn bad_expressions_fail_with_code_23() {
        for bad in ["", "  ", "A||", "||A", "A||||B", "A|B", "*||A", "A B"] {
            let e = TagFilter::parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::SubscriptionParseFailed, "{bad:?}");
            assert_eq!(e.code.code(), 23);
            assert!(e.message.contains("TagA||TagB"), "{}", e.message);
        }
    }

    #[test]
    fn exact_matching() {
        let f = TagFilter::parse("order||pay").unwrap();
        assert!(f.matches(Some("order")));
        assert!(f.matches(Some("pay")));
        assert!(!f.matches(Some("refund")));
        assert!(!f.matches(Some("Order")));
        assert!(!f.matches(None));
        assert!(TagFilter::All.matches(None));
        assert!(TagFilter::All.matches(Some("x")));
    }

    proptest::proptest! {
        #[test]
        fn any_input_parses_or_fails_with_code_23(input in "\\PC{0,40}") {
            match TagFilter::parse(&input) {
                Ok(f) => {
                    // Canonical forms parse back to the same filter (up to tag order).
                    let again = TagFilter::parse(&f.canonical()).unwrap();
                    proptest::prop_assert_eq!(again.canonical(), f.canonical());
                }
                Err(e) => proptest::prop_assert_eq!(e.code, ErrorCode::SubscriptionParseFailed),
            }
        }

        #[test]
        fn joined_tags_match_exactly_their_members(
            tags in proptest::collection::vec("[A-Za-z0-9_]{1,8}", 1..6),
            probe in "[A-Za-z0-9_]{1,8}",
        ) {
            let f = TagFilter::parse(&tags.join("||")).unwrap();
            for t in &tags {
                proptest::prop_assert!(f.matches(Some(t)));
            }
            proptest::prop_assert_eq!(f.matches(Some(&probe)), tags.contains(&probe));
            proptest::prop_assert!(!f.matches(None));
        }
    }
}
