//! The hub's wire protocol, version 1: JSON text frames. Pure logic (parsing, channel matching,
//! frame building), unit-tested without a network.
//!
//! Client → server:
//! - `{"type":"subscribe","channels":["kv:price:*","table:orders"],"since":41,"id":1}` —
//!   `since` (optional) is the last `seq` the client saw: the events after it are replayed from
//!   the history ring first (or a `gap` frame says which could not be), then live events follow.
//! - `{"type":"unsubscribe","channels":[…],"id":2}`
//! - `{"type":"ping","id":3}`
//! - `{"type":"auth","token":"<JWT>","id":4}` — authenticates (when the token was not in the
//!   URL's `token` parameter) or refreshes the token of an open connection.
//!
//! Server → client:
//! - `{"type":"welcome","protocol":1,"seq":N,"heartbeat":ms}` on connect;
//! - `{"type":"subscribed","id":1,"channels":[…],"seq":N}` once the channels are live (`seq`: the
//!   last event before live delivery starts);
//! - `{"type":"unsubscribed","id":2,"channels":[…]}`, `{"type":"pong","id":3}`,
//!   `{"type":"authenticated","id":4,"exp":…}`;
//! - `{"type":"events","events":[…]}` — a batch of change events, each with its global `seq`;
//! - `{"type":"gap","from":a,"to":b,"reason":…}` — events `a..=b` cannot be delivered (history
//!   exceeded, or dropped for a slow client); the client should reload its state;
//! - `{"type":"error","code":…,"message":…}` before a close.

use serde_json::Value;

use crate::event::{push_json_string, Change, Event};

pub const PROTOCOL_VERSION: u32 = 1;

/// WebSocket close codes the hub uses (documented in the README).
pub mod close {
    /// The server is shutting down.
    pub const GOING_AWAY: u16 = 1001;
    /// A frame that is not a protocol message.
    pub const BAD_MESSAGE: u16 = 4400;
    /// A frame larger than `maxPayload`.
    pub const TOO_BIG: u16 = 1009;
    /// `maxConnections` reached: try again later.
    pub const TRY_LATER: u16 = 1013;
    /// The client's queue passed its bound under the `disconnect` policy.
    pub const SLOW_CONSUMER: u16 = 4408;
    /// More client messages than `rateLimit` allows.
    pub const RATE_LIMITED: u16 = 4429;
    /// No pong within the heartbeat window.
    pub const DEAD_PEER: u16 = 4000;
    /// No valid token: missing, malformed, badly signed, or expired (also while connected).
    pub const UNAUTHENTICATED: u16 = 4401;
    /// A channel the token does not grant.
    pub const FORBIDDEN: u16 = 4403;
}

/// One subscription channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    /// `kv:<key>`: one key.
    Key(String),
    /// `kv:<prefix>*`: keys starting with the prefix (`kv:*`: every key).
    Prefix(String),
    /// `table:<name>`: rows of a watched table or collection (`table:*`: all of them).
    Table(String),
}

impl Channel {
    pub fn parse(s: &str) -> Result<Channel, String> {
        if let Some(k) = s.strip_prefix("kv:") {
            return Ok(match k.strip_suffix('*') {
                Some(p) => Channel::Prefix(p.to_string()),
                None if k.is_empty() => return Err("`kv:` needs a key or a prefix with `*`".into()),
                None => Channel::Key(k.to_string()),
            });
        }
        if let Some(t) = s.strip_prefix("table:") {
            if t.is_empty() {
                return Err("`table:` needs a table name".into());
            }
            return Ok(Channel::Table(t.to_string()));
        }
        Err(format!(
            "unknown channel {s:?}: use `kv:<key>`, `kv:<prefix>*` or `table:<name>`"
        ))
    }

    pub fn name(&self) -> String {
        match self {
            Channel::Key(k) => format!("kv:{k}"),
            Channel::Prefix(p) => format!("kv:{p}*"),
            Channel::Table(t) => format!("table:{t}"),
        }
    }
}

/// A connection's channels.
#[derive(Debug, Default, Clone)]
pub struct Subscriptions {
    keys: std::collections::HashSet<String>,
    prefixes: Vec<String>,
    tables: std::collections::HashSet<String>,
}

impl Subscriptions {
    pub fn add(&mut self, c: &Channel) {
        match c {
            Channel::Key(k) => {
                self.keys.insert(k.clone());
            }
            Channel::Prefix(p) => {
                if !self.prefixes.contains(p) {
                    self.prefixes.push(p.clone());
                }
            }
            Channel::Table(t) => {
                self.tables.insert(t.clone());
            }
        }
    }

    pub fn remove(&mut self, c: &Channel) {
        match c {
            Channel::Key(k) => {
                self.keys.remove(k);
            }
            Channel::Prefix(p) => self.prefixes.retain(|x| x != p),
            Channel::Table(t) => {
                self.tables.remove(t);
            }
        }
    }

    /// Every channel held.
    pub fn channels(&self) -> Vec<Channel> {
        let mut out: Vec<Channel> = self.keys.iter().cloned().map(Channel::Key).collect();
        out.extend(self.prefixes.iter().cloned().map(Channel::Prefix));
        out.extend(self.tables.iter().cloned().map(Channel::Table));
        out
    }

    /// Whether a change goes to this connection.
    pub fn matches(&self, c: &Change) -> bool {
        match &c.table {
            Some(t) => self.tables.contains(&**t) || self.tables.contains("*"),
            None => {
                self.keys.contains(&*c.key) || self.prefixes.iter().any(|p| c.key.starts_with(p))
            }
        }
    }
}

/// A message from a client.
#[derive(Debug, PartialEq)]
pub enum ClientMsg {
    Subscribe {
        id: Option<Value>,
        channels: Vec<Channel>,
        since: Option<u64>,
    },
    Unsubscribe {
        id: Option<Value>,
        channels: Vec<Channel>,
    },
    Ping {
        id: Option<Value>,
    },
    Auth {
        id: Option<Value>,
        token: String,
    },
}

/// Parses a client frame; the error says what is wrong (sent to the client before closing).
pub fn parse(text: &str) -> Result<ClientMsg, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    let o = v
        .as_object()
        .ok_or("a message must be a JSON object with a `type`")?;
    let id = o.get("id").cloned();
    let channels = || -> Result<Vec<Channel>, String> {
        let a = o
            .get("channels")
            .and_then(Value::as_array)
            .ok_or("`channels` must be an array of channel names")?;
        if a.is_empty() || a.len() > 1000 {
            return Err("`channels` must hold 1 to 1000 channel names".into());
        }
        a.iter()
            .map(|c| {
                c.as_str()
                    .ok_or_else(|| "channel names are strings".to_string())
                    .and_then(Channel::parse)
            })
            .collect()
    };
    match o.get("type").and_then(Value::as_str) {
        Some("subscribe") => {
            let since = match o.get("since") {
                None | Some(Value::Null) => None,
                Some(s) => Some(s.as_u64().ok_or("`since` must be a seq (an integer ≥ 0)")?),
            };
            Ok(ClientMsg::Subscribe {
                id,
                channels: channels()?,
                since,
            })
        }
        Some("unsubscribe") => Ok(ClientMsg::Unsubscribe {
            id,
            channels: channels()?,
        }),
        Some("ping") => Ok(ClientMsg::Ping { id }),
        Some("auth") => match o.get("token").and_then(Value::as_str) {
            Some(t) if !t.is_empty() && t.len() <= 16 * 1024 => Ok(ClientMsg::Auth {
                id,
                token: t.to_string(),
            }),
            _ => Err("`auth` needs a `token` (a JWT string)".into()),
        },
        Some(other) => Err(format!(
            "unknown message type {other:?}: use subscribe, unsubscribe, ping or auth"
        )),
        None => Err("a message needs a `type`".into()),
    }
}

fn id_json(id: &Option<Value>) -> String {
    id.as_ref().map_or("null".into(), |v| v.to_string())
}

fn channel_list(channels: &[Channel]) -> String {
    let mut out = String::from("[");
    for (i, c) in channels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_string(&mut out, &c.name());
    }
    out.push(']');
    out
}

pub fn welcome(seq: u64, heartbeat_ms: u64) -> String {
    format!(
        "{{\"type\":\"welcome\",\"protocol\":{PROTOCOL_VERSION},\"seq\":{seq},\"heartbeat\":{heartbeat_ms}}}"
    )
}

pub fn subscribed(id: &Option<Value>, channels: &[Channel], seq: u64) -> String {
    format!(
        "{{\"type\":\"subscribed\",\"id\":{},\"channels\":{},\"seq\":{seq}}}",
        id_json(id),
        channel_list(channels)
    )
}

pub fn unsubscribed(id: &Option<Value>, channels: &[Channel]) -> String {
    format!(
        "{{\"type\":\"unsubscribed\",\"id\":{},\"channels\":{}}}",
        id_json(id),
        channel_list(channels)
    )
}

pub fn authenticated(id: &Option<Value>, exp: u64) -> String {
    format!(
        "{{\"type\":\"authenticated\",\"id\":{},\"exp\":{exp}}}",
        id_json(id)
    )
}

pub fn pong(id: &Option<Value>) -> String {
    format!("{{\"type\":\"pong\",\"id\":{}}}", id_json(id))
}

pub fn gap(from: u64, to: u64, reason: &str) -> String {
    let mut out = format!("{{\"type\":\"gap\",\"from\":{from},\"to\":{to},\"reason\":");
    push_json_string(&mut out, reason);
    out.push('}');
    out
}

pub fn error(code: &str, message: &str) -> String {
    let mut out = String::from("{\"type\":\"error\",\"code\":");
    push_json_string(&mut out, code);
    out.push_str(",\"message\":");
    push_json_string(&mut out, message);
    out.push('}');
    out
}

/// An `events` frame from events already encoded as JSON.
pub fn events_frame<'a>(events: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::from("{\"type\":\"events\",\"events\":[");
    for (i, e) in events.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(e);
    }
    out.push_str("]}");
    out
}

/// One change event as JSON (the same object JavaScript listeners receive).
pub fn encode_event(e: &Event) -> String {
    let s = crate::event::encode_batch(std::slice::from_ref(e));
    // `[ … ]` around one object.
    s[1..s.len() - 1].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{ChangeKind, ChangeLogSeq, Position};
    use std::sync::Arc;

    fn change(key: &str, table: Option<&str>) -> Change {
        Change {
            kind: ChangeKind::Update,
            key: key.into(),
            data: Some("1".into()),
            version: 1,
            versioned: true,
            seq: 7,
            position: Position::ChangeLog(ChangeLogSeq(1)),
            source: "sqlite",
            commit_ts_us: 0,
            table: table.map(Into::into),
            before: None,
            meta: None,
        }
    }

    #[test]
    fn channels_parse_and_match() {
        let mut s = Subscriptions::default();
        for c in ["kv:price:BTC", "kv:user:*", "table:orders"] {
            s.add(&Channel::parse(c).unwrap());
        }
        assert!(s.matches(&change("price:BTC", None)));
        assert!(!s.matches(&change("price:ETH", None)));
        assert!(s.matches(&change("user:1", None)));
        assert!(s.matches(&change(r#"{"id":1}"#, Some("orders"))));
        assert!(!s.matches(&change(r#"{"id":1}"#, Some("audit"))));
        // A key named like a table row is not a row.
        assert!(!s.matches(&change("orders", None)));
        s.remove(&Channel::parse("kv:user:*").unwrap());
        assert!(!s.matches(&change("user:1", None)));
        let mut all = Subscriptions::default();
        all.add(&Channel::parse("kv:*").unwrap());
        assert!(all.matches(&change("anything", None)));
        assert!(!all.matches(&change("{}", Some("orders"))));
        all.add(&Channel::parse("table:*").unwrap());
        assert!(all.matches(&change("{}", Some("orders"))));
        for bad in ["kv:", "table:", "x:y", ""] {
            assert!(Channel::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Channel::parse("kv:a*").unwrap().name(), "kv:a*");
    }

    #[test]
    fn client_messages() {
        assert_eq!(
            parse(r#"{"type":"subscribe","channels":["kv:a"],"since":5,"id":"x"}"#).unwrap(),
            ClientMsg::Subscribe {
                id: Some(Value::from("x")),
                channels: vec![Channel::Key("a".into())],
                since: Some(5)
            }
        );
        assert_eq!(
            parse(r#"{"type":"ping"}"#).unwrap(),
            ClientMsg::Ping { id: None }
        );
        for bad in [
            "nope",
            "[]",
            r#"{"channels":["kv:a"]}"#,
            r#"{"type":"subscribe"}"#,
            r#"{"type":"subscribe","channels":[]}"#,
            r#"{"type":"subscribe","channels":[1]}"#,
            r#"{"type":"subscribe","channels":["kv:a"],"since":-1}"#,
            r#"{"type":"dance"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames_are_json() {
        let c = Event::Change(Arc::new(change("k", None)));
        let e = encode_event(&c);
        let frame = events_frame([e.as_str(), e.as_str()].into_iter());
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(v["events"][1]["key"], "k");
        assert_eq!(v["events"][0]["seq"], 7);
        for f in [
            welcome(3, 1000),
            subscribed(&Some(Value::from(1)), &[Channel::Prefix("p".into())], 9),
            unsubscribed(&None, &[Channel::Table("t".into())]),
            pong(&None),
            authenticated(&Some(Value::from(4)), 99),
            gap(1, 4, "history"),
            error("E", "bad \"x\""),
        ] {
            let v: Value = serde_json::from_str(&f).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert!(v["type"].is_string());
        }
    }
}
