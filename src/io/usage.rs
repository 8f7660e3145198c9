//! The usage file: the core's usage records as JSON lines, written by a thread of their own
//! (the batching writer of `crate::logging`), the file reopened after a SIGHUP so logrotate can
//! move it away.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, OnceLock};

use crate::logging::{self, BatchedWriter, FlushGuard};
use crate::proto::server::{UsageKind, UsageRecord};

/// Records queued beyond this many bytes (about 200k records) are dropped, and counted in the
/// file, until it takes more. Large because the records come in bursts (every shard's interim
/// round, a shutdown ending every allocation at once) and are someone's bill; past a quarter of
/// it the writer stops lingering and writes as they come.
const QUEUE_LIMIT: usize = 64 << 20;

/// Where shards hand their records; cheap to clone, one per shard.
#[derive(Clone)]
pub struct UsageLog {
    writer: BatchedWriter,
    reopen: Arc<AtomicBool>,
    /// With `[fleet]`: every record also goes to the fleet thread, for the Redis stream. Set
    /// once the fleet has started (after the shards).
    mirror: Arc<OnceLock<SyncSender<String>>>,
}

impl UsageLog {
    /// Opens (creating, mode 0640) `path` for appending, and starts the writer thread, which
    /// stops once the guard is dropped and everything queued is written.
    pub fn open(path: &Path) -> io::Result<(UsageLog, FlushGuard)> {
        let reopen = Arc::new(AtomicBool::new(false));
        let file = ReopeningFile {
            file: open_append(path)?,
            path: path.to_owned(),
            reopen: Arc::clone(&reopen),
        };
        let (writer, guard) = logging::batched(file, QUEUE_LIMIT, dropped_records);
        let mirror = Arc::new(OnceLock::new());
        Ok((
            UsageLog {
                writer,
                reopen,
                mirror,
            },
            guard,
        ))
    }

    pub fn write(&self, record: &UsageRecord) {
        let mut line = Vec::with_capacity(320);
        // Writing JSON into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut line, &to_json(record));
        if let Some(mirror) = self.mirror.get() {
            // Full (Redis away for long): the file has it; the stream misses it.
            let _ = mirror.try_send(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b'\n');
        // The batched writer never fails a write: it queues or counts the line as dropped.
        let _ = (&self.writer).write_all(&line);
    }

    /// From now on every record is also handed to `to` (the fleet's Redis stream).
    pub fn mirror_to(&self, to: SyncSender<String>) {
        let _ = self.mirror.set(to);
    }

    /// The file is opened again by path before the next records are written (SIGHUP).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }
}

/// The file stays JSON lines: a gap is a record of its own.
fn dropped_records(n: u64) -> String {
    format!("{{\"type\":\"dropped\",\"records\":{n}}}\n")
}

fn to_json(r: &UsageRecord) -> serde_json::Value {
    let c = &r.counters;
    let mut v = serde_json::json!({
        "type": r.kind.as_str(),
        "allocation_id": format!("{:016x}", r.id),
        "user": &*r.user,
        "client": r.client.to_string(),
        "transport": r.transport.as_str(),
        "relays": r.relays.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "start_unix": r.start_unix,
        "at_unix": r.at_unix,
        "to_peer_packets": c.to_peer_packets,
        "to_peer_bytes": c.to_peer_bytes,
        "to_client_packets": c.to_client_packets,
        "to_client_bytes": c.to_client_bytes,
        "dropped_packets": c.dropped_packets,
    });
    if let UsageKind::End(why) = r.kind {
        v["reason"] = why.as_str().into();
    }
    v
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// The writer thread's sink: reopens the file by path when asked, before its next write.
struct ReopeningFile {
    file: File,
    path: PathBuf,
    reopen: Arc<AtomicBool>,
}

impl Write for ReopeningFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.reopen.swap(false, Ordering::Relaxed) {
            match open_append(&self.path) {
                Ok(file) => self.file = file,
                // Records keep going to the file still open: lost nothing, and said so.
                Err(e) => tracing::error!(
                    path = %self.path.display(),
                    error = %e,
                    "cannot reopen the usage file; records go on to the old one"
                ),
            }
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::allocation::Counters;
    use crate::proto::error::EndReason;
    use crate::proto::Transport;

    fn record(kind: UsageKind, id: u64) -> UsageRecord {
        UsageRecord {
            kind,
            id,
            user: "1800000000:alice".into(),
            client: "203.0.113.7:5000".parse().unwrap(),
            transport: Transport::Tcp,
            relays: vec!["192.0.2.1:50000".parse().unwrap()],
            start_unix: 1_800_000_000,
            at_unix: 1_800_000_060,
            counters: Counters {
                to_peer_packets: 3,
                to_peer_bytes: 300,
                to_client_packets: 2,
                to_client_bytes: 200,
                dropped_packets: 1,
            },
        }
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn records_are_json_lines_and_survive_a_rotation() {
        let dir = std::env::temp_dir().join(format!("turnpike-usage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("usage.jsonl");
        let _ = std::fs::remove_file(&path);
        let (log, guard) = UsageLog::open(&path).unwrap();
        log.write(&record(UsageKind::Interim, 0xab));
        log.write(&record(UsageKind::End(EndReason::DeletedByClient), 0xab));
        // Rotation: the file moves away, SIGHUP, and the next record starts a new file.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while lines(&path).len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "records never written"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let rotated = dir.join("usage.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        log.reopen();
        log.write(&record(UsageKind::End(EndReason::Expired), 0xcd));
        drop(guard);

        let old = lines(&rotated);
        assert_eq!(old.len(), 2);
        assert_eq!(old[0]["type"], "interim");
        assert!(old[0].get("reason").is_none());
        let end = &old[1];
        assert_eq!(end["type"], "end");
        assert_eq!(end["reason"], "deleted by client");
        assert_eq!(end["allocation_id"], "00000000000000ab");
        assert_eq!(end["user"], "1800000000:alice");
        assert_eq!(end["client"], "203.0.113.7:5000");
        assert_eq!(end["transport"], "tcp");
        assert_eq!(end["relays"][0], "192.0.2.1:50000");
        assert_eq!(
            (end["start_unix"].as_u64(), end["at_unix"].as_u64()),
            (Some(1_800_000_000), Some(1_800_000_060))
        );
        assert_eq!(end["to_peer_packets"], 3);
        assert_eq!(end["to_peer_bytes"], 300);
        assert_eq!(end["to_client_packets"], 2);
        assert_eq!(end["to_client_bytes"], 200);
        assert_eq!(end["dropped_packets"], 1);
        let new = lines(&path);
        assert_eq!(new.len(), 1);
        assert_eq!(new[0]["reason"], "expired");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(
            mode & 0o077,
            mode & 0o040,
            "no more than group read: {mode:o}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_place_is_an_error_at_open() {
        let e = UsageLog::open(Path::new("/nonexistent-dir/usage.jsonl"))
            .err()
            .unwrap();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
