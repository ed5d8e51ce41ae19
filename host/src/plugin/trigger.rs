//! HTTP triggers: `[[http]]` routes turn `POST /t<path>` into a message.
//!
//! A route names the topic and tag; `headers` lists request headers copied into properties of
//! the same lower-case name (absent headers are skipped); `key_header` names a header whose value
//! becomes the message key. The body is the request body as is.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::manifest::HttpRoute;
use crate::broker::OutgoingMessage;

/// Every deployed route, by path.
#[derive(Default)]
pub struct Routes {
    by_path: parking_lot::RwLock<BTreeMap<String, (String, HttpRoute)>>,
}

impl Routes {
    /// The first path in `routes` that a plugin other than `plugin` serves, with its owner.
    pub fn conflict(&self, plugin: &str, routes: &[HttpRoute]) -> Option<(String, String)> {
        let by_path = self.by_path.read();
        routes.iter().find_map(|r| {
            by_path
                .get(&r.path)
                .filter(|(owner, _)| owner != plugin)
                .map(|(owner, _)| (r.path.clone(), owner.clone()))
        })
    }

    /// Makes `routes` the plugin's routes (replacing its earlier ones).
    pub fn install(&self, plugin: &str, routes: &[HttpRoute]) {
        let mut by_path = self.by_path.write();
        by_path.retain(|_, (owner, _)| owner != plugin);
        for r in routes {
            by_path.insert(r.path.clone(), (plugin.to_string(), r.clone()));
        }
    }

    /// Drops the plugin's routes.
    pub fn remove(&self, plugin: &str) {
        self.by_path.write().retain(|_, (owner, _)| owner != plugin);
    }

    /// The topic and message for a request to `path`, or `None` when no route serves it.
    pub fn message(
        &self,
        path: &str,
        headers: &[(String, String)],
        body: Bytes,
    ) -> Option<(String, OutgoingMessage)> {
        let by_path = self.by_path.read();
        let (_, route) = by_path.get(path)?;
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let properties = route
            .headers
            .iter()
            .filter_map(|h| header(h).map(|v| (h.clone(), v)))
            .collect();
        let keys = route
            .key_header
            .as_deref()
            .and_then(header)
            .into_iter()
            .collect();
        Some((
            route.topic.clone(),
            OutgoingMessage {
                tag: route.tag.clone(),
                keys,
                properties,
                body,
                ..OutgoingMessage::default()
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str) -> HttpRoute {
        HttpRoute {
            path: path.into(),
            topic: "Trade".into(),
            tag: Some("order".into()),
            headers: vec!["x-request-id".into(), "x-absent".into()],
            key_header: Some("x-order-id".into()),
        }
    }

    #[test]
    fn routes_belong_to_one_plugin() {
        let r = Routes::default();
        r.install("a", &[route("/hooks/orders")]);
        assert_eq!(
            r.conflict("b", &[route("/hooks/orders")]),
            Some(("/hooks/orders".into(), "a".into()))
        );
        assert_eq!(
            r.conflict("a", &[route("/hooks/orders")]),
            None,
            "a new version may keep its paths"
        );
        r.install("a", &[route("/hooks/other")]);
        assert!(
            r.message("/hooks/orders", &[], Bytes::from_static(b"x"))
                .is_none()
        );
        r.remove("a");
        assert!(
            r.message("/hooks/other", &[], Bytes::from_static(b"x"))
                .is_none()
        );
    }

    #[test]
    fn request_becomes_message() {
        let r = Routes::default();
        r.install("a", &[route("/hooks/orders")]);
        let headers = vec![
            ("x-request-id".to_string(), "r-1".to_string()),
            ("x-order-id".to_string(), "o-9".to_string()),
            ("authorization".to_string(), "secret".to_string()),
        ];
        let (topic, m) = r
            .message("/hooks/orders", &headers, Bytes::from_static(b"{}"))
            .unwrap();
        assert_eq!(topic, "Trade");
        assert_eq!(m.tag.as_deref(), Some("order"));
        assert_eq!(m.keys, vec!["o-9".to_string()]);
        assert_eq!(
            m.properties.len(),
            1,
            "only listed headers that are present"
        );
        assert_eq!(m.properties["x-request-id"], "r-1");
        assert_eq!(m.body, Bytes::from_static(b"{}"));
    }
}
