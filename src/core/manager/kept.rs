//! Background processes kept across a restart of the service. Where the executor keeps them
//! (`Executor::keeps_processes`: under systemd, with its descriptor store), each process is
//! started where a restart does not end it, and its streams, what reports its end and a record
//! of it are kept under a key; at shutdown its output is kept too. At the next start each is
//! taken up again with its id, command, start time and output (`recover_processes`); one whose
//! streams were not all kept is listed as ended, with what is known.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::output::OutputBuffer;
use super::processes::{Ending, Process, ProcessInfo, read_output};
use super::{Manager, now_usec};
use crate::core::ports::Event;

/// The key a process is kept under.
pub(super) fn key(ws_id: &str, id: u32) -> String {
    format!("process.{ws_id}.{id}")
}

/// What is kept of a process besides its streams.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    workspace_id: String,
    id: u32,
    command: String,
    started_at_usec: u64,
    pty: bool,
    /// A finished process's exit code and end (kept at shutdown with its output).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(default)]
    ended_at_usec: u64,
}

/// The record of a process, as kept.
pub(super) fn record(ws_id: &str, info: &ProcessInfo) -> Vec<u8> {
    serde_json::to_vec(&Record {
        workspace_id: ws_id.to_owned(),
        id: info.id,
        command: info.command.clone(),
        started_at_usec: info.started_at_usec,
        pty: info.pty,
        exit_code: (!info.running).then_some(info.exit_code),
        ended_at_usec: info.ended_at_usec,
    })
    .unwrap_or_default()
}

/// A process's output as kept: the offset of its first byte (8 bytes, little-endian), then
/// the bytes.
fn encode_output(out: &OutputBuffer) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + out.data.len());
    bytes.extend_from_slice(&out.start.to_le_bytes());
    bytes.extend(out.data.iter());
    bytes
}

fn decode_output(bytes: &[u8]) -> Option<OutputBuffer> {
    let (start, data) = bytes.split_first_chunk::<8>()?;
    let data = &data[data.len().saturating_sub(super::processes::OUTPUT_CAP)..];
    Some(OutputBuffer {
        data: VecDeque::from(data.to_vec()),
        start: u64::from_le_bytes(*start),
        complete: false,
    })
}

impl Manager {
    /// At shutdown: keeps the output of every kept process, and the record of each finished
    /// one (its exit code for whoever asks after the restart).
    pub(super) fn keep_outputs(&self) {
        for (ws_id, w) in self.procs().iter() {
            for p in w.by_id.values() {
                let Some(key) = &p.kept else { continue };
                let info = p.info();
                let bytes = encode_output(&p.output.lock().unwrap_or_else(|e| e.into_inner()));
                if info.running {
                    self.ports.executor.keep_output(key, &bytes);
                } else {
                    let record = record(ws_id, &info);
                    self.ports.executor.keep_finished(key, &record, &bytes);
                }
            }
        }
    }

    /// Takes up the background processes the previous run of the service kept. Call once,
    /// after `load`.
    pub fn recover_processes(&self) {
        for kept in self.ports.executor.kept_processes() {
            let Ok(rec) = serde_json::from_slice::<Record>(&kept.record) else {
                warn!(
                    "Dropping kept process {}: its record is unreadable",
                    kept.key
                );
                self.ports.executor.forget_kept(&kept.key);
                continue;
            };
            let place = self.reg().by_id.get(&rec.workspace_id).map(|e| {
                (
                    e.ws.name.clone(),
                    e.execs.clone(),
                    e.processes.child_token(),
                )
            });
            let Some((name, tracker, cancel)) = place else {
                warn!(
                    "Dropping kept process {}: workspace {} is gone",
                    kept.key, rec.workspace_id
                );
                self.ports.executor.forget_kept(&kept.key);
                continue;
            };
            let mut output = kept
                .output
                .as_deref()
                .and_then(decode_output)
                .unwrap_or_default();
            // A finished one's record has its exit code; a live one ends when its agent says.
            let live = kept.live.filter(|_| rec.exit_code.is_none());
            if live.is_none() {
                output.complete = true;
            }
            let ended_at_usec = match (&live, rec.ended_at_usec) {
                (Some(_), _) => 0,
                (None, 0) => now_usec(),
                (None, at) => at,
            };
            let info = ProcessInfo {
                id: rec.id,
                command: rec.command,
                running: live.is_some(),
                exit_code: rec.exit_code.unwrap_or(-1),
                started_at_usec: rec.started_at_usec,
                ended_at_usec,
                pty: rec.pty,
            };
            let (signals, signals_rx) = mpsc::unbounded_channel();
            let (input, terminal, streams) = match live {
                Some(l) => (l.input, l.terminal, Some((l.output, l.resume))),
                None => (None, None, None),
            };
            let kept_key = streams.as_ref().map(|_| kept.key.clone());
            let process = Arc::new(Process::new(
                info, output, signals, input, terminal, kept_key,
            ));
            {
                let mut all = self.procs();
                let mine = all.entry(rec.workspace_id.clone()).or_default();
                mine.next = mine.next.max(rec.id);
                mine.by_id.insert(rec.id, process.clone());
            }
            self.ports.events.emit(Event::ProcessAdded {
                id: rec.workspace_id.clone(),
                process: rec.id,
            });
            let id = rec.id;
            let Some((out, resume)) = streams else {
                if rec.exit_code.is_none() {
                    warn!(workspace_id = %rec.workspace_id, workspace_name = %name, process = id,
                          "Background process {id} of workspace {name} was not kept whole across the restart; it is listed as ended");
                }
                self.ports.executor.forget_kept(&kept.key);
                continue;
            };
            info!(workspace_id = %rec.workspace_id, workspace_name = %name, process = id,
                  "Background process {id} of workspace {name} taken up again after a restart");
            let ending = Ending {
                process: process.clone(),
                executor: self.ports.executor.clone(),
                events: self.ports.events.clone(),
                ws_id: rec.workspace_id,
                name,
            };
            let run = resume(signals_rx, cancel);
            tracker.spawn(read_output(process, out));
            tracker.spawn(async move { ending.end(run.await).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_comes_back_with_its_offsets() {
        let mut out = OutputBuffer::default();
        out.push(b"0123456789", 4);
        let back = decode_output(&encode_output(&out)).unwrap();
        assert_eq!(back.read(0, 100), (b"6789".to_vec(), 10, false));
        assert!(decode_output(b"short").is_none());
    }

    #[test]
    fn a_record_reads_back() {
        let info = ProcessInfo {
            id: 7,
            command: "sleep 1".into(),
            running: true,
            exit_code: -1,
            started_at_usec: 42,
            ended_at_usec: 0,
            pty: true,
        };
        let rec: Record = serde_json::from_slice(&record("ws", &info)).unwrap();
        assert_eq!(
            rec,
            Record {
                workspace_id: "ws".into(),
                id: 7,
                command: "sleep 1".into(),
                started_at_usec: 42,
                pty: true,
                exit_code: None,
                ended_at_usec: 0,
            }
        );
        assert_eq!(key("ws", 7), "process.ws.7");
    }
}
