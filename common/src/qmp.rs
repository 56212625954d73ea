//! A QMP client: QEMU's machine protocol over a unix socket, one JSON object a line.
//!
//! ```text
//! server: {"QMP": {"version": ..., "capabilities": [...]}}        greeting
//! client: {"execute": "qmp_capabilities"}                          leave negotiation
//! client: {"execute": CMD, "arguments": {...}, "id": N}
//! server: {"event": ...}*  then  {"return": ...,"id": N}  or  {"error": {"class", "desc"},"id": N}
//! ```
//!
//! Events that arrive while a command waits are kept, in order, for [`Qmp::wait_event`]. A
//! line longer than [`MAX_LINE_BYTES`] is an error: the peer is a local QEMU, but nothing it
//! sends is trusted blindly.
//!
//! QEMU's monitor sends the reply to a command whose client went away (a killed run) to the
//! next client of the socket. So the ids are `blkdelta-<connection nonce>-N`, and a reply with
//! any other id is such a leftover: it is skipped, within the command's time limit.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// The longest line accepted from the server.
pub const MAX_LINE_BYTES: usize = 16 << 20;

/// Events kept while no one waits for them, at most (the oldest go first).
const MAX_KEPT_EVENTS: usize = 1024;

/// How long a command may take before the client gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What went wrong talking QMP.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached.
    #[error("cannot connect to the QMP socket {}", .path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed (QEMU went away, or took too long).
    #[error("QMP socket {}: {what}", .path.display())]
    Io {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The server broke the protocol.
    #[error("QMP socket {}: {what}", .path.display())]
    Protocol {
        /// The socket path.
        path: PathBuf,
        /// What it sent instead of what was expected.
        what: String,
    },
    /// A command failed: QEMU's error class and description.
    #[error("QMP command {command} failed: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, …).
        class: String,
        /// QEMU's description.
        desc: String,
    },
}

/// A QMP event: its name and data.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// `BLOCK_JOB_COMPLETED`, `JOB_STATUS_CHANGE`, …
    pub name: String,
    /// The event's `data` member (null when absent).
    pub data: Value,
}

/// A connection to a QMP server, in command mode.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Random per connection: the ids of this connection's commands carry it.
    nonce: String,
    next_id: u64,
    events: Vec<Event>,
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and leaves capabilities
    /// negotiation.
    pub fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        let io = |what: &str| {
            let path = path.to_path_buf();
            let what = what.to_string();
            move |source| QmpError::Io { path, what, source }
        };
        stream
            .set_read_timeout(Some(COMMAND_TIMEOUT))
            .map_err(io("set a timeout"))?;
        let writer = stream.try_clone().map_err(io("clone the socket"))?;
        let mut qmp = Qmp {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            nonce: crate::digest::to_hex(&crate::stream::random_id()[..8]),
            next_id: 1,
            events: Vec::new(),
        };
        // Leftovers of an earlier client (replies, events) may come before the greeting.
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let msg = qmp.read_message()?;
            if msg.get("QMP").is_some() {
                break;
            }
            let leftover = msg.get("id").is_some() || msg.get("event").is_some();
            if !leftover || Instant::now() >= deadline {
                return Err(qmp.protocol(format!("the greeting is not a QMP greeting: {msg}")));
            }
        }
        qmp.execute::<Value>("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn protocol(&self, what: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            what,
        }
    }

    /// Reads one message (a line of JSON).
    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = Vec::new();
        let n = std::io::Read::take(&mut self.reader, MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                what: "read".into(),
                source,
            })?;
        if n == 0 {
            return Err(self.protocol("the server closed the connection".into()));
        }
        if line.len() > MAX_LINE_BYTES {
            return Err(self.protocol(format!("a line longer than {MAX_LINE_BYTES} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| self.protocol(format!("not JSON ({e})")))
    }

    /// Runs `command` with `arguments` and returns its result, decoded as `T`.
    pub fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Value,
    ) -> Result<T, QmpError> {
        let id = Value::String(format!("blkdelta-{}-{}", self.nonce, self.next_id));
        self.next_id += 1;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let mut msg = json!({"execute": command, "id": id.clone()});
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        let mut line = serde_json::to_vec(&msg).expect("a JSON value serialises");
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                what: format!("send {command}"),
                source,
            })?;
        loop {
            let reply = self.read_message()?;
            if let Some(name) = reply.get("event").and_then(Value::as_str) {
                self.keep_event(name, &reply);
                continue;
            }
            let other = reply.get("id").is_some_and(|i| *i != id);
            if other {
                // A leftover reply to a command of an earlier client (see the module docs). A
                // reply with no id is QEMU's own (it could not parse a request): taken below.
                if Instant::now() >= deadline {
                    return Err(self.protocol(format!(
                        "no reply to {command} within {COMMAND_TIMEOUT:?}, only to other commands"
                    )));
                }
                continue;
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            let Some(ret) = reply.get("return") else {
                return Err(
                    self.protocol(format!("a reply with neither return nor error: {reply}"))
                );
            };
            return serde_json::from_value(ret.clone()).map_err(|e| {
                self.protocol(format!(
                    "the reply to {command} does not decode ({e}): {ret}"
                ))
            });
        }
    }

    fn keep_event(&mut self, name: &str, msg: &Value) {
        if self.events.len() >= MAX_KEPT_EVENTS {
            self.events.remove(0);
        }
        self.events.push(Event {
            name: name.to_string(),
            data: msg.get("data").cloned().unwrap_or(Value::Null),
        });
    }

    /// Waits up to `timeout` for an event called `name` whose data `matches`; events seen
    /// before (while commands ran) count. Returns its data.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Result<Value, QmpError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e.name == name && matches(&e.data))
            {
                return Ok(self.events.remove(i).data);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(self.protocol(format!("no {name} event within {timeout:?}")));
            }
            let _ = self.reader.get_ref().set_read_timeout(Some(left));
            let msg = self.read_message();
            let _ = self
                .reader
                .get_ref()
                .set_read_timeout(Some(COMMAND_TIMEOUT));
            let msg = msg?;
            match msg.get("event").and_then(Value::as_str) {
                Some(n) => {
                    let n = n.to_string();
                    self.keep_event(&n, &msg);
                }
                None => return Err(self.protocol(format!("an unexpected message: {msg}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted server: sends `lines` (after reading one line for each `>`-prefixed one),
    /// `ID` in a line replaced by the id of the command read last; `-` holds the connection
    /// open for two minutes.
    fn serve(script: &'static [&'static str]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut id = Value::Null;
            for line in script {
                if *line == "-" {
                    std::thread::sleep(Duration::from_secs(120));
                } else if line.starts_with('>') {
                    let mut got = String::new();
                    r.read_line(&mut got).unwrap();
                    id = serde_json::from_str::<Value>(&got).unwrap()["id"].clone();
                } else {
                    let line = line.replace("ID", &id.to_string());
                    w.write_all(line.as_bytes()).unwrap();
                    w.write_all(b"\n").unwrap();
                }
            }
        });
        (dir, path)
    }

    const GREETING: &str = r#"{"QMP": {"version": {}, "capabilities": []}}"#;

    #[test]
    fn commands_return_and_events_are_kept() {
        let (_d, path) = serve(&[
            GREETING,
            ">",
            r#"{"return": {}, "id": ID}"#,
            ">",
            r#"{"event": "JOB_STATUS_CHANGE", "data": {"id": "j", "status": "running"}}"#,
            r#"{"return": [1, 2], "id": ID}"#,
        ]);
        let mut q = Qmp::connect(&path).unwrap();
        let v: Vec<u32> = q.execute("query-x", json!({})).unwrap();
        assert_eq!(v, [1, 2]);
        let data = q
            .wait_event("JOB_STATUS_CHANGE", Duration::from_secs(1), |d| {
                d["id"] == "j"
            })
            .unwrap();
        assert_eq!(data["status"], "running");
    }

    #[test]
    fn errors_name_the_command_and_qemus_words() {
        let (_d, path) = serve(&[
            GREETING,
            ">",
            r#"{"return": {}, "id": ID}"#,
            ">",
            r#"{"error": {"class": "GenericError", "desc": "Node 'x' not found"}, "id": ID}"#,
        ]);
        let mut q = Qmp::connect(&path).unwrap();
        let e = q
            .execute::<Value>("blockdev-del", json!({"node-name": "x"}))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "QMP command blockdev-del failed: Node 'x' not found (GenericError)"
        );
    }

    #[test]
    fn a_reply_left_by_a_killed_client_is_skipped() {
        // QEMU hands the next client the reply to a command of a client that went away: here
        // one with a numeric id (an older client) and one with another connection's nonce.
        let (_d, path) = serve(&[
            r#"{"return": [], "id": "blkdelta-0011223344556677-5"}"#,
            GREETING,
            ">",
            r#"{"return": {}, "id": 6}"#,
            r#"{"return": {}, "id": ID}"#,
            ">",
            r#"{"return": {"stale": true}, "id": "blkdelta-0011223344556677-2"}"#,
            r#"{"return": [3], "id": ID}"#,
        ]);
        let mut q = Qmp::connect(&path).unwrap();
        let v: Vec<u32> = q.execute("query-x", json!({})).unwrap();
        assert_eq!(v, [3]);
    }

    #[test]
    fn an_error_without_an_id_is_not_taken_for_a_leftover() {
        // QEMU answers a request it cannot parse with an error that has no id.
        let (_d, path) = serve(&[
            GREETING,
            ">",
            r#"{"return": {}, "id": ID}"#,
            ">",
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#,
            "-",
        ]);
        let mut q = Qmp::connect(&path).unwrap();
        let started = Instant::now();
        let e = q.execute::<Value>("query-x", json!({})).unwrap_err();
        assert!(e.to_string().contains("JSON parse error"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_broken_server_is_an_error_not_a_hang() {
        for script in [
            &["not json"][..],
            &[r#"{"hello": 1}"#][..],
            &[GREETING, ">", r#"{"return": {}, "id": 7}"#][..],
            &[GREETING][..],
        ] {
            let (_d, path) = serve(script);
            assert!(Qmp::connect(&path).is_err(), "{script:?}");
        }
    }
}
