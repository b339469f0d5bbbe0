//! Where a VM's inputs come from and where its log goes: live, recording,
//! or replaying.
//!
//! The vCPU loop talks only to a [`Journal`]. Live, it is the world
//! ([`LiveInputs`]). Recording, it is the world plus a log: every cause is
//! appended at the stop where it was applied, every kick-induced stop becomes
//! a sync point, and a writer thread flushes the log every few hundred
//! milliseconds behind a watermark ("the recorder has left stop S").
//! Replaying, the log is the world: causes come from it at their stops, sync
//! points are installed instead of executing the stretch they cover, HLT
//! waits only on the log, and the vCPU may re-enter the guest from stop j
//! only while j is below the watermark (or the log is complete).
//!
//! Size: over 800 lines because the recorder, its writer thread, the replayer
//! and the live inputs share the `Journal` type; splitting them into
//! `journal/` modules is the next step.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tandem_replay::log::{
    Check, EndOutcome, LogError, LogFile, LogReader, MachineState, Page, Record, VmIdentity,
};
use tandem_replay::{Cause, Inputs, LiveInputs};

/// How often the recorder's writer flushes, fsyncs and writes a watermark.
pub const RECORD_SYNC_PERIOD: Duration = Duration::from_millis(200);

/// Options of a recording.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// The log file.
    pub path: PathBuf,
    /// Size cap for the log file.
    pub max_size: Option<u64>,
    /// Take a sync point at least this often (guest time).
    pub sync_interval: Duration,
    /// Kick the vCPU at most this often.
    pub min_kick_interval: Duration,
    /// How long a device interrupt may wait for an exit of the guest's own
    /// before a kick makes a stop for it ([`crate::vcpu::KickPolicy`]).
    pub irq_defer: Duration,
    /// End an epoch (and log its hashes) about this often.
    pub epoch_interval: Duration,
    /// How often the writer flushes (and writes a watermark).
    pub sync_period: Duration,
    /// A protected primary's brake: its vCPU waits at a stop while the
    /// secondary is too far behind.
    pub throttle: Option<Arc<Throttle>>,
    /// Mirrored storage: read data stays on the replicas; the log carries
    /// each read's hash instead ([`Cause::BlockReadHashed`]).
    pub mirrored: bool,
    /// The position counter to place kick stops with.
    pub position: crate::position::choice::PositionChoice,
}

/// The primary's brake on its own vCPU (DESIGN "The log": pair logs live in
/// memory under a hard byte cap; when it is full the primary's vCPU waits at
/// a stop; when the secondary lags the primary slows, as VMware FT does).
#[derive(Debug)]
pub struct Throttle {
    /// Log bytes shipped, and acknowledged.
    shipped: AtomicU64,
    acked: AtomicU64,
    /// What is shipped and not yet acknowledged, by stop.
    marks: Mutex<Marks>,
    /// When the acknowledged position last moved (or, if nothing was
    /// outstanding, when something was shipped again).
    progress: Mutex<Instant>,
    /// Most unacknowledged bytes.
    cap: u64,
    /// Longest the secondary may leave shipped data unacknowledged.
    max_lag: Duration,
    /// The secondary's replay: watermarks shipped and not yet replayed.
    replay: Mutex<ReplayMarks>,
    /// Longest the secondary's replay may stay behind a shipped watermark
    /// (`[ft] max_replay_lag_ms`): bounds what a failover must catch up.
    max_replay_lag: Duration,
    /// Times the vCPU waited for the replay (not for acks).
    pub replay_waits: AtomicU64,
    /// The secondary's replay is catching up: kick stops take sync points
    /// (installed there, not executed to) instead of positioned stops.
    catching_up: std::sync::atomic::AtomicBool,
    /// No secondary any more: never wait.
    open: std::sync::atomic::AtomicBool,
    /// A switch-over: the vCPU waits at its next stop until released.
    hold: std::sync::atomic::AtomicBool,
    /// The vCPU waits for a hold: 0 no, 1 leaving a stop (everything up to
    /// it is in the log), 2 halted (records of the halted stop are
    /// shipped but no watermark covers them yet).
    parked: std::sync::atomic::AtomicU8,
    /// Times and total time the vCPU waited.
    pub waits: AtomicU64,
    /// Microseconds the vCPU spent waiting.
    pub waited_us: AtomicU64,
}

/// The secondary's replay progress as the primary sees it.
#[derive(Debug, Default)]
struct ReplayMarks {
    /// (watermark, when shipped), oldest first, not yet replayed.
    shipped: std::collections::VecDeque<(u64, Instant)>,
    /// The newest stop the secondary reported replayed (None: it has not
    /// reported, an older protocol or not started: no replay-lag brake).
    replayed: Option<u64>,
    /// The last report (when, stop), if the replay had shipped stops left
    /// to execute then: the start of a speed measurement.
    busy_since: Option<(Instant, u64)>,
    /// The replay's speed while it has work, stops per second (a moving
    /// average; None: not measured yet).
    stops_per_s: Option<f64>,
}

impl ReplayMarks {
    /// How long the replay needs to execute what is shipped, at its
    /// measured speed (zero: caught up, or not measured yet).
    fn catch_up(&self) -> Duration {
        match (self.replayed, self.shipped.back(), self.stops_per_s) {
            (Some(replayed), Some((newest, _)), Some(speed)) if speed > 0.0 => {
                Duration::from_secs_f64(
                    (newest.saturating_sub(replayed) as f64 / speed).min(3600.0),
                )
            }
            _ => Duration::ZERO,
        }
    }
}

/// Watermarks kept for the replay lag; more (a secondary that never
/// reports) drop the newest, which leaves the lag measured from the oldest.
const REPLAY_MARKS_MAX: usize = 1 << 16;

/// Shipped stops not yet acknowledged, and the newest acknowledged stop.
#[derive(Debug, Default)]
struct Marks {
    /// (stop, bytes shipped up to and including it), for mapping acks.
    pending: std::collections::VecDeque<(u64, u64)>,
    /// The newest stop the secondary said it has: a record of that stop or
    /// an earlier one shipped later (a heartbeat watermark repeating it) is
    /// covered already, and no new ack will come for it.
    acked_stop: Option<u64>,
}

impl Throttle {
    /// A brake at `cap` unacknowledged bytes and `max_lag`, and at
    /// `max_replay_lag` behind in the secondary's replay.
    pub fn new(cap: u64, max_lag: Duration, max_replay_lag: Duration) -> Self {
        Self {
            shipped: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            marks: Mutex::new(Default::default()),
            progress: Mutex::new(Instant::now()),
            cap,
            max_lag,
            replay: Mutex::new(ReplayMarks::default()),
            max_replay_lag,
            replay_waits: AtomicU64::new(0),
            catching_up: Default::default(),
            open: Default::default(),
            hold: Default::default(),
            parked: std::sync::atomic::AtomicU8::new(0),
            waits: AtomicU64::new(0),
            waited_us: AtomicU64::new(0),
        }
    }

    /// A record for `stop` of `bytes` was shipped.
    pub fn shipped(&self, stop: u64, bytes: u64) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        let total = self.shipped.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if self.open.load(Ordering::Acquire) {
            // No secondary to ack it: nothing to keep (a new one starts
            // from what is shipped then, see `protect`).
            return;
        }
        let covered = marks.acked_stop.is_some_and(|acked| stop <= acked);
        match marks.pending.back_mut() {
            // A record of an earlier stop shipped after a later one (a
            // heartbeat watermark while the vCPU sits in a stop it has not
            // left) is acked with the later one.
            Some((s, t)) if *s >= stop => *t = total,
            Some(_) => marks.pending.push_back((stop, total)),
            None if covered => {
                self.acked.fetch_max(total, Ordering::AcqRel);
            }
            None => {
                // Nothing was outstanding: the secondary's time to ack this
                // starts now, not at its last ack (which may be long ago
                // when the vCPU slept or the secondary was slow to connect).
                *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
                marks.pending.push_back((stop, total));
            }
        }
    }

    /// The secondary has everything up to stop `stop`.
    pub fn acked(&self, stop: u64) {
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.acked_stop = marks.acked_stop.max(Some(stop));
        let mut covered = None;
        while marks.pending.front().is_some_and(|(s, _)| *s <= stop) {
            covered = marks.pending.pop_front().map(|(_, t)| t);
        }
        drop(marks);
        if let Some(bytes) = covered {
            if self.acked.fetch_max(bytes, Ordering::AcqRel) < bytes {
                *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            }
        }
    }

    /// A watermark for `stop` was shipped: the secondary can replay up to
    /// it from now on.
    pub fn watermark_shipped(&self, stop: u64) {
        if self.open.load(Ordering::Acquire) {
            return;
        }
        let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        let newer = replay.shipped.back().is_none_or(|(w, _)| stop > *w)
            && replay.replayed.is_none_or(|r| stop > r);
        if newer && replay.shipped.len() < REPLAY_MARKS_MAX {
            replay.shipped.push_back((stop, Instant::now()));
        }
    }

    /// The secondary's replay has executed up to `stop`.
    pub fn replayed(&self, stop: u64) {
        let mut replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        replay.replayed = replay.replayed.max(Some(stop));
        while replay.shipped.front().is_some_and(|(w, _)| *w <= stop) {
            replay.shipped.pop_front();
        }
        // The replay's speed, measured only between reports where it had
        // shipped stops left all along (not waiting for the log).
        let now = Instant::now();
        let busy = !replay.shipped.is_empty();
        if let (Some((since, from)), true) = (replay.busy_since, busy) {
            let secs = now.duration_since(since).as_secs_f64();
            if secs < 0.005 || stop <= from {
                // Too short to measure, or a long stop: measure on.
                return;
            }
            let speed = (stop - from) as f64 / secs;
            replay.stops_per_s = Some(match replay.stops_per_s {
                Some(old) => 0.7 * old + 0.3 * speed,
                None => speed,
            });
        }
        replay.busy_since = busy.then_some((now, stop));
    }

    /// The newest stop the secondary reported replayed, if it reports.
    pub fn replayed_stop(&self) -> Option<u64> {
        self.replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replayed
    }

    /// How far behind the secondary's replay is: how long the oldest
    /// watermark it has not replayed has been shipped, or how long it needs
    /// to execute everything shipped at its measured speed, whichever is
    /// longer (zero: caught up, or it does not report). The second matters
    /// where the replay is slower than the primary: a primary that ran
    /// 2,600 stops in 0.3 s left a replay of 5 ms a stop 13 s behind.
    pub fn replay_lag(&self) -> Duration {
        let replay = self.replay.lock().unwrap_or_else(|p| p.into_inner());
        match (replay.replayed, replay.shipped.front()) {
            (Some(_), Some((_, at))) => at.elapsed().max(replay.catch_up()),
            _ => Duration::ZERO,
        }
    }

    /// Stops the vCPU at its next stop (a switch-over), until [`Self::unhold`].
    pub fn hold(&self) {
        self.hold.store(true, Ordering::Release);
    }

    /// Lets a held vCPU go on.
    pub fn unhold(&self) {
        self.hold.store(false, Ordering::Release);
    }

    /// Whether the vCPU waits because of a hold: None, or Some(halted).
    pub fn parked(&self) -> Option<bool> {
        match self.parked.load(Ordering::Acquire) {
            0 => None,
            state => Some(state == 2),
        }
    }

    /// Whether a hold is asked for.
    pub fn held(&self) -> bool {
        self.hold.load(Ordering::Acquire)
    }

    /// Never brake again (the secondary is gone and this side won).
    pub fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.catching_up.store(false, Ordering::Release);
    }

    /// A new secondary joined: brake again, counting from what is shipped now.
    pub fn protect(&self) {
        *self.marks.lock().unwrap_or_else(|p| p.into_inner()) = Marks::default();
        *self.replay.lock().unwrap_or_else(|p| p.into_inner()) = ReplayMarks::default();
        self.acked
            .store(self.shipped.load(Ordering::Acquire), Ordering::Release);
        *self.progress.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.catching_up.store(false, Ordering::Release);
        self.open.store(false, Ordering::Release);
    }

    /// Log bytes shipped so far.
    pub fn shipped_bytes(&self) -> u64 {
        self.shipped.load(Ordering::Acquire)
    }

    /// Unacknowledged bytes.
    pub fn unacked(&self) -> u64 {
        self.shipped
            .load(Ordering::Acquire)
            .saturating_sub(self.acked.load(Ordering::Acquire))
    }

    fn must_wait(&self) -> bool {
        if self.hold.load(Ordering::Acquire) {
            return true;
        }
        if self.open.load(Ordering::Acquire) {
            return false;
        }
        let unacked = self.unacked();
        let stale = self
            .progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        unacked > self.cap || (unacked > 0 && stale > self.max_lag) || self.replay_behind()
    }

    /// Whether kick stops should be sync points instead of positioned
    /// stops: a secondary replays a sync point by installing it, much
    /// faster than it lands on a positioned stop, so a replay slower than
    /// its primary catches up and the pair runs no slower than with sync
    /// points alone. On from half of `max_replay_lag` behind (before the
    /// brake at all of it), off again under a quarter.
    pub fn catch_up_wanted(&self) -> bool {
        if self.open.load(Ordering::Acquire) {
            return false;
        }
        let lag = self.replay_lag();
        let on = self.catching_up.load(Ordering::Acquire);
        let want = if on {
            lag > self.max_replay_lag / 4
        } else {
            lag > self.max_replay_lag / 2
        };
        if want != on {
            self.catching_up.store(want, Ordering::Release);
        }
        want
    }

    /// The secondary's replay is further behind than `max_replay_lag`.
    fn replay_behind(&self) -> bool {
        self.replay_lag() > self.max_replay_lag
    }

    /// Called by the vCPU at a stop: waits while the secondary is too far
    /// behind (the only place the vCPU waits on the network).
    pub fn wait(&self) {
        self.wait_as(1);
    }

    /// The halted vCPU waits while a hold lasts.
    pub fn wait_halted(&self) {
        if self.held() {
            self.wait_as(2);
        }
    }

    fn wait_as(&self, parked_state: u8) {
        if !self.must_wait() {
            return;
        }
        let start = Instant::now();
        let mut said = start;
        self.waits.fetch_add(1, Ordering::Relaxed);
        if self.replay_behind() {
            self.replay_waits.fetch_add(1, Ordering::Relaxed);
        }
        while self.must_wait() {
            if said.elapsed() > Duration::from_secs(2) {
                // Diagnostic: a brake that never lets go stops the guest.
                tracing::warn!(
                    unacked = self.unacked(),
                    held = self.hold.load(Ordering::Acquire),
                    replay_lag_ms = self.replay_lag().as_millis() as u64,
                    "the vCPU has waited {} ms for the secondary's acks or replay",
                    start.elapsed().as_millis()
                );
                said = Instant::now();
            }
            if self.hold.load(Ordering::Acquire) {
                self.parked.store(parked_state, Ordering::Release);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        self.parked.store(0, Ordering::Release);
        let us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.waited_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// Why the log could not be written or followed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The log file could not be written.
    #[error("recording to {path}: {source}")]
    Write {
        /// The log.
        path: PathBuf,
        /// Why.
        source: LogError,
    },
    /// The log could not be read.
    #[error("replaying {path}: {source}")]
    Read {
        /// The log.
        path: PathBuf,
        /// Why.
        source: LogError,
    },
    /// The replayed guest did something the recorded one did not.
    #[error("replay diverged at stop {stop}: {what}")]
    Diverged {
        /// Where.
        stop: u64,
        /// What differs.
        what: String,
    },
}

/// Where a recorder's writer thread puts records: a log file, or the
/// replication channel to a secondary.
pub trait RecordSink: Send {
    /// Appends one record.
    fn append(&mut self, record: &Record) -> Result<u64, LogError>;
    /// Makes everything appended durable (file) or sent (channel).
    fn sync(&mut self) -> Result<(), LogError>;
    /// Whether to write a watermark every round even if it did not move
    /// (a channel uses them as heartbeats).
    fn wants_heartbeats(&self) -> bool {
        false
    }
}

impl RecordSink for LogFile {
    fn append(&mut self, record: &Record) -> Result<u64, LogError> {
        LogFile::append(self, record)
    }
    fn sync(&mut self) -> Result<(), LogError> {
        LogFile::sync(self)
    }
}

/// Shared between the vCPU thread and the writer thread.
struct WriterShared {
    /// "The vCPU has left stop S": every record for stops ≤ S is queued.
    left: AtomicU64,
    /// First error the writer hit (the log is then closed).
    error: Mutex<Option<LogError>>,
}

/// A recording in progress.
pub struct Recorder {
    live: LiveInputs,
    tx: Option<Sender<ToWriter>>,
    shared: Arc<WriterShared>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
    /// Guest time of the last sync point.
    pub last_sync_ns: u64,
    /// Options.
    pub options: RecordOptions,
}

impl Recorder {
    /// Creates the log (header = `identity`) and starts its writer thread.
    pub fn start(
        options: RecordOptions,
        identity: &VmIdentity,
        live: LiveInputs,
    ) -> Result<Self, JournalError> {
        let file =
            LogFile::create(&options.path, identity, options.max_size).map_err(|source| {
                JournalError::Write {
                    path: options.path.clone(),
                    source,
                }
            })?;
        Self::start_with_sink(options, Box::new(file), live)
    }

    /// Starts a recorder writing to `sink` (a file or the replication channel).
    pub fn start_with_sink(
        options: RecordOptions,
        file: Box<dyn RecordSink>,
        live: LiveInputs,
    ) -> Result<Self, JournalError> {
        let period = options.sync_period;
        let (tx, rx) = channel();
        let shared = Arc::new(WriterShared {
            left: AtomicU64::new(0),
            error: Mutex::new(None),
        });
        let theirs = shared.clone();
        let writer = std::thread::Builder::new()
            .name("tandem-log".into())
            .spawn(move || write_loop(file, &rx, &theirs, period))
            .map_err(|e| JournalError::Write {
                path: options.path.clone(),
                source: LogError::Io(e),
            })?;
        Ok(Self {
            live,
            tx: Some(tx),
            shared,
            writer: Some(writer),
            path: options.path.clone(),
            last_sync_ns: 0,
            options,
        })
    }

    fn send(&self, record: Record) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(ToWriter::Record(record));
        }
    }

    /// Ships what the writer has now instead of at its next tick.
    fn flush_now(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(ToWriter::Flush);
        }
    }

    /// A failure of the writer so far, if any.
    fn writer_error(&self) -> Option<JournalError> {
        let mut slot = self.shared.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.take().map(|source| JournalError::Write {
            path: self.path.clone(),
            source,
        })
    }

    /// Closes the log with its End record and waits until it is on disk.
    fn finish(&mut self, stop: u64, outcome: EndOutcome) -> Result<(), JournalError> {
        self.send(Record::End { stop, outcome });
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        match self.writer_error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// What the vCPU sends its writer thread.
// Records travel by value as before; boxing them to shrink the rare Flush
// would cost an allocation per record.
#[allow(clippy::large_enum_variant)]
enum ToWriter {
    /// A record to append.
    Record(Record),
    /// Append and ship now (an output waits for the secondary's ack).
    Flush,
}

/// The writer thread: every [`RECORD_SYNC_PERIOD`] appends what the vCPU
/// sent, with a watermark at the boundary of the stops it has left, and
/// fsyncs.
fn write_loop(
    mut file: Box<dyn RecordSink>,
    rx: &Receiver<ToWriter>,
    shared: &WriterShared,
    period: Duration,
) {
    let fail = |e: LogError| {
        let mut slot = shared.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(e);
    };
    let mut last_watermark: Option<u64> = None;
    // The highest stop of any record appended: a watermark below it would
    // make stops go backwards (a batch can hold records of a stop the vCPU
    // left after `left` was read).
    let mut highest: Option<u64> = None;
    let mut next_sync = Instant::now() + period;
    let mut batch: Vec<Record> = Vec::new();
    loop {
        let wait = next_sync.saturating_duration_since(Instant::now());
        let closed = match rx.recv_timeout(wait) {
            Ok(ToWriter::Record(r)) => {
                batch.push(r);
                false
            }
            Ok(ToWriter::Flush) => {
                next_sync = Instant::now();
                false
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => true,
        };
        if Instant::now() < next_sync && !closed {
            continue;
        }
        // Every record for stops ≤ `left` was sent before `left` was
        // published, so after this drain they are all in the batch.
        let left = shared.left.load(Ordering::Acquire);
        batch.extend(rx.try_iter().filter_map(|m| match m {
            ToWriter::Record(r) => Some(r),
            ToWriter::Flush => None,
        }));
        let mut watermark_due = highest.is_none_or(|h| h <= left)
            && last_watermark.is_none_or(|w| left > w || (left == w && file.wants_heartbeats()));
        for r in batch.drain(..) {
            if watermark_due && r.stop() > left {
                if let Err(e) = file.append(&Record::Watermark { stop: left }) {
                    return fail(e);
                }
                last_watermark = Some(left);
                watermark_due = false;
            }
            if matches!(r, Record::End { .. }) {
                watermark_due = false;
            }
            if let Err(e) = file.append(&r) {
                return fail(e);
            }
            highest = highest.max(Some(r.stop()));
        }
        if watermark_due && !closed {
            if let Err(e) = file.append(&Record::Watermark { stop: left }) {
                return fail(e);
            }
            last_watermark = Some(left);
        }
        if let Err(e) = file.sync() {
            return fail(e);
        }
        if closed {
            return;
        }
        next_sync = Instant::now() + period;
    }
}

/// Where a replayer's records come from.
enum Source {
    /// A log file (offline replay).
    File(LogReader<BufReader<File>>),
    /// Records arriving from a primary (a live secondary).
    Live(LiveFeed),
}

/// Records arriving from the primary, with what has been seen so far.
struct LiveFeed {
    rx: Receiver<Record>,
    buffered: std::collections::VecDeque<Record>,
    disconnected: bool,
    /// The highest stop of any record received.
    max_stop: Option<u64>,
    /// The highest watermark received.
    watermark: Option<u64>,
    /// The End record arrived.
    ended: bool,
}

impl LiveFeed {
    fn note(&mut self, record: Record) {
        match record {
            Record::Watermark { stop } => {
                self.watermark = Some(self.watermark.map_or(stop, |w| w.max(stop)));
            }
            r => {
                self.ended |= matches!(r, Record::End { .. });
                self.max_stop = Some(self.max_stop.map_or(r.stop(), |m| m.max(r.stop())));
                self.buffered.push_back(r);
            }
        }
    }

    /// Takes whatever has arrived, without waiting.
    fn poll(&mut self) {
        loop {
            match self.rx.try_recv() {
                Ok(r) => self.note(r),
                Err(std::sync::mpsc::TryRecvError::Empty) => return,
                Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    return;
                }
            }
        }
    }

    /// Waits for one more record; false once the primary is gone.
    fn wait_one(&mut self) -> bool {
        match self.rx.recv() {
            Ok(r) => {
                self.note(r);
                true
            }
            Err(_) => {
                self.disconnected = true;
                false
            }
        }
    }

    /// Has the primary left `stop` (so all of its records are here)?
    fn left(&self, stop: u64) -> bool {
        self.ended
            || self.watermark.is_some_and(|w| w >= stop)
            || self.max_stop.is_some_and(|m| m > stop)
    }
}

/// What the vCPU may do after a stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Leave {
    /// Re-enter the guest.
    Enter,
    /// An offline replay reached the end of a cut-short log.
    ReplayEnd,
    /// A live secondary has replayed everything its primary sent, and the
    /// primary is gone: go live here.
    GoLive,
}

/// A replay in progress.
pub struct Replayer {
    source: Source,
    path: PathBuf,
    /// One record of lookahead.
    next: Option<Record>,
    /// The vCPU may enter the guest from stop j only while j < limit
    /// (None: the log is complete, no limit).
    limit: Option<u64>,
    /// The recorded ending, once reached.
    pub end: Option<(u64, EndOutcome)>,
    /// Cross-checks that did not match.
    pub check_mismatches: u64,
    /// A torn tail or corruption met while reading (reported, then replay stops).
    pub damage: Option<LogError>,
}

/// Where the recorder interrupted the guest (a positioned stop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedPosition {
    /// Guest instructions since the previous stop.
    pub count: u64,
    /// RIP there.
    pub rip: u64,
    /// The position digest there.
    pub digest: u64,
}

/// An epoch end as the recorder logged it.
#[derive(Clone, Debug)]
pub struct RecordedEpoch {
    /// Epoch number.
    pub epoch: u64,
    /// Pages the recorder dirtied in the epoch, run-length encoded.
    pub pages: Vec<(u64, u32)>,
    /// Component hashes.
    pub hashes: Vec<(String, u64)>,
    /// The scrub slice.
    pub scrub: tandem_replay::log::Scrub,
}

/// What a first pass over a log found.
#[derive(Clone, Debug, Default)]
pub struct LogSummary {
    /// The End record's stop and outcome.
    pub end: Option<(u64, EndOutcome)>,
    /// The highest watermark.
    pub watermark: Option<u64>,
    /// Whether the log ends in a torn frame.
    pub torn: bool,
}

/// Reads the whole log once: is it complete, and how far may replay go?
pub fn summarize(path: &Path) -> Result<(VmIdentity, LogSummary), JournalError> {
    let read_err = |source| JournalError::Read {
        path: path.to_path_buf(),
        source,
    };
    let (mut reader, identity) = LogFile::open(path).map_err(read_err)?;
    let mut summary = LogSummary::default();
    loop {
        match reader.read_record() {
            Ok(Some(Record::End { stop, outcome })) => summary.end = Some((stop, outcome)),
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) if e.is_torn_tail() => {
                summary.torn = true;
                break;
            }
            Err(e) => return Err(read_err(e)),
        }
    }
    summary.watermark = reader.watermark();
    Ok((identity, summary))
}

impl Replayer {
    /// Opens `path` for replay, given what [`summarize`] found.
    pub fn open(path: &Path, summary: &LogSummary) -> Result<Self, JournalError> {
        let (reader, _) = LogFile::open(path).map_err(|source| JournalError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let limit = match summary.end {
            Some(_) => None,
            None => Some(summary.watermark.map_or(0, |w| w + 1)),
        };
        let mut replayer = Self {
            source: Source::File(reader),
            path: path.to_path_buf(),
            next: None,
            limit,
            end: None,
            check_mismatches: 0,
            damage: None,
        };
        replayer.advance();
        Ok(replayer)
    }

    /// A replayer following a live primary: records arrive on `rx`, and the
    /// channel closing means the primary is gone (the caller decided so).
    pub fn live(rx: Receiver<Record>) -> Self {
        let mut replayer = Self {
            source: Source::Live(LiveFeed {
                rx,
                buffered: Default::default(),
                disconnected: false,
                max_stop: None,
                watermark: None,
                ended: false,
            }),
            path: PathBuf::from("<replication channel>"),
            next: None,
            limit: None,
            end: None,
            check_mismatches: 0,
            damage: None,
        };
        replayer.advance();
        replayer
    }

    /// Live: waits for the first record; if it is a sync point at stop S,
    /// the primary was already running and this replay starts at S.
    pub fn joined_at(&mut self) -> Option<u64> {
        if !self.is_live() {
            return None;
        }
        while self.next.is_none() {
            let Source::Live(feed) = &mut self.source else {
                return None;
            };
            if !feed.wait_one() {
                return None;
            }
            self.advance();
        }
        match &self.next {
            Some(Record::SyncPoint { stop, .. }) => Some(*stop),
            _ => None,
        }
    }

    /// Is this a live secondary?
    pub fn is_live(&self) -> bool {
        matches!(self.source, Source::Live(_))
    }

    /// Live: takes what has arrived and fills an empty lookahead from it.
    /// Never poll the feed without this: a record polled into `buffered`
    /// behind an empty lookahead, with the watermark that covers it, would
    /// let the vCPU enter its stop without it.
    fn poll_live(&mut self) {
        if let Source::Live(feed) = &mut self.source {
            feed.poll();
        }
        if self.next.is_none() {
            self.advance();
        }
    }

    /// Loads the next non-watermark record into the lookahead.
    fn advance(&mut self) {
        self.next = None;
        if let Source::Live(feed) = &mut self.source {
            feed.poll();
            while let Some(r) = feed.buffered.pop_front() {
                match r {
                    Record::End { stop, outcome } => self.end = Some((stop, outcome)),
                    r => {
                        tracing::trace!(kind = r.kind(), stop = r.stop(), "log record");
                        self.next = Some(r);
                        return;
                    }
                }
            }
            return;
        }
        let Source::File(reader) = &mut self.source else {
            return;
        };
        while self.damage.is_none() {
            match reader.read_record() {
                Ok(Some(Record::Watermark { .. })) => continue,
                Ok(Some(Record::End { stop, outcome })) => {
                    self.end = Some((stop, outcome));
                    return;
                }
                Ok(Some(r)) => {
                    tracing::trace!(kind = r.kind(), stop = r.stop(), "log record");
                    self.next = Some(r);
                    return;
                }
                Ok(None) => return,
                Err(e) => self.damage = Some(e),
            }
        }
    }

    /// The log's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// May the vCPU re-enter the guest after stop `stop`? Live, this waits
    /// until the primary has left stop `stop + 1` (all of its records are
    /// here) or is gone.
    pub fn may_enter(&mut self, stop: u64) -> Leave {
        if !self.is_live() {
            return if self.limit.is_none_or(|limit| stop + 1 < limit) {
                Leave::Enter
            } else {
                Leave::ReplayEnd
            };
        }
        loop {
            self.poll_live();
            let Source::Live(feed) = &mut self.source else {
                return Leave::Enter;
            };
            let beyond = self.next.as_ref().is_some_and(|r| r.stop() > stop + 1);
            if beyond || feed.left(stop + 1) {
                return Leave::Enter;
            }
            if feed.disconnected || !feed.wait_one() {
                return Leave::GoLive;
            }
        }
    }

    /// Live, while the guest is halted at `stop` and nothing logged so far
    /// wakes it: waits for more from the primary. False when the primary is
    /// gone (go live) ; an error when the primary has left this stop.
    pub fn wait_at(&mut self, stop: u64) -> Result<bool, JournalError> {
        if !self.is_live() {
            return Ok(false);
        }
        self.poll_live();
        if matches!(self.next, Some(Record::Cause { stop: s, .. }) if s <= stop) {
            // An input for this stop arrived: let the caller apply it.
            return Ok(true);
        }
        let stuck = self.next.as_ref().is_none_or(|r| r.stop() > stop);
        let Source::Live(feed) = &mut self.source else {
            return Ok(false);
        };
        if stuck && feed.left(stop) {
            return Err(JournalError::Diverged {
                stop,
                what: "the guest halted and nothing the primary logged for this stop wakes it"
                    .into(),
            });
        }
        if feed.disconnected || !feed.wait_one() {
            return Ok(false);
        }
        self.poll_live();
        Ok(true)
    }

    /// The highest watermark received from a live primary.
    pub fn received_watermark(&self) -> Option<u64> {
        match &self.source {
            Source::Live(feed) => feed.watermark,
            Source::File(reader) => reader.watermark(),
        }
    }

    /// The sync point recorded for `stop`, if the next record is one.
    pub fn take_sync_point(&mut self, stop: u64) -> Option<(MachineState, Vec<Page>)> {
        match self.next.take() {
            Some(Record::SyncPoint {
                stop: s,
                state,
                pages,
            }) if s == stop => {
                self.advance();
                Some((state, pages))
            }
            other => {
                self.next = other;
                None
            }
        }
    }

    /// Whether the next record is the sync point recorded for `stop`.
    pub fn sync_point_next(&self, stop: u64) -> bool {
        matches!(&self.next, Some(Record::SyncPoint { stop: s, .. }) if *s == stop)
    }

    /// The positioned stop recorded for `stop`, if the next record is one.
    pub fn take_positioned(&mut self, stop: u64) -> Option<RecordedPosition> {
        match self.next.take() {
            Some(Record::Positioned {
                stop: s,
                count,
                rip,
                digest,
            }) if s == stop => {
                self.advance();
                Some(RecordedPosition { count, rip, digest })
            }
            other => {
                self.next = other;
                None
            }
        }
    }

    /// The epoch end recorded at `stop`, if the next record is one:
    /// (epoch, page runs, component hashes, scrub).
    pub fn take_epoch_end(&mut self, stop: u64) -> Option<RecordedEpoch> {
        match self.next.take() {
            Some(Record::EpochEnd {
                epoch,
                stop: s,
                pages,
                hashes,
                scrub,
            }) if s == stop => {
                self.advance();
                Some(RecordedEpoch {
                    epoch,
                    pages,
                    hashes,
                    scrub,
                })
            }
            other => {
                self.next = other;
                None
            }
        }
    }

    /// The console bytes recorded at `stop`, if the next record holds them.
    pub fn take_serial_out(&mut self, stop: u64) -> Option<Vec<u8>> {
        match self.next.take() {
            Some(Record::Check {
                stop: s,
                check: Check::SerialOut { bytes },
            }) if s == stop => {
                self.advance();
                Some(bytes)
            }
            other => {
                self.next = other;
                None
            }
        }
    }

    /// At a guest crash at `stop`: how the recording recovered there (its
    /// `GuestReboot` or `GuestRollback` check is next; Some(None): it did
    /// not). A live replay waits until the primary has said; None when the
    /// primary is gone before that.
    pub fn recovery_logged(&mut self, stop: u64) -> Option<Option<Check>> {
        loop {
            match &self.next {
                Some(Record::Check {
                    stop: s,
                    check: check @ (Check::GuestReboot { .. } | Check::GuestRollback { .. }),
                }) if *s == stop => {
                    let check = check.clone();
                    self.advance();
                    return Some(Some(check));
                }
                Some(_) => return Some(None),
                None if self.end.is_some() => return Some(None),
                None => {}
            }
            let Source::Live(feed) = &mut self.source else {
                return Some(None);
            };
            if feed.left(stop) && feed.buffered.is_empty() {
                return Some(None);
            }
            if feed.disconnected || !feed.wait_one() {
                return None;
            }
            self.advance();
        }
    }

    /// Whether the recording took a checkpoint at `stop` (its `Checkpoint`
    /// check is next; everything for `stop` has arrived by the time the
    /// replay is there).
    pub fn take_checkpoint(&mut self, stop: u64) -> bool {
        match &self.next {
            Some(Record::Check {
                stop: s,
                check: Check::Checkpoint,
            }) if *s == stop => {
                self.advance();
                true
            }
            _ => false,
        }
    }

    /// Compares a cross-check with the log.
    pub fn check(&mut self, stop: u64, check: &Check) -> Result<(), JournalError> {
        match self.next.take() {
            Some(Record::Check { stop: s, check: c }) if s == stop => {
                self.advance();
                if c != *check {
                    self.check_mismatches += 1;
                    return Err(JournalError::Diverged {
                        stop,
                        what: format!("recorded {c:?}, replay saw {check:?}"),
                    });
                }
                Ok(())
            }
            other => {
                self.next = other;
                self.check_mismatches += 1;
                Err(JournalError::Diverged {
                    stop,
                    what: format!("replay saw {check:?}, which the recording did not"),
                })
            }
        }
    }

    /// Consumes cross-checks left behind at stops before `stop` (the replay
    /// did not do what the recording did there): returns how many, and the
    /// console bytes among them, which still belong on the console.
    pub fn skip_stale_checks(&mut self, stop: u64) -> (u64, Vec<u8>) {
        let mut skipped = 0;
        let mut console = Vec::new();
        while let Some(Record::Check { stop: s, check }) = &self.next {
            if *s >= stop {
                break;
            }
            if let Check::SerialOut { bytes } = check {
                console.extend_from_slice(bytes);
            }
            skipped += 1;
            self.advance();
        }
        (skipped, console)
    }

    /// Whether nothing but the End record (or nothing) is left to replay.
    pub fn at_end(&self) -> bool {
        matches!(self.next, None | Some(Record::End { .. }))
    }

    /// Whether nothing more will come: all of a file is read, or a live
    /// primary sent its End record and everything before it was taken.
    pub fn nothing_more(&self) -> bool {
        self.at_end()
            && match &self.source {
                Source::File(_) => true,
                Source::Live(feed) => feed.ended && feed.buffered.is_empty(),
            }
    }

    /// Passes stop `stop` without the guest (a missed landing waiting for
    /// its repair): consumes its causes (returned, to be applied), checks
    /// and epoch end; returns the causes and the console bytes recorded
    /// there. A sync point or the end are left for the caller.
    pub fn pass_stop(&mut self, stop: u64) -> (Vec<Cause>, Vec<u8>) {
        let mut causes = Vec::new();
        let mut console = Vec::new();
        loop {
            match self.next.take() {
                Some(Record::Cause { stop: s, cause }) if s == stop => causes.push(cause),
                Some(Record::Check { stop: s, check }) if s == stop => {
                    if let Check::SerialOut { bytes } = check {
                        console.extend_from_slice(&bytes);
                    }
                }
                Some(Record::EpochEnd { stop: s, .. }) if s == stop => {}
                other => {
                    self.next = other;
                    return (causes, console);
                }
            }
            self.advance();
        }
    }

    /// Records at a stop the replay has already left mean the two runs took
    /// different paths.
    pub fn stale_record(&self, stop: u64) -> Option<JournalError> {
        let next = self.next.as_ref()?;
        (next.stop() < stop).then(|| JournalError::Diverged {
            stop,
            what: format!(
                "the log still holds a kind {} record for stop {}",
                next.kind(),
                next.stop()
            ),
        })
    }

    /// What the next unconsumed record is, for divergence reports.
    pub fn next_record(&self) -> Option<String> {
        self.next.as_ref().map(|r| match r {
            Record::Cause { stop, cause } => format!("a cause at stop {stop}: {}", brief(cause)),
            other => format!("a kind {} record at stop {}", other.kind(), other.stop()),
        })
    }

    /// Whether anything at all is left in the log.
    pub fn exhausted(&self) -> bool {
        self.next.is_none()
    }
}

impl Inputs for Replayer {
    fn collect(&mut self, stop: u64, out: &mut Vec<Cause>) {
        loop {
            match self.next.take() {
                Some(Record::Cause { stop: s, cause }) if s == stop => {
                    out.push(cause);
                    self.advance();
                }
                other => {
                    self.next = other;
                    return;
                }
            }
        }
    }

    fn wait(&mut self, _deadline_ns: Option<u64>) {
        // Replay never waits on host time: HLT waits only on the log, and
        // the vCPU loop ends the replay when the log has nothing more.
    }
}

/// The source of a VM's inputs and the sink of its log.
pub enum Journal {
    /// Live, unrecorded.
    Live(LiveInputs),
    /// Live and recording.
    Record(Box<Recorder>),
    /// Replaying a log.
    Replay(Box<Replayer>),
}

impl Journal {
    /// Collects and (recording) logs the causes of `stop`.
    pub fn collect(&mut self, stop: u64, out: &mut Vec<Cause>) {
        match self {
            Journal::Live(live) => live.collect(stop, out),
            Journal::Record(rec) => {
                let first = out.len();
                rec.live.collect(stop, out);
                let mirrored = rec.options.mirrored;
                for cause in &out[first..] {
                    let cause = match cause {
                        Cause::BlockDone {
                            device,
                            request,
                            status,
                            data,
                        } if mirrored && !data.is_empty() => Cause::BlockReadHashed {
                            device: *device,
                            request: *request,
                            status: *status,
                            len: data.len() as u32,
                            hash: crate::backend::replica::data_hash(data),
                        },
                        other => other.clone(),
                    };
                    rec.send(Record::Cause { stop, cause });
                }
            }
            Journal::Replay(rep) => rep.collect(stop, out),
        }
    }

    /// Live: puts inputs back at the head of the world's queue, to be
    /// collected (and logged) again. A replay gets them from the log.
    pub fn requeue(&mut self, causes: Vec<Cause>) {
        match self {
            Journal::Live(live) => live.requeue(causes),
            Journal::Record(rec) => rec.live.requeue(causes),
            Journal::Replay(_) => {}
        }
    }

    /// Tells live inputs the next device deadline (time always advances
    /// to it once reached).
    pub fn set_deadline(&mut self, deadline_ns: Option<u64>) {
        match self {
            Journal::Live(live) => live.set_deadline(deadline_ns),
            Journal::Record(rec) => rec.live.set_deadline(deadline_ns),
            Journal::Replay(_) => {}
        }
    }

    /// Waits (live) until a cause may be there or `deadline_ns` passes.
    pub fn wait(&mut self, deadline_ns: Option<u64>) {
        match self {
            Journal::Live(live) => live.wait(deadline_ns),
            Journal::Record(rec) => rec.live.wait(deadline_ns),
            Journal::Replay(rep) => rep.wait(deadline_ns),
        }
    }

    /// Called as the vCPU re-enters the guest from `stop`: the recorder
    /// publishes its watermark; a replay may have to stop or go live here.
    pub fn leave_stop(&mut self, stop: u64, output_waits: bool) -> Result<Leave, JournalError> {
        match self {
            Journal::Live(_) => Ok(Leave::Enter),
            Journal::Record(rec) => {
                rec.shared.left.store(stop, Ordering::Release);
                // An output held at this stop waits for the secondary's ack
                // of the watermark that covers it: ship that now.
                if output_waits {
                    rec.flush_now();
                }
                if let Some(throttle) = &rec.options.throttle {
                    throttle.wait();
                }
                match rec.writer_error() {
                    Some(e) => Err(e),
                    None => Ok(Leave::Enter),
                }
            }
            Journal::Replay(rep) => Ok(rep.may_enter(stop)),
        }
    }

    /// A halted recording vCPU waits here while a switch-over holds it
    /// (after shipping what this stop logged so far).
    pub fn park_if_held(&mut self) {
        if let Journal::Record(rec) = self {
            if let Some(throttle) = rec.options.throttle.clone() {
                if throttle.held() {
                    rec.flush_now();
                    throttle.wait_halted();
                }
            }
        }
    }

    /// A cross-check: logged when recording, compared when replaying.
    pub fn check(&mut self, stop: u64, check: Check) -> Result<(), JournalError> {
        match self {
            Journal::Live(_) => Ok(()),
            Journal::Record(rec) => {
                rec.send(Record::Check { stop, check });
                Ok(())
            }
            Journal::Replay(rep) => rep.check(stop, &check),
        }
    }

    /// Logs an epoch end (recording only).
    pub fn epoch_end(&mut self, record: Record) {
        if let Journal::Record(rec) = self {
            rec.send(record);
        }
    }

    /// Logs a positioned stop (recording only): the first record of `stop`.
    pub fn positioned(&mut self, stop: u64, at: RecordedPosition) {
        if let Journal::Record(rec) = self {
            rec.send(Record::Positioned {
                stop,
                count: at.count,
                rip: at.rip,
                digest: at.digest,
            });
        }
    }

    /// Logs a sync point (recording only).
    pub fn sync_point(&mut self, stop: u64, state: MachineState, pages: Vec<Page>) {
        if let Journal::Record(rec) = self {
            rec.send(Record::SyncPoint { stop, state, pages });
        }
    }

    /// Closes a recording with its outcome.
    pub fn finish(&mut self, stop: u64, outcome: EndOutcome) -> Result<(), JournalError> {
        match self {
            Journal::Record(rec) => rec.finish(stop, outcome),
            Journal::Live(_) | Journal::Replay(_) => Ok(()),
        }
    }

    /// Recording for a secondary whose replay is catching up (see
    /// [`Throttle::catch_up_wanted`]).
    pub fn secondary_catching_up(&self) -> bool {
        match self {
            Journal::Record(rec) => rec
                .options
                .throttle
                .as_ref()
                .is_some_and(|t| t.catch_up_wanted()),
            Journal::Live(_) | Journal::Replay(_) => false,
        }
    }

    /// Is this a recording?
    pub fn recording(&self) -> bool {
        matches!(self, Journal::Record(_))
    }

    /// The replayer, when replaying (shared).
    pub fn replayer_ref(&self) -> Option<&Replayer> {
        match self {
            Journal::Replay(rep) => Some(rep),
            _ => None,
        }
    }

    /// The replayer, when replaying.
    pub fn replayer(&mut self) -> Option<&mut Replayer> {
        match self {
            Journal::Replay(rep) => Some(rep),
            _ => None,
        }
    }
}

fn brief(cause: &Cause) -> String {
    match cause {
        Cause::Time(ns) => format!("time {ns} ns"),
        Cause::SerialInput(b) => format!("{} serial bytes", b.len()),
        Cause::NetRx { device, frame } => format!("net{device} frame of {} bytes", frame.len()),
        Cause::BlockDone {
            device, request, ..
        } => format!("blk{device} completion of request {request}"),
        Cause::BlockReadHashed {
            device, request, ..
        } => format!("blk{device} completion of read {request} (hash only)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps what it is given.
    struct Kept(Arc<Mutex<Vec<Record>>>);

    impl RecordSink for Kept {
        fn append(&mut self, record: &Record) -> Result<u64, LogError> {
            self.0.lock().unwrap().push(record.clone());
            Ok(1)
        }
        fn sync(&mut self) -> Result<(), LogError> {
            Ok(())
        }
    }

    #[test]
    fn a_watermark_never_follows_a_record_of_a_later_stop() {
        // The writer read `left` = 478, then its drain found records of
        // stops 479 and 480 (the vCPU left 479 in between). Once `left`
        // reads 479, a watermark for 479 would come after the record at
        // 480: stops going backwards, which the reader refuses.
        let kept: Arc<Mutex<Vec<Record>>> = Arc::default();
        let shared = Arc::new(WriterShared {
            left: AtomicU64::new(478),
            error: Mutex::new(None),
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let check = |stop| {
            ToWriter::Record(Record::Check {
                stop,
                check: Check::Injected { vector: 32 },
            })
        };
        tx.send(check(479)).unwrap();
        tx.send(check(480)).unwrap();
        let writer = {
            let (shared, sink) = (shared.clone(), Kept(kept.clone()));
            std::thread::spawn(move || {
                write_loop(Box::new(sink), &rx, &shared, Duration::from_millis(1))
            })
        };
        std::thread::sleep(Duration::from_millis(30));
        shared.left.store(479, Ordering::Release);
        std::thread::sleep(Duration::from_millis(30));
        shared.left.store(480, Ordering::Release);
        std::thread::sleep(Duration::from_millis(30));
        drop(tx);
        writer.join().unwrap();
        let mut order = tandem_replay::log::OrderCheck::new();
        let records = kept.lock().unwrap().clone();
        for r in &records {
            order
                .check(r)
                .unwrap_or_else(|e| panic!("{e}: {records:?}"));
        }
        assert_eq!(order.watermark(), Some(480), "{records:?}");
    }

    #[test]
    fn a_live_replay_enters_a_stop_only_with_its_records_in_hand() {
        // The primary ships each stop's records, then a watermark for it,
        // while the replay follows. A record that arrives between the
        // replay's look at its lookahead and its look at the watermark must
        // not be left behind the lookahead: the stop would run without it
        // (an epoch end unchecked, a cross-check reported as missing).
        const STOPS: u64 = 20_000;
        let (tx, rx) = std::sync::mpsc::channel();
        let primary = std::thread::spawn(move || {
            for stop in 1..=STOPS {
                let check = Check::Injected { vector: 32 };
                tx.send(Record::Check { stop, check }).unwrap();
                tx.send(Record::Watermark { stop }).unwrap();
                // Keep pace with the replay, so that records keep arriving
                // while it looks (a sender far ahead never shows the race).
                let until = Instant::now() + Duration::from_nanos(500 + stop % 7 * 300);
                while Instant::now() < until {
                    std::hint::spin_loop();
                }
            }
        });
        let mut replay = Replayer::live(rx);
        for stop in 1..=STOPS {
            assert_eq!(replay.may_enter(stop - 1), Leave::Enter);
            replay
                .check(stop, &Check::Injected { vector: 32 })
                .unwrap_or_else(|e| panic!("entering stop {stop}: {e}"));
        }
        primary.join().unwrap();
    }

    #[test]
    fn throttle_brakes_on_the_byte_cap_and_on_a_lagging_secondary() {
        let t = Throttle::new(1000, Duration::from_millis(30), Duration::from_secs(3600));
        t.shipped(1, 600);
        t.shipped(2, 300);
        assert!(!t.must_wait(), "under the cap and fresh");
        t.shipped(3, 200);
        assert_eq!(t.unacked(), 1100);
        assert!(t.must_wait(), "over the cap");
        t.acked(2);
        assert_eq!(t.unacked(), 200);
        assert!(!t.must_wait());
        std::thread::sleep(Duration::from_millis(40));
        assert!(t.must_wait(), "the secondary sat on shipped data too long");
        t.acked(3);
        assert!(!t.must_wait(), "all acked");
        t.shipped(4, 5000);
        t.open();
        assert!(!t.must_wait(), "an open brake never waits");
        t.wait();
    }

    #[test]
    fn throttle_brakes_on_a_replay_that_stays_behind_a_shipped_watermark() {
        let t = Throttle::new(
            1 << 30,
            Duration::from_secs(3600),
            Duration::from_millis(30),
        );
        t.watermark_shipped(5);
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            !t.must_wait(),
            "a secondary that never reported is not braked on"
        );
        assert_eq!(t.replay_lag(), Duration::ZERO);
        t.replayed(5);
        assert_eq!(t.replayed_stop(), Some(5));
        t.watermark_shipped(9);
        t.watermark_shipped(12);
        assert!(!t.must_wait(), "fresh watermarks");
        std::thread::sleep(Duration::from_millis(40));
        assert!(t.replay_lag() >= Duration::from_millis(40));
        assert!(t.must_wait(), "the replay sat behind watermark 9 too long");
        t.replayed(10);
        assert!(
            t.must_wait(),
            "watermark 12 is as old and still not replayed"
        );
        t.watermark_shipped(14);
        t.replayed(12);
        assert!(!t.must_wait(), "only watermark 14 is left, and it is fresh");
        t.watermark_shipped(11);
        t.replayed(13);
        assert_eq!(t.replayed_stop(), Some(13));
        std::thread::sleep(Duration::from_millis(40));
        assert!(t.must_wait(), "watermark 14");
        t.protect();
        assert!(!t.must_wait(), "a new secondary starts unmeasured");
    }

    #[test]
    fn a_replay_falling_behind_asks_for_sync_points_before_the_brake() {
        // Bound 400 ms: sync points from 200 ms behind, positions again
        // under 100 ms, the brake at 400 ms.
        let t = Throttle::new(
            1 << 30,
            Duration::from_secs(3600),
            Duration::from_millis(400),
        );
        t.replayed(0);
        for stop in (10..=1000).step_by(10) {
            t.watermark_shipped(stop);
        }
        t.replayed(1);
        std::thread::sleep(Duration::from_millis(50));
        t.replayed(201);
        // 800 stops left at ~4,000 a second: ~200 ms of work, or more
        // where the sleep overran on a loaded host.
        let lag = t.replay_lag();
        if lag > Duration::from_millis(200) && lag < Duration::from_millis(400) {
            assert!(t.catch_up_wanted(), "{lag:?} behind");
            assert!(!t.must_wait(), "{lag:?} is not braked yet");
        }
        // Further behind: sync points for sure.
        std::thread::sleep(Duration::from_millis(100));
        t.replayed(301);
        assert!(t.catch_up_wanted(), "{:?} behind", t.replay_lag());
        // Hysteresis: still on between a quarter and a half of the bound.
        std::thread::sleep(Duration::from_millis(20));
        t.replayed(700);
        let lag = t.replay_lag();
        if lag > Duration::from_millis(100) {
            assert!(t.catch_up_wanted(), "{lag:?} behind, on since above 200 ms");
        }
        // Caught up: positions again.
        t.replayed(1000);
        assert!(!t.catch_up_wanted(), "caught up");
        // No secondary any more: never.
        t.open();
        assert!(!t.catch_up_wanted());
    }

    #[test]
    fn throttle_brakes_on_a_replay_too_slow_to_catch_up_soon() {
        // The primary ships 1,000 stops in a moment; the replay executes
        // 100 stops in ~50 ms: fresh watermarks, but ~450 ms of work left.
        let t = Throttle::new(
            1 << 30,
            Duration::from_secs(3600),
            Duration::from_millis(300),
        );
        t.replayed(0);
        for stop in (10..=1000).step_by(10) {
            t.watermark_shipped(stop);
        }
        t.replayed(1);
        assert!(!t.must_wait(), "no speed measured yet");
        std::thread::sleep(Duration::from_millis(50));
        t.replayed(101);
        let lag = t.replay_lag();
        assert!(
            lag >= Duration::from_millis(300) && lag < Duration::from_secs(60),
            "{lag:?}"
        );
        assert!(
            t.must_wait(),
            "900 stops at ~2,000 a second is too far behind"
        );
        // Nearly caught up at the same speed: no longer braked.
        std::thread::sleep(Duration::from_millis(50));
        t.replayed(990);
        assert!(!t.must_wait(), "10 stops left: {:?}", t.replay_lag());
        t.replayed(1000);
        assert_eq!(t.replay_lag(), Duration::ZERO, "caught up");
    }

    #[test]
    fn an_ack_covers_a_later_shipped_record_of_an_acked_stop() {
        // The secondary acked stop 0 before the primary shipped a heartbeat
        // watermark repeating stop 0: no ack will ever come for it, so it
        // must not count as outstanding (it braked the vCPU for good).
        let t = Throttle::new(1000, Duration::from_millis(30), Duration::from_secs(3600));
        t.acked(0);
        t.shipped(0, 13);
        assert_eq!(t.unacked(), 0);
        std::thread::sleep(Duration::from_millis(40));
        assert!(!t.must_wait(), "a covered heartbeat braked the vCPU");
        t.shipped(1, 13);
        assert_eq!(t.unacked(), 13);
        // A heartbeat of stop 0 behind stop 1's record is acked with it.
        t.shipped(0, 13);
        assert_eq!(t.unacked(), 26);
        t.acked(1);
        assert_eq!(t.unacked(), 0);
    }

    #[test]
    fn the_lag_clock_starts_when_something_is_outstanding() {
        // Long after the last ack (the guest slept, or the secondary took
        // a while to connect), newly shipped data gets the full max_lag.
        let t = Throttle::new(1000, Duration::from_millis(300), Duration::from_secs(3600));
        std::thread::sleep(Duration::from_millis(400));
        t.shipped(1, 10);
        assert!(!t.must_wait(), "fresh data counted as stale");
        std::thread::sleep(Duration::from_millis(400));
        assert!(t.must_wait());
    }
}
