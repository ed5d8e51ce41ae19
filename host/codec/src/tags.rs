//! Tags and tag expressions: the rule for a message's one tag, and the subscription filter
//! syntax `*`, `TagA`, `TagA||TagB||TagC` (spaces around `||` allowed).
//!
//! Both use one rule for a tag, so every tag a producer may set can also be named in an
//! expression: non-empty, not `*`, and no `|`, whitespace or control characters (the last
//! because the tag travels inside the property encoding, whose separators are control bytes).

use std::fmt;

/// What every refused expression is told to look like.
const EXPRESSION_FORMS: &str = "use '*', 'TagA' or 'TagA||TagB'";

/// Why a string is not a tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagProblem {
    /// The tag is empty.
    Empty,
    /// `*` alone means "every tag" in an expression, so it cannot be a tag.
    Star,
    /// It contains `|`, which separates tags in an expression.
    Pipe,
    /// It contains whitespace.
    Whitespace,
    /// It contains a control character.
    Control,
}

impl fmt::Display for TagProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TagProblem::Empty => "it is empty",
            TagProblem::Star => "'*' alone means every tag",
            TagProblem::Pipe => "it contains '|', which separates tags",
            TagProblem::Whitespace => "it contains whitespace",
            TagProblem::Control => "it contains a control character",
        })
    }
}

/// A message tag that breaks the rule, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagError {
    /// The tag as given.
    pub tag: String,
    /// What is wrong with it.
    pub problem: TagProblem,
}

impl fmt::Display for TagError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tag '{}' is not allowed: {}; a tag is one word without '|', whitespace or control characters, and not '*'",
            self.tag.escape_debug(),
            self.problem
        )
    }
}

impl std::error::Error for TagError {}

fn tag_problem(tag: &str) -> Option<TagProblem> {
    if tag.is_empty() {
        Some(TagProblem::Empty)
    } else if tag == "*" {
        Some(TagProblem::Star)
    } else if tag.contains('|') {
        Some(TagProblem::Pipe)
    } else if tag.chars().any(char::is_whitespace) {
        Some(TagProblem::Whitespace)
    } else if tag.chars().any(char::is_control) {
        Some(TagProblem::Control)
    } else {
        None
    }
}

/// Checks a message's tag against the rule.
pub fn check_tag(tag: &str) -> Result<(), TagError> {
    match tag_problem(tag) {
        None => Ok(()),
        Some(problem) => Err(TagError {
            tag: tag.to_string(),
            problem,
        }),
    }
}

/// Why an expression does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpressionProblem {
    /// Nothing but whitespace.
    Empty,
    /// Two `||` with nothing between them, or one at an end.
    EmptyTag,
    /// `*` next to tags.
    StarWithTags,
    /// A single `|` where `||` was meant.
    SinglePipe,
    /// A tag breaks the tag rule otherwise.
    BadTag {
        /// The tag.
        tag: String,
        /// What is wrong with it.
        problem: TagProblem,
    },
}

impl fmt::Display for ExpressionProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpressionProblem::Empty => f.write_str("it is empty"),
            ExpressionProblem::EmptyTag => f.write_str("a tag between '||' separators is empty"),
            ExpressionProblem::StarWithTags => f.write_str("'*' cannot be combined with tags"),
            ExpressionProblem::SinglePipe => {
                f.write_str("tags are separated by '||', not a single '|'")
            }
            ExpressionProblem::BadTag { tag, problem } => {
                write!(f, "tag '{}': {problem}", tag.escape_debug())
            }
        }
    }
}

/// An expression that does not parse; the host reports it as `SUBSCRIPTION_PARSE_FAILED` (23).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpressionError {
    /// The expression as given.
    pub expression: String,
    /// What is wrong with it.
    pub problem: ExpressionProblem,
}

impl fmt::Display for ExpressionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tag expression '{}' is invalid: {}; {EXPRESSION_FORMS}",
            self.expression.escape_debug(),
            self.problem
        )
    }
}

impl std::error::Error for ExpressionError {}

/// A parsed tag expression.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TagExpression {
    /// `*`: every message, tagged or not.
    All,
    /// One or more exact tags, de-duplicated, in expression order; an untagged message never
    /// matches.
    Tags(Vec<String>),
}

impl TagExpression {
    /// Parses `*`, `TagA` or `TagA||TagB||…`, with optional spaces around each part.
    pub fn parse(expression: &str) -> Result<TagExpression, ExpressionError> {
        let fail = |problem| ExpressionError {
            expression: expression.to_string(),
            problem,
        };
        let expr = expression.trim();
        if expr == "*" {
            return Ok(TagExpression::All);
        }
        if expr.is_empty() {
            return Err(fail(ExpressionProblem::Empty));
        }
        let mut tags: Vec<String> = Vec::new();
        for part in expr.split("||") {
            let tag = part.trim();
            match tag_problem(tag) {
                None => {}
                Some(TagProblem::Empty) => return Err(fail(ExpressionProblem::EmptyTag)),
                Some(TagProblem::Star) => return Err(fail(ExpressionProblem::StarWithTags)),
                Some(TagProblem::Pipe) => return Err(fail(ExpressionProblem::SinglePipe)),
                Some(problem) => {
                    return Err(fail(ExpressionProblem::BadTag {
                        tag: tag.to_string(),
                        problem,
                    }));
                }
            }
            if !tags.iter().any(|t| t == tag) {
                tags.push(tag.to_string());
            }
        }
        Ok(TagExpression::Tags(tags))
    }

    /// The listed tags (empty for `*`).
    pub fn tags(&self) -> &[String] {
        match self {
            TagExpression::All => &[],
            TagExpression::Tags(tags) => tags,
        }
    }

    /// Whether a message with this tag passes.
    pub fn matches(&self, tag: Option<&str>) -> bool {
        match self {
            TagExpression::All => true,
            TagExpression::Tags(tags) => tag.is_some_and(|t| tags.iter().any(|x| x == t)),
        }
    }

    /// The expression in canonical form (`*`, or tags sorted and joined by `||`), so two
    /// subscriptions compare equal exactly when they select the same messages.
    pub fn canonical(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for TagExpression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TagExpression::All => f.write_str("*"),
            TagExpression::Tags(tags) => {
                let mut sorted: Vec<&str> = tags.iter().map(String::as_str).collect();
                sorted.sort_unstable();
                f.write_str(&sorted.join("||"))
            }
        }
    }
}

impl std::str::FromStr for TagExpression {
    type Err = ExpressionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TagExpression::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tags(t: &[&str]) -> TagExpression {
        TagExpression::Tags(t.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn parses_the_three_forms() {
        assert_eq!(TagExpression::parse("*").unwrap(), TagExpression::All);
        assert_eq!(TagExpression::parse(" * ").unwrap(), TagExpression::All);
        assert_eq!(TagExpression::parse("TagA").unwrap(), tags(&["TagA"]));
        let many = TagExpression::parse("TagB||TagA || TagC||TagA").unwrap();
        assert_eq!(many, tags(&["TagB", "TagA", "TagC"]));
        assert_eq!(many.canonical(), "TagA||TagB||TagC");
        assert_eq!(many.tags().len(), 3);
        assert!(TagExpression::All.tags().is_empty());
    }

    #[test]
    fn bad_expressions_say_why_and_what_to_write() {
        let cases = [
            ("", ExpressionProblem::Empty),
            ("  ", ExpressionProblem::Empty),
            ("A||", ExpressionProblem::EmptyTag),
            ("||A", ExpressionProblem::EmptyTag),
            ("A|| ||B", ExpressionProblem::EmptyTag),
            ("A|B", ExpressionProblem::SinglePipe),
            ("A|||B", ExpressionProblem::SinglePipe),
            ("*||A", ExpressionProblem::StarWithTags),
        ];
        for (input, problem) in cases {
            let e = TagExpression::parse(input).unwrap_err();
            assert_eq!(e.problem, problem, "{input:?}");
            assert!(
                e.to_string().contains("use '*', 'TagA' or 'TagA||TagB'"),
                "{e}"
            );
        }
        let e = TagExpression::parse("A B").unwrap_err();
        assert_eq!(
            e.problem,
            ExpressionProblem::BadTag {
                tag: "A B".into(),
                problem: TagProblem::Whitespace
            }
        );
        assert_eq!(
            e.to_string(),
            "tag expression 'A B' is invalid: tag 'A B': it contains whitespace; use '*', 'TagA' or 'TagA||TagB'"
        );
    }

    #[test]
    fn matching_is_exact() {
        let f = TagExpression::parse("order||pay").unwrap();
        assert!(f.matches(Some("order")));
        assert!(f.matches(Some("pay")));
        assert!(!f.matches(Some("refund")));
        assert!(!f.matches(Some("Order")));
        assert!(!f.matches(None));
        assert!(TagExpression::All.matches(None));
        assert!(TagExpression::All.matches(Some("x")));
    }

    #[test]
    fn the_tag_rule() {
        assert!(check_tag("order").is_ok());
        assert!(check_tag("订单-1.x_y").is_ok());
        for (bad, problem) in [
            ("", TagProblem::Empty),
            ("*", TagProblem::Star),
            ("a|b", TagProblem::Pipe),
            ("a||b", TagProblem::Pipe),
            (" a", TagProblem::Whitespace),
            ("a b", TagProblem::Whitespace),
            ("a\u{1}", TagProblem::Control),
        ] {
            assert_eq!(check_tag(bad).unwrap_err().problem, problem, "{bad:?}");
        }
        let e = check_tag("a b").unwrap_err();
        assert!(e.to_string().starts_with("tag 'a b' is not allowed"), "{e}");
    }

    proptest! {
        #[test]
        fn any_input_parses_or_fails(input in "\\PC{0,40}") {
            if let Ok(f) = TagExpression::parse(&input) {
                // The canonical form parses back to the same selection.
                let again = TagExpression::parse(&f.canonical()).unwrap();
                prop_assert_eq!(again.canonical(), f.canonical());
                for t in f.tags() {
                    prop_assert!(check_tag(t).is_ok());
                }
            }
        }

        #[test]
        fn joined_tags_match_exactly_their_members(
            tags in proptest::collection::vec("[A-Za-z0-9_]{1,8}", 1..6),
            spaced in any::<bool>(),
            probe in "[A-Za-z0-9_]{1,8}",
        ) {
            let f = TagExpression::parse(&tags.join(if spaced { " || " } else { "||" })).unwrap();
            for t in &tags {
                prop_assert!(f.matches(Some(t)));
            }
            prop_assert_eq!(f.matches(Some(&probe)), tags.contains(&probe));
            prop_assert!(!f.matches(None));
        }

        #[test]
        fn every_allowed_tag_can_be_subscribed(tag in "\\PC{1,12}") {
            if check_tag(&tag).is_ok() {
                let f = TagExpression::parse(&tag).unwrap();
                prop_assert!(f.matches(Some(&tag)));
            }
        }
    }
}
