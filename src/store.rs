//! The request/response contract between the API and a store thread: operations in, completions
//! out. Completions are batched so one JavaScript call settles many promises.

use std::sync::Arc;

use crate::error::Error;
use crate::event::push_json_string;

/// An operation for the store thread. `id` identifies the caller's pending promise.
#[derive(Debug)]
pub enum Op {
    Put {
        id: u32,
        key: Arc<str>,
        json: String,
    },
    Delete {
        id: u32,
        key: Arc<str>,
    },
    Get {
        id: u32,
        key: Arc<str>,
    },
    /// Start delivering row changes of `table` (MySQL); settled with `Ready` once active.
    Watch {
        id: u32,
        table: String,
        insert: bool,
        update: bool,
        delete: bool,
    },
    /// Finish queued work, deliver what is committed, then stop; `id` is settled when done.
    Shutdown {
        id: u32,
    },
    /// No work: wakes the store thread (a delivery slot freed up while events wait).
    Wake,
}

impl Op {
    /// The pending call this operation settles (`Wake` settles none).
    pub fn id(&self) -> Option<u32> {
        match self {
            Op::Put { id, .. }
            | Op::Delete { id, .. }
            | Op::Get { id, .. }
            | Op::Watch { id, .. }
            | Op::Shutdown { id } => Some(*id),
            Op::Wake => None,
        }
    }
}

/// The outcome of one operation.
#[derive(Debug)]
pub enum Completion {
    Ready {
        id: u32,
    },
    Pushed {
        id: u32,
        version: u64,
    },
    Deleted {
        id: u32,
        existed: bool,
    },
    /// `value` is JSON text; `None` when the key is absent or deleted.
    Got {
        id: u32,
        value: Option<Arc<str>>,
    },
    Failed {
        id: u32,
        error: Error,
    },
    Closed {
        id: u32,
    },
    /// The store thread died (a bug): every pending operation fails with `error`.
    Fatal {
        error: Error,
    },
}

/// Receives completions (the JavaScript binding settles promises with them).
pub trait CompletionSink: Send + Sync + 'static {
    fn complete(&self, done: Vec<Completion>);
}

/// Encodes completions as one JSON array of tuples:
/// `[id,"r"]`, `[id,"p",version]`, `[id,"d",existed]`, `[id,"g",value]`, `[id,"e",code,message]`,
/// `[id,"c"]`, and `[0,"x",code,message]` when the engine died (every pending call fails).
pub fn encode_completions(done: &[Completion]) -> String {
    let mut out = String::with_capacity(done.len() * 24 + 2);
    out.push('[');
    for (i, c) in done.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match c {
            Completion::Ready { id } => out.push_str(&format!("[{id},\"r\"]")),
            Completion::Pushed { id, version } => out.push_str(&format!("[{id},\"p\",{version}]")),
            Completion::Deleted { id, existed } => out.push_str(&format!("[{id},\"d\",{existed}]")),
            Completion::Got { id, value } => {
                out.push_str(&format!("[{id},\"g\","));
                out.push_str(value.as_deref().unwrap_or("null"));
                out.push(']');
            }
            Completion::Failed { id, error } => {
                out.push_str(&format!("[{id},\"e\",\"{}\",", error.code()));
                push_json_string(&mut out, &error.to_string());
                out.push(']');
            }
            Completion::Closed { id } => out.push_str(&format!("[{id},\"c\"]")),
            Completion::Fatal { error } => {
                out.push_str(&format!("[0,\"x\",\"{}\",", error.code()));
                push_json_string(&mut out, &error.to_string());
                out.push(']');
            }
        }
    }
    out.push(']');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_encode_to_json() {
        let s = encode_completions(&[
            Completion::Ready { id: 1 },
            Completion::Pushed { id: 2, version: 7 },
            Completion::Deleted {
                id: 3,
                existed: false,
            },
            Completion::Got {
                id: 4,
                value: Some(r#"{"a":[1]}"#.into()),
            },
            Completion::Got { id: 5, value: None },
            Completion::Failed {
                id: 6,
                error: Error::Db("quote \" here".into()),
            },
            Completion::Closed { id: 7 },
            Completion::Fatal {
                error: Error::Internal("boom".into()),
            },
        ]);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v[1][2], 7);
        assert_eq!(v[2][2], false);
        assert_eq!(v[3][2]["a"][0], 1);
        assert!(v[4][2].is_null());
        assert_eq!(v[5][2], "USP_DB_ERROR");
        assert!(v[5][3].as_str().unwrap().contains("quote \" here"));
        assert_eq!(v[6][1], "c");
        assert_eq!(v[7][1], "x");
        assert_eq!(v[7][2], "USP_INTERNAL");
    }
}
