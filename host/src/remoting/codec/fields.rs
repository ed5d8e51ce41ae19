//! A command's `extFields`: name → value text, kept in name order (the order clients sign them
//! in). All names and values share one text buffer, so a request's dozen fields cost two
//! allocations instead of two dozen Strings and a tree; lookups are binary searches.

use std::fmt::{self, Write as _};

use serde::ser::{Serialize, SerializeMap, Serializer};

/// Header fields of one command.
#[derive(Clone, Default)]
pub struct Fields {
    /// Names and values, back to back; a replaced field leaves its old text unused.
    text: String,
    /// Per field, sorted by name: where its name starts, where its value starts (the name's
    /// end) and where the value ends, in `text`.
    spans: Vec<(u32, u32, u32)>,
}

impl Fields {
    /// No fields.
    pub fn new() -> Fields {
        Fields::default()
    }

    /// How many fields there are.
    pub fn len(&self) -> usize {
        self.spans.len()
    }

    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    fn name_at(&self, i: usize) -> &str {
        let (a, b, _) = self.spans[i];
        &self.text[a as usize..b as usize]
    }

    fn value_at(&self, i: usize) -> &str {
        let (_, b, c) = self.spans[i];
        &self.text[b as usize..c as usize]
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.spans
            .binary_search_by(|&(a, b, _)| self.text[a as usize..b as usize].cmp(name))
    }

    /// The value of `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.find(name).ok().map(|i| self.value_at(i))
    }

    /// Sets `name` to `value`, replacing what it had.
    pub fn insert(&mut self, name: &str, value: &str) {
        self.insert_with(name, |text| text.push_str(value));
    }

    /// Sets `name` to `value` as it displays, written straight into the buffer.
    pub fn insert_display(&mut self, name: &str, value: impl fmt::Display) {
        // Writing to a String cannot fail.
        self.insert_with(name, |text| {
            let _ = write!(text, "{value}");
        });
    }

    fn insert_with(&mut self, name: &str, write_value: impl FnOnce(&mut String)) {
        let slot = self.find(name);
        let a = self.text.len();
        self.text.push_str(name);
        let b = self.text.len();
        write_value(&mut self.text);
        let span = (a as u32, b as u32, self.text.len() as u32);
        match slot {
            // The replaced name and value stay in the buffer, unused.
            Ok(i) => self.spans[i] = span,
            Err(i) => self.spans.insert(i, span),
        }
    }

    /// The fields in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        (0..self.spans.len()).map(|i| (self.name_at(i), self.value_at(i)))
    }
}

impl PartialEq for Fields {
    fn eq(&self, other: &Fields) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl Eq for Fields {}

impl fmt::Debug for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<K: AsRef<str>, V: AsRef<str>> FromIterator<(K, V)> for Fields {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Fields {
        let mut f = Fields::new();
        for (k, v) in iter {
            f.insert(k.as_ref(), v.as_ref());
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    #[test]
    fn keeps_name_order_and_replaces() {
        let mut f = Fields::new();
        f.insert("topic", "T");
        f.insert_display("queueId", 3);
        f.insert("a", "x");
        f.insert("topic", "longer-topic");
        f.insert("", "empty name");
        f.insert("", "again");
        let all: Vec<_> = f.iter().collect();
        assert_eq!(
            all,
            vec![
                ("", "again"),
                ("a", "x"),
                ("queueId", "3"),
                ("topic", "longer-topic")
            ]
        );
        assert_eq!(f.get("queueId"), Some("3"));
        assert_eq!(f.get("missing"), None);
        assert_eq!(
            serde_json::to_string(&f).unwrap(),
            r#"{"":"again","a":"x","queueId":"3","topic":"longer-topic"}"#
        );
    }

    proptest! {
        #[test]
        fn behaves_like_a_sorted_map(ops in prop::collection::vec(("[a-d]{0,3}", "\\PC{0,6}"), 0..40)) {
            let mut f = Fields::new();
            let mut m = BTreeMap::new();
            for (k, v) in &ops {
                f.insert(k, v);
                m.insert(k.clone(), v.clone());
            }
            let got: Vec<(String, String)> =
                f.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let want: Vec<(String, String)> = m.into_iter().collect();
            prop_assert_eq!(got, want);
        }
    }
}
