//! Topic names and filters (MQTT 3.1.1 §4.7): validation, and the subscription trie the router
//! matches every message against.

use std::collections::HashMap;
use std::hash::Hash;

/// Checks a topic name a client publishes to: non-empty and free of wildcards [MQTT-3.3.2-2].
pub fn check_topic_name(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("topic name is empty [MQTT-4.7.3-1]".into());
    }
    if topic.contains(['+', '#']) {
        return Err(format!(
            "topic name '{topic}' contains a wildcard; wildcards are for SUBSCRIBE only [MQTT-3.3.2-2]"
        ));
    }
    Ok(())
}

/// Checks a topic filter: `#` alone in the last level, `+` alone in its level [MQTT-4.7.1-2/3].
pub fn check_filter(filter: &str) -> Result<(), String> {
    if filter.is_empty() {
        return Err("topic filter is empty [MQTT-4.7.3-1]".into());
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(format!(
                "topic filter '{filter}': '#' must be a whole level and the last one [MQTT-4.7.1-2]"
            ));
        }
        if level.contains('+') && level != "+" {
            return Err(format!(
                "topic filter '{filter}': '+' must be a whole level [MQTT-4.7.1-3]"
            ));
        }
    }
    Ok(())
}

/// True when `filter` matches `topic` (both valid). Wildcards at the first level never match a
/// topic starting with `$` [MQTT-4.7.2-1].
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The first level of a topic or filter (`Parent` of `Parent/a/b`).
pub fn first_level(topic: &str) -> &str {
    topic.split('/').next().unwrap_or(topic)
}

/// Subscriptions by filter; each subscriber `K` holds a value `V` (its granted QoS) per filter.
#[derive(Debug)]
pub struct Trie<K, V> {
    root: Node<K, V>,
    len: usize,
}

#[derive(Debug)]
struct Node<K, V> {
    children: HashMap<String, Node<K, V>>,
    plus: Option<Box<Node<K, V>>>,
    /// Subscribers whose filter ends here.
    exact: HashMap<K, V>,
    /// Subscribers whose filter ends with `#` below this level.
    hash: HashMap<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Node {
            children: HashMap::new(),
            plus: None,
            exact: HashMap::new(),
            hash: HashMap::new(),
        }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.plus.is_none()
            && self.exact.is_empty()
            && self.hash.is_empty()
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Default for Trie<K, V> {
    fn default() -> Self {
        Trie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Trie<K, V> {
    /// Adds or replaces `key`'s subscription to `filter` (valid).
    pub fn insert(&mut self, filter: &str, key: K, value: V) {
        let mut node = &mut self.root;
        let mut levels = filter.split('/').peekable();
        while let Some(level) = levels.next() {
            if level == "#" {
                if node.hash.insert(key, value).is_none() {
                    self.len += 1;
                }
                return;
            }
            node = if level == "+" {
                node.plus.get_or_insert_with(Default::default)
            } else {
                node.children.entry(level.to_owned()).or_default()
            };
            if levels.peek().is_none() {
                if node.exact.insert(key, value).is_none() {
                    self.len += 1;
                }
                return;
            }
        }
    }

    /// Removes `key`'s subscription to `filter`; true when it existed. Empty branches are pruned.
    pub fn remove(&mut self, filter: &str, key: &K) -> bool {
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = remove_at(&mut self.root, &levels, key);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Number of (filter, subscriber) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is subscribed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` for every subscription matching `topic` (a subscriber appears once per
    /// matching filter).
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(&K, &V)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        walk(&self.root, &levels, 0, dollar, &mut f);
    }
}

fn walk<K, V>(
    node: &Node<K, V>,
    levels: &[&str],
    depth: usize,
    dollar: bool,
    f: &mut impl FnMut(&K, &V),
) {
    let wild_ok = !(dollar && depth == 0);
    if wild_ok {
        // `a/#` also matches `a` itself [MQTT-4.7.1-2].
        for (k, v) in &node.hash {
            f(k, v);
        }
    }
    let Some((level, rest)) = levels.split_first() else {
        for (k, v) in &node.exact {
            f(k, v);
        }
        return;
    };
    if let Some(child) = node.children.get(*level) {
        walk(child, rest, depth + 1, dollar, f);
    }
    if wild_ok && let Some(plus) = &node.plus {
        walk(plus, rest, depth + 1, dollar, f);
    }
}

fn remove_at<K: Eq + Hash, V>(node: &mut Node<K, V>, levels: &[&str], key: &K) -> bool {
    let Some((level, rest)) = levels.split_first() else {
        return false;
    };
    if *level == "#" {
        return node.hash.remove(key).is_some();
    }
    if *level == "+" {
        let Some(child) = node.plus.as_deref_mut() else {
            return false;
        };
        let removed = if rest.is_empty() {
            child.exact.remove(key).is_some()
        } else {
            remove_at(child, rest, key)
        };
        if child.is_empty() {
            node.plus = None;
        }
        removed
    } else {
        let Some(child) = node.children.get_mut(*level) else {
            return false;
        };
        let removed = if rest.is_empty() {
            child.exact.remove(key).is_some()
        } else {
            remove_at(child, rest, key)
        };
        if child.is_empty() {
            node.children.remove(*level);
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn filters_and_names() {
        for ok in ["#", "+", "a/#", "a/+/b", "+/+", "/", "a//b", "$SYS/#"] {
            assert!(check_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+/c", "##"] {
            assert!(check_filter(bad).is_err(), "{bad}");
        }
        assert!(check_topic_name("a/b").is_ok());
        assert!(check_topic_name("a/+").is_err());
        assert!(check_topic_name("").is_err());
    }

    #[test]
    fn matching_follows_the_spec_examples() {
        assert!(matches("sport/tennis/player1/#", "sport/tennis/player1"));
        assert!(matches(
            "sport/tennis/player1/#",
            "sport/tennis/player1/ranking"
        ));
        assert!(matches("sport/#", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(!matches("#", "$SYS/x"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
    }

    #[test]
    fn trie_insert_match_remove() {
        let mut t: Trie<u32, u8> = Trie::default();
        t.insert("a/+", 1, 0);
        t.insert("a/#", 2, 1);
        t.insert("a/b", 3, 2);
        t.insert("#", 4, 0);
        t.insert("a/b", 3, 1); // replaces
        assert_eq!(t.len(), 4);
        let mut got = Vec::new();
        t.for_each_match("a/b", |k, v| got.push((*k, *v)));
        got.sort();
        assert_eq!(got, vec![(1, 0), (2, 1), (3, 1), (4, 0)]);
        let mut got = Vec::new();
        t.for_each_match("$x/b", |k, _| got.push(*k));
        assert!(got.is_empty());
        assert!(t.remove("a/b", &3));
        assert!(!t.remove("a/b", &3));
        assert!(t.remove("a/+", &1));
        assert!(t.remove("a/#", &2));
        assert!(t.remove("#", &4));
        assert!(t.is_empty());
        assert!(t.root.is_empty(), "branches pruned");
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".into()),
            Just("".into()),
            Just("$s".into())
        ]
    }

    proptest! {
        #[test]
        fn trie_agrees_with_matches(
            filters in proptest::collection::vec(proptest::collection::vec(prop_oneof![level(), Just("+".into())], 1..4).prop_flat_map(|l| (Just(l), any::<bool>())), 1..10),
            topic in proptest::collection::vec(level(), 1..5),
        ) {
            let filters: Vec<String> = filters.into_iter().map(|(mut l, hash)| { if hash { l.push("#".into()); } l.join("/") }).collect();
            let topic = topic.join("/");
            let mut t: Trie<usize, ()> = Trie::default();
            for (i, f) in filters.iter().enumerate() {
                prop_assume!(check_filter(f).is_ok());
                t.insert(f, i, ());
            }
            let mut got = Vec::new();
            t.for_each_match(&topic, |k, _| got.push(*k));
            got.sort();
            let want: Vec<usize> = filters.iter().enumerate().filter(|(_, f)| matches(f, &topic)).map(|(i, _)| i).collect();
            prop_assert_eq!(got, want);
        }
    }
}
