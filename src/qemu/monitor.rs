//! A small synchronous client for QEMU's machine protocol (QMP) over a unix socket.
//!
//! QMP is line-delimited JSON: the server greets, the client negotiates with
//! `qmp_capabilities`, then each `{"execute": ...}` is answered by one `return` or
//! `error` object, with asynchronous `event` objects interleaved. This client
//! keeps the events it sees so callers can wait for one (e.g. `MIGRATION`).

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What can go wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP socket {path} is busy: QEMU serves one client per monitor and another holds it; give QEMU a second -qmp socket for pct")]
    Busy { path: PathBuf },
    #[error("QMP socket {path} closed (QEMU exited?)")]
    Closed { path: PathBuf },
    #[error("malformed QMP message from {path}: {msg}")]
    Protocol { path: PathBuf, msg: String },
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("timed out after {0:?} waiting for QMP")]
    Timeout(Duration),
}

/// An asynchronous QMP event: the ones pct acts on by name, the rest as `Other`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    /// When QEMU emitted it (its `timestamp`), in Unix milliseconds.
    pub at_unix_ms: Option<f64>,
}

/// What an [`Event`] says.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// The guest's vCPUs stopped (`STOP`).
    Stop,
    /// The guest's vCPUs run again (`RESUME`).
    Resume,
    /// The migration changed state (`MIGRATION`, with the `events` capability on).
    Migration(crate::qemu::migration::MigrationStatus),
    /// Any other event, by name.
    Other(String),
}

impl Event {
    /// Reads an event message (`{"event": …, "data": …, "timestamp": …}`).
    pub fn from_message(v: &Value) -> Event {
        let name = v["event"].as_str().unwrap_or_default();
        let kind = match name {
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "MIGRATION" => EventKind::Migration(
                serde::Deserialize::deserialize(&v["data"]["status"]).unwrap_or_default(),
            ),
            other => EventKind::Other(other.to_owned()),
        };
        let ts = &v["timestamp"];
        let at_unix_ms = match (ts["seconds"].as_u64(), ts["microseconds"].as_u64()) {
            (Some(s), Some(us)) => Some(s as f64 * 1e3 + us as f64 / 1e3),
            _ => None,
        };
        Event { kind, at_unix_ms }
    }
}

/// One QMP session.
pub struct Qmp {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to `path`, retrying until `timeout` (QEMU creates the socket
    /// shortly after it starts), and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() < timeout => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.to_owned(),
                        source,
                    })
                }
            }
        };
        let io = |source| QmpError::Io {
            path: path.to_owned(),
            source,
        };
        // QEMU serves one client per monitor: a busy monitor accepts but never greets.
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut qmp = Qmp {
            path: path.to_owned(),
            writer: stream,
            reader,
            events: Vec::new(),
        };
        let greeting = qmp.read_message().map_err(|e| match e {
            QmpError::Io { path, source } if source.kind() == std::io::ErrorKind::WouldBlock => {
                QmpError::Busy { path }
            }
            e => e,
        })?;
        if greeting.get("QMP").is_none() {
            return Err(qmp.protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        qmp.execute("qmp_capabilities", None)?;
        qmp.writer
            .set_read_timeout(Some(Duration::from_secs(600)))
            .map_err(|source| QmpError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(qmp)
    }

    fn protocol(&self, msg: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            msg,
        }
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        serde_json::from_str(&line).map_err(|e| self.protocol(format!("{e}: {line:?}")))
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        let mut text = req.to_string();
        text.push('\n');
        self.writer
            .write_all(text.as_bytes())
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(self.protocol(format!("unexpected message {msg}")));
        }
    }

    /// Runs a human monitor (HMP) command such as `info mtree -f` and returns its text.
    pub fn hmp(&mut self, command_line: &str) -> Result<String, QmpError> {
        let ret = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(ret.as_str().unwrap_or_default().to_owned())
    }

    /// The process id of the QEMU at the other end of the socket (`SO_PEERCRED`).
    pub fn peer_pid(&self) -> Option<u32> {
        let cred = rustix::net::sockopt::socket_peercred(&self.writer).ok()?;
        u32::try_from(cred.pid.as_raw_nonzero().get()).ok()
    }

    /// Events received so far (drained), typed.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
            .iter()
            .map(Event::from_message)
            .collect()
    }

    /// Polls `query-status` until the guest's run state is `want` or `timeout` passes.
    pub fn wait_status(&mut self, want: &str, timeout: Duration) -> Result<(), QmpError> {
        let start = Instant::now();
        loop {
            let st = self.execute("query-status", None)?;
            if st.get("status").and_then(Value::as_str) == Some(want) {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(QmpError::Timeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
