//! Background durability work kept off the writer thread, so an append never waits behind it:
//! index checkpoints (fsync of index files + checkpoint file), consumer offsets, and the periodic
//! log fsync of `flush = "async"`.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tracing::error;

use super::Shared;
use super::files::{Checkpoint, INDEX_FORMAT, SegmentInfo, encode_offsets, write_atomic};
use super::log::{Segment, sync_dir};
use super::timers::BucketId;
use crate::store::FlushMode;

/// One checkpoint to make durable.
pub struct CheckpointJob {
    /// Log position every index covers once the job's files are fsynced.
    pub pos: u64,
    /// Per-segment facts at `pos`.
    pub segments: BTreeMap<u64, SegmentInfo>,
    /// The segment holding `pos` (fsynced first in async mode).
    pub segment: Arc<Segment>,
    /// Timer bucket files written since the last checkpoint.
    pub timer_files: Vec<PathBuf>,
    /// Finished timer buckets the writer may delete once this checkpoint is durable.
    pub deletes: Vec<BucketId>,
}

/// Outcome of a checkpoint job: its position and the buckets it cleared for deletion.
pub type Done = io::Result<(u64, Vec<BucketId>)>;

enum Job {
    Checkpoint(Box<CheckpointJob>),
    Stop,
}

/// Handle to the flusher thread.
pub struct Flusher {
    tx: mpsc::Sender<Job>,
    done: Arc<Mutex<Option<Done>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Flusher {
    /// Starts the thread.
    pub fn start(sh: Arc<Shared>) -> io::Result<Flusher> {
        let (tx, rx) = mpsc::channel();
        let done = Arc::new(Mutex::new(None));
        let d = done.clone();
        let handle = std::thread::Builder::new()
            .name("wharf-store-flusher".into())
            .spawn(move || run(sh, rx, d))?;
        Ok(Flusher {
            tx,
            done,
            handle: Some(handle),
        })
    }

    /// Queues a checkpoint.
    pub fn checkpoint(&self, job: CheckpointJob) {
        let _ = self.tx.send(Job::Checkpoint(Box::new(job)));
    }

    /// The result of the last finished checkpoint, if one finished since the last call.
    pub fn take_done(&self) -> Option<Done> {
        self.done.lock().take()
    }

    /// Stops the thread after the job in progress (if any); returns its result.
    pub fn stop(&mut self) -> Option<Done> {
        let _ = self.tx.send(Job::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.take_done()
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.stop();
        }
    }
}

fn run(sh: Arc<Shared>, rx: mpsc::Receiver<Job>, done: Arc<Mutex<Option<Done>>>) {
    let async_interval = Duration::from_millis(sh.config.flush_interval_ms.max(1));
    let tick = sh.tuning.offsets_flush().min(async_interval);
    let mut last_offsets = Instant::now();
    let mut last_fsync = Instant::now();
    loop {
        match rx.recv_timeout(tick) {
            Ok(Job::Checkpoint(job)) => {
                let r = checkpoint(&sh, *job);
                if let Err(e) = &r {
                    error!(error = %e, "store index checkpoint failed");
                }
                *done.lock() = Some(r);
            }
            Ok(Job::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if sh.config.flush == FlushMode::Async && last_fsync.elapsed() >= async_interval {
            let seg = sh.active.lock().clone();
            if let Some(seg) = seg {
                let t = Instant::now();
                // A failure marks the store failed (see `Shared::sync_log`).
                if sh.sync_log(&seg.file, false).is_ok() {
                    sh.stats
                        .fsync_latency
                        .record(t.elapsed().as_micros() as u64);
                }
            }
            last_fsync = Instant::now();
        }
        if last_offsets.elapsed() >= sh.tuning.offsets_flush() {
            if let Err(e) = flush_offsets(&sh) {
                error!(error = %e, "saving consumer offsets failed");
            }
            last_offsets = Instant::now();
        }
    }
}

fn checkpoint(sh: &Shared, job: CheckpointJob) -> Done {
    if sh.config.flush == FlushMode::Async {
        sh.sync_log(&job.segment.file, false)?;
    }
    for q in sh.queues.all() {
        q.sync()?;
    }
    sh.keys.sync()?;
    let mut any = false;
    for p in &job.timer_files {
        match std::fs::File::open(p) {
            Ok(f) => {
                f.sync_data()?;
                any = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if any && let Some(dir) = job.timer_files[0].parent() {
        sync_dir(dir)?;
    }
    Checkpoint {
        format: INDEX_FORMAT,
        log_pos: job.pos,
        segments: job.segments,
    }
    .save(&sh.dir.join("checkpoint"))?;
    Ok((job.pos, job.deletes))
}

/// Saves consumer offsets if they changed.
pub fn flush_offsets(sh: &Shared) -> io::Result<()> {
    let bytes = {
        let mut o = sh.offsets.lock();
        if !o.1 {
            return Ok(());
        }
        o.1 = false;
        encode_offsets(&o.0)
    };
    let r = write_atomic(&sh.dir.join("offsets"), &bytes);
    if r.is_err() {
        sh.offsets.lock().1 = true;
    }
    r
}
