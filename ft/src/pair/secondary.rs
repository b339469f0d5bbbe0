//! The secondary side of a pair: follows the primary's log, replaying it,
//! and takes over when the primary falls silent (or steps down).
//!
//! [`run_secondary`] connects, then starts four threads around one
//! [`Shared`] state: `tandem-follow` ([`follow`]: the primary's messages,
//! log bytes into a pipe), `tandem-decode` ([`decode`]: the pipe into
//! records for the replay), `tandem-ack` ([`ack`]: acks, pong echoes and
//! heartbeats back) and `tandem-monitor` ([`monitor`]: the primary's
//! silence, and [`take_over`]).
//!
//! Size: over 800 lines because it holds all four secondary threads and their
//! one shared state; each function is short (the longest, `take_over`, about
//! 65 lines).

use std::io::Write;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::ops::ControlFlow;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use tandem_replay::log::{LogError, LogReader, Page, Record, VmIdentity};
use tandem_replay::Outputs as _;
use tandem_vmm::backend::gate::FollowerOutputs;
use tandem_vmm::vm::RunMode;
use tandem_vmm::{Vm, VmConfig, VmHandle};
use tracing::{info, warn};

use super::follower::{
    decoded, Action, Decoded, Follower, GoLive, Progress, Reporter, TakeoverWatch,
};
use super::{
    millis, pair_record_options, publish, Ended, PairParams, Replicator, ShipFrame, ShipSink,
};
use crate::auth::Psk;
use crate::channel::{self, FrameReceiver, FrameSender};
use crate::fence::FenceReason;
use crate::mirror::MirrorReceiver;
use crate::silence::unread_bytes;
use crate::status::{self, Role};
use crate::wire::{self, Message, ToPrimary, PROTOCOL_MAX, PROTOCOL_MIN};

/// What the secondary's threads share.
struct Shared {
    /// The generation this side follows.
    generation: u64,
    /// The protocol version the primary chose (a resume keeps it: the
    /// same primary answers).
    protocol: u16,
    /// What `last_heard` counts from.
    base: Instant,
    /// When the primary was last heard (ms since `base`).
    last_heard: Arc<AtomicU64>,
    /// The received watermark (the newest stop the log covers so far; none
    /// before the first), and the ack thread's wake-up when it moves.
    received: (Mutex<Option<u64>>, Condvar),
    /// The replay's outputs, once the VM exists.
    follower_slot: OnceLock<Arc<FollowerOutputs>>,
    /// The monitor declared the primary gone: the other threads stop.
    gone: AtomicBool,
    /// The current connection's socket, for the monitor to shut without
    /// waiting on `link_out` (a send blocked behind a frozen primary holds it).
    link_socket: Mutex<Option<TcpStream>>,
    /// The current connection's sending half.
    link_out: Mutex<FrameSender>,
    /// A joiner's memory, pre-copied by the primary before the log starts.
    precopied: Mutex<Vec<Page>>,
    /// The newest ping from the primary (its send time + 1; 0: none): the
    /// acks thread echoes it, so the follow thread never blocks on a send.
    ping: AtomicU64,
    /// The primary handed over (a switch-over): go live now.
    step_down: AtomicBool,
    /// Why the follow thread gave up before the log started, if it did.
    follow_failed: Mutex<Option<String>>,
    /// The replay's progress (verified stop, divergence epoch), once the VM
    /// exists: the ack thread starts before (see `run_secondary`) and
    /// reports none until then.
    progress: OnceLock<VmHandle>,
}

impl Shared {
    fn new(generation: u64, protocol: u16, tx: FrameSender) -> Self {
        Self {
            generation,
            protocol,
            base: Instant::now(),
            last_heard: Arc::new(AtomicU64::new(0)),
            received: Default::default(),
            follower_slot: OnceLock::new(),
            gone: AtomicBool::new(false),
            link_socket: Mutex::new(tx.try_clone_socket().ok()),
            link_out: Mutex::new(tx),
            precopied: Mutex::default(),
            ping: AtomicU64::new(0),
            step_down: AtomicBool::new(false),
            follow_failed: Mutex::default(),
            progress: OnceLock::new(),
        }
    }

    /// Sends `m` on the current connection; a failed write is the follow
    /// thread's to notice (it reconnects).
    fn send(&self, m: &Message) {
        let mut link = self.link_out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = link.send(self.generation, m);
    }
}

/// Runs the secondary: follows the primary's log, replaying it, and when the
/// primary falls silent wins the next generation and goes live.
pub fn run_secondary(
    params: PairParams,
    vm_config: impl FnOnce(RunMode) -> VmConfig,
) -> anyhow::Result<Ended> {
    let (mut tx, input, generation, protocol) = connect(&params)?;
    // Mirrored storage: describe this host's replicas; the primary copies
    // what may differ before its log starts.
    let disk_sync = if params.mirrored {
        let receiver = MirrorReceiver::open(&params.disks, &params.replica_dir)?;
        tx.send(generation, &receiver.state_message())?;
        Some(receiver)
    } else {
        None
    };
    // Log bytes go through a socket pair into a log reader on its own
    // thread; closing our end is how the secondary stops taking the log.
    let (pipe_in, pipe_out) = UnixStream::pair()?;
    let pipe_closer = pipe_in.try_clone()?;
    let shared = Arc::new(Shared::new(generation, protocol, tx));
    let follower = Follow::new(&params, shared.clone(), pipe_in, disk_sync);
    spawn("tandem-follow", move || follow(follower, input))?;
    let (identity, feed) = start_decode(&params, &shared, pipe_out)?;

    // Acks, ping echoes and heartbeats. Started before the VM is built: a
    // joiner's VM takes a while to build, and the primary's output since
    // the full sync point (and its lease) wait on this side's acks and
    // echoes.
    let heartbeat = params.heartbeat;
    let acks = shared.clone();
    let replayed_commit = params.replayed_commit;
    spawn("tandem-ack", move || ack(&acks, heartbeat, replayed_commit))?;
    let (vm, successor, frames) = follower_vm(&params, vm_config, &shared, identity, feed)?;

    let timeout = params.failover_timeout;
    let watch = TakeoverWatch::new(timeout.as_millis() as u64, heartbeat.as_millis() as u64);
    let disk_checked = Instant::now();
    let live = TakeOver {
        successor,
        frames,
        pipe_closer,
    };
    let watched = shared.clone();
    spawn("tandem-monitor", move || {
        monitor(params, &watched, watch, disk_checked, live)
    })?;
    let handle = vm.handle();
    let report = vm.run();
    if let Some(reason) = crate::fence::fenced() {
        return Ok(Ended::Fenced(reason));
    }
    if matches!(&report, Ok(r) if r.stats.went_live_at.is_none()) {
        // The replay reached the recorded end: everything is replayed
        // (`replayed` commit releases the last output on this).
        handle.mark_replayed_to_end();
        std::thread::sleep(heartbeat * 3);
    }
    // Console bytes pass through a writer thread: let them out before the
    // process exits.
    if let Some(f) = shared.follower_slot.get() {
        f.flush();
    }
    Ok(Ended::Vm(Box::new(report)))
}

/// Starts a named thread (detached).
fn spawn(name: &str, body: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(body)
        .map(drop)
}

/// The link to the primary: sender, receiver, the generation it runs and
/// the protocol version it chose.
type Link = (FrameSender, FrameReceiver, u64, u16);

/// Connects to the primary and greets it: the link, the generation it runs
/// and the protocol it chose.
fn connect(params: &PairParams) -> anyhow::Result<Link> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    let mut said = started;
    let mut backoff = Duration::from_millis(200);
    loop {
        let stream = match channel::dial(params.listen.ip(), params.peer, Duration::from_secs(2)) {
            Ok(s) => s,
            Err(e) if Instant::now() < deadline => {
                // Quiet at first (the primary may still be starting), then
                // said every 5 s.
                if said.elapsed() >= Duration::from_secs(5) {
                    warn!("primary {} not reachable yet: {e}", params.peer);
                    said = Instant::now();
                } else {
                    info!("primary {} not reachable yet: {e}", params.peer);
                }
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Err(e) => bail!("cannot reach the primary at {}: {e}", params.peer),
        };
        match greet_primary(params, stream) {
            Ok(link) => return Ok(link),
            // A loaded primary may answer late, or drop a connection it
            // was too slow for (or had no room for, under attack): try
            // again, backing off, as a joiner if it started.
            Err(e) if transient(&e) && Instant::now() < deadline => {
                warn!(
                    "handshake with the primary at {}: {e:#}; trying again in {} ms",
                    params.peer,
                    backoff.as_millis()
                );
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Authenticates, says hello and waits for the primary's welcome.
fn greet_primary(params: &PairParams, stream: TcpStream) -> anyhow::Result<Link> {
    let (mut tx, mut input) = channel::connect(stream, params.psk.as_ref())?;
    // A send never blocks a lock for long (the monitor needs the link to
    // shut it when the primary falls silent).
    tx.set_write_timeout(Some(params.failover_timeout))?;
    tx.send(
        0,
        &Message::Hello {
            min: PROTOCOL_MIN,
            max: PROTOCOL_MAX,
            vm: params.vm_name.clone(),
            host: params.me.clone(),
        },
    )?;
    input.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (generation, welcome) = input.recv()?;
    let version = match welcome {
        Message::Welcome { version } => {
            info!("following generation {generation}, protocol {version}");
            version
        }
        Message::Refuse { reason } => bail!("the primary refused this secondary: {reason}"),
        other => bail!("expected a welcome, got {}", other.kind()),
    };
    input.set_read_timeout(None)?;
    Ok((tx, input, generation, version))
}

/// An error worth another try: the connection timed out, was reset or
/// closed (not a refusal or a key that does not match).
fn transient(e: &anyhow::Error) -> bool {
    use std::io::ErrorKind::*;
    e.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                WouldBlock
                    | TimedOut
                    | ConnectionReset
                    | ConnectionAborted
                    | BrokenPipe
                    | UnexpectedEof
            )
        })
    })
}

/// The follow thread's own state.
struct Follow {
    shared: Arc<Shared>,
    /// The writing end of the log pipe.
    pipe_in: Mutex<UnixStream>,
    /// What each message means (socket-free, see [`super::follower`]).
    follower: Follower,
    /// Mirrored storage: the disk sync until it is done.
    disk_sync: Option<MirrorReceiver>,
    /// Pre-copy progress shown on this (joining) side.
    progress: PrecopyProgress,
    /// What a reconnection needs.
    peer: SocketAddr,
    /// This host's own address (connections come from it).
    local: IpAddr,
    vm_name: String,
    psk: Option<Arc<Psk>>,
    write_limit: Duration,
}

impl Follow {
    fn new(
        params: &PairParams,
        shared: Arc<Shared>,
        pipe_in: UnixStream,
        disk_sync: Option<MirrorReceiver>,
    ) -> Self {
        Self {
            follower: Follower::new(shared.generation, disk_sync.is_some()),
            shared,
            pipe_in: Mutex::new(pipe_in),
            disk_sync,
            progress: PrecopyProgress::default(),
            peer: params.peer,
            local: params.listen.ip(),
            vm_name: params.vm_name.clone(),
            psk: params.psk.clone(),
            write_limit: params.failover_timeout,
        }
    }
}

/// Reader: log bytes into the pipe, releases to the follower. If the
/// connection breaks, reconnect and resume from the frames already here
/// (not a failover, as long as it comes back within the timeout).
fn follow(mut f: Follow, mut input: FrameReceiver) {
    let shared = f.shared.clone();
    let mut shown = Instant::now();
    loop {
        let started = Instant::now();
        // A large message (a joiner's full sync point) counts as
        // hearing from the primary while it arrives, and shows
        // progress on the joining side.
        let msg = input.recv_with_progress(&mut |done, total| {
            shared
                .last_heard
                .store(millis(shared.base), Ordering::Release);
            if total >= STATE_PROGRESS_MIN
                && (shown.elapsed() >= Duration::from_millis(500) || done == total)
            {
                shown = Instant::now();
                let secs = started.elapsed().as_secs_f64().max(1e-3);
                eprintln!(
                    "tandem: receiving state: {} / {} MiB ({:.0} MiB/s)",
                    done >> 20,
                    total >> 20,
                    done as f64 / secs / f64::from(1u32 << 20)
                );
            }
        });
        if shared.gone.load(Ordering::Acquire) {
            return;
        }
        let next = match msg {
            Ok((g, m)) => match f.on_frame(g, m) {
                Ok(next) => next,
                Err(e) => f.resume(&mut input, &e),
            },
            Err(e) => f.resume(&mut input, &e),
        };
        if next.is_break() {
            return;
        }
    }
}

impl Follow {
    /// One message from the primary; Break: the follow thread ends; Err:
    /// this connection ends (and is resumed on a new one).
    fn on_frame(&mut self, generation: u64, m: Message) -> std::io::Result<ControlFlow<()>> {
        match self.follower.on_message(generation, m) {
            Ok(action) => {
                self.shared
                    .last_heard
                    .store(millis(self.shared.base), Ordering::Release);
                Ok(action.map_or(ControlFlow::Continue(()), |a| self.act(a)))
            }
            Err(refused) if !refused.ends_connection() => {
                warn!("{refused}");
                Ok(ControlFlow::Continue(()))
            }
            // Before the log, a primary that makes no sense is not followed.
            Err(refused) if !self.follower.log_started() => Ok(self.give_up(refused.to_string())),
            Err(refused) => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                refused.to_string(),
            )),
        }
    }

    /// Carries out one of the follower's decisions.
    fn act(&mut self, action: Action) -> ControlFlow<()> {
        match action {
            Action::WriteLog(bytes) => return self.log(&bytes),
            Action::PrimaryReleased(stop) => {
                if let Some(f) = self.shared.follower_slot.get() {
                    f.primary_released(stop);
                }
            }
            Action::Echo(sent) => {
                self.shared.ping.fetch_max(sent + 1, Ordering::AcqRel);
            }
            Action::StepDown => self.shared.step_down.store(true, Ordering::Release),
            Action::Precopy {
                round,
                total,
                scanned,
                pages,
            } => self.memory(round, total, scanned, &pages),
            Action::DiskChunks(p) => return self.disk_chunks(&p),
            Action::DiskDone(p) => return self.disk_done(&p),
            Action::GiveUp(why) => return self.give_up(why),
        }
        ControlFlow::Continue(())
    }

    /// Log bytes into the pipe; Break when the decoder is gone.
    fn log(&mut self, bytes: &[u8]) -> ControlFlow<()> {
        let mut p = self.pipe_in.lock().unwrap_or_else(|e| e.into_inner());
        if p.write_all(bytes).is_err() {
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    /// Mirrored storage: chunks of a disk for this host's replica.
    fn disk_chunks(&mut self, p: &[u8]) -> ControlFlow<()> {
        if let Some(receiver) = self.disk_sync.as_mut() {
            if let Err(e) = receiver.apply_chunks(p) {
                return self.give_up(format!("disk sync: {e}"));
            }
            self.shared.send(&Message::Heartbeat);
        }
        ControlFlow::Continue(())
    }

    /// Mirrored storage: the disk sync's end.
    fn disk_done(&mut self, p: &[u8]) -> ControlFlow<()> {
        if let Some(mut receiver) = self.disk_sync.take() {
            match receiver.finish(p) {
                Ok(id) => self.shared.send(&Message::DiskSynced(id)),
                Err(e) => return self.give_up(format!("disk sync: {e}")),
            }
        }
        ControlFlow::Continue(())
    }

    /// A joiner's memory, pre-copied before the log starts.
    fn memory(&mut self, round: u32, total: u64, scanned: u64, pages: &[u8]) {
        self.progress.update(round, total, scanned, pages.len());
        let mut kept = self
            .shared
            .precopied
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for entry in pages.chunks_exact(wire::PAGE_ENTRY) {
            let (gfn, data) = entry.split_at(8);
            kept.push(Page {
                gfn: u64::from_le_bytes(gfn.try_into().unwrap_or_default()),
                data: data.to_vec(),
            });
        }
        drop(kept);
        // The acks thread starts with the replay:
        // until then, say we are here.
        self.shared.send(&Message::Heartbeat);
    }

    /// The connection broke (`e`): reconnects and resumes on the new one;
    /// Break when it will not.
    fn resume(&mut self, input: &mut FrameReceiver, e: &std::io::Error) -> ControlFlow<()> {
        // Close this connection for good (a forged message
        // must not be followed by more from the same one).
        if e.kind() == std::io::ErrorKind::InvalidData {
            warn!("replication connection reset: {e}");
        }
        input.shutdown();
        let frames = self.follower.resume_from();
        let resumed = reconnect(
            (self.local, self.peer),
            &self.vm_name,
            self.shared.generation,
            frames,
            &self.shared.gone,
            self.psk.as_ref(),
            self.write_limit,
        );
        let (tx, rx) = match resumed {
            Ok(link) => link,
            // Before the log started, nothing else would end the start:
            // say why and end the log pipe.
            Err(refusal) if !self.follower.log_started() => {
                let why = refusal.unwrap_or_else(|| e.to_string());
                return self.give_up(format!(
                    "the connection to the primary broke before its log started and was not resumed: {why}"
                ));
            }
            // Otherwise the monitor decides what a primary that cannot be
            // reached means.
            Err(_) => return ControlFlow::Break(()),
        };
        eprintln!("tandem: reconnected to the primary; resuming from frame {frames}");
        *input = rx;
        *self
            .shared
            .link_socket
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = tx.try_clone_socket().ok();
        *self
            .shared
            .link_out
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = tx;
        ControlFlow::Continue(())
    }

    /// The follow thread gives up before the log started: says why and ends
    /// the log pipe, so the waiting side sees it at once.
    fn give_up(&self, why: String) -> ControlFlow<()> {
        *self
            .shared
            .follow_failed
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(why);
        let _ = self
            .pipe_in
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .shutdown(Shutdown::Write);
        ControlFlow::Break(())
    }
}

/// Starts the decoder on the reading end of the log pipe and waits for the
/// log's header: the identity, and the records for the replay.
fn start_decode(
    params: &PairParams,
    shared: &Arc<Shared>,
    pipe_out: UnixStream,
) -> anyhow::Result<(VmIdentity, Receiver<Record>)> {
    let (identity_tx, identity_rx) = channel();
    let (feed_tx, feed_rx) = channel::<Record>();
    let decoded = shared.clone();
    let params = params.clone();
    spawn("tandem-decode", move || {
        decode(&params, pipe_out, &identity_tx, &feed_tx, &decoded.received)
    })?;
    let identity = match identity_rx.recv() {
        Ok(Ok(identity)) => identity,
        failed => {
            if let Some(why) = shared
                .follow_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                bail!(why);
            }
            failed.map_err(|_| {
                anyhow!("the primary closed the channel before sending its log header")
            })??
        }
    };
    Ok((identity, feed_rx))
}

/// Decoder: the log reader turns bytes into records for the replay.
fn decode(
    params: &PairParams,
    pipe_out: UnixStream,
    identity_tx: &Sender<Result<VmIdentity, LogError>>,
    feed: &Sender<Record>,
    received: &(Mutex<Option<u64>>, Condvar),
) {
    let (mut reader, identity) = match LogReader::open(pipe_out) {
        Ok(x) => x,
        Err(e) => {
            let _ = identity_tx.send(Err(e));
            return;
        }
    };
    let _ = identity_tx.send(Ok(identity));
    decode_loop(params, &mut reader, feed, received);
}

fn decode_loop(
    params: &PairParams,
    reader: &mut LogReader<UnixStream>,
    feed: &Sender<Record>,
    received: &(Mutex<Option<u64>>, Condvar),
) {
    loop {
        match decoded(reader.read_record()) {
            Decoded::Record { record, covers } => {
                if let Some(stop) = covers {
                    let mut w = received.0.lock().unwrap_or_else(|p| p.into_inner());
                    *w = (*w).max(Some(stop));
                    received.1.notify_one();
                }
                if feed.send(record).is_err() {
                    return;
                }
            }
            Decoded::End => return,
            Decoded::Fence(reason) => params.fence(reason),
        }
    }
}

/// How often the secondary reports how far its replay has executed.
const REPLAY_REPORT_PERIOD: Duration = Duration::from_millis(10);

/// Acks (as soon as the received watermark moves: the primary's held
/// output waits on them), ping echoes and heartbeats, on whatever
/// connection is current, until the primary is gone.
fn ack(shared: &Shared, heartbeat: Duration, replayed_commit: bool) {
    let (lock, moved) = &shared.received;
    let mut reporter = Reporter::default();
    let mut next_beat = Instant::now();
    let mut next_progress = Instant::now();
    while !shared.gone.load(Ordering::Acquire) {
        let received = {
            let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
            // Wake to report verified epochs (they do not move the received
            // watermark): every millisecond where output waits for them
            // (replayed commit, a repair), else with the replay's progress.
            // Waking every millisecond for nothing cost this thread an
            // eighth of a CPU in the Linux harness's emulated L1.
            let poll = if replayed_commit || reporter.repairing() {
                Duration::from_millis(1)
            } else {
                REPLAY_REPORT_PERIOD
            };
            let wait = next_beat
                .saturating_duration_since(Instant::now())
                .min(poll);
            let acked = reporter.acked();
            let (guard, _) = moved
                .wait_timeout_while(guard, wait, |w| *w == acked)
                .unwrap_or_else(|p| p.into_inner());
            *guard
        };
        let (verified, diverged) = match shared.progress.get() {
            Some(vm) => (
                vm.verified_stop(),
                vm.last_divergence().map_or(0, |epoch| epoch + 1),
            ),
            None => (0, 0),
        };
        // The replay's progress, at most every REPLAY_REPORT_PERIOD (the
        // primary's replay-lag brake), to a primary that reads it.
        let replayed = match shared.progress.get() {
            Some(vm)
                if shared.protocol >= wire::PROTOCOL_REPLAY_PROGRESS
                    && Instant::now() >= next_progress =>
            {
                next_progress = Instant::now() + REPLAY_REPORT_PERIOD;
                Some(vm.current_stop())
            }
            _ => None,
        };
        let now = Progress {
            received,
            verified,
            diverged,
            ping: shared.ping.load(Ordering::Acquire),
            replayed,
        };
        let beat = Instant::now() >= next_beat;
        if beat {
            next_beat = Instant::now() + heartbeat;
        }
        for m in reporter.report(now, beat) {
            if let ToPrimary::RepairRequest(epoch) = m {
                warn!("epoch {epoch} diverged: asking the primary for a sync point");
            }
            shared.send(&m.into());
        }
    }
}

/// Builds the replaying VM on the log's header and what was pre-copied,
/// publishes this side, and prepares the replicator it runs once live.
fn follower_vm(
    params: &PairParams,
    vm_config: impl FnOnce(RunMode) -> VmConfig,
    shared: &Shared,
    identity: VmIdentity,
    feed: Receiver<Record>,
) -> anyhow::Result<(Vm, Arc<Replicator>, Receiver<ShipFrame>)> {
    // Later rounds resend pages: the last copy of each wins.
    let base_pages =
        std::mem::take(&mut *shared.precopied.lock().unwrap_or_else(|p| p.into_inner()));
    let mut config = vm_config(RunMode::Follow {
        identity,
        feed,
        base_pages,
    });
    // Once live, this side records for a secondary of its own.
    let (sink, frames_rx, vm_slot) = ShipSink::new(params);
    config.go_live_record = Some((pair_record_options(params), Box::new(sink)));
    if let Some((socket, path)) = params.console.clone() {
        let access = params.access;
        config.on_live = Some(Box::new(move || {
            if let Err(e) = socket.serve(&path, access) {
                warn!("cannot serve the console on {}: {e}", path.display());
            }
        }));
    }
    let vm = Vm::new(config)?;
    let _ = shared.progress.set(vm.handle());
    if let Some((socket, _)) = &params.console {
        socket.set_input(vm.cause_queue());
    }
    if let Some(f) = vm.follower() {
        let _ = shared.follower_slot.set(f);
    }
    let _ = vm_slot.set(vm.handle());
    publish(params, &vm, Role::Secondary, shared.generation)?;
    let handle = vm.handle();
    params
        .board
        .probe("verified_stop", Arc::new(move || handle.verified_stop()));
    params.board.probe(
        "last_heartbeat_ms",
        status::age_probe(shared.base, shared.last_heard.clone()),
    );
    // The replicator this side will run as the new primary.
    params.throttle.open();
    let successor = Replicator::new(params.clone(), &vm, shared.generation)?;
    successor.offer_switchover();
    Ok((vm, successor, frames_rx))
}

/// What the monitor needs to go live.
struct TakeOver {
    /// The replicator this side runs as the new primary.
    successor: Arc<Replicator>,
    /// The frames this side records once live, for its own secondary.
    frames: Receiver<ShipFrame>,
    /// A handle on the log pipe's writing end: shut, the replay goes live.
    pipe_closer: UnixStream,
}

/// Monitor: a silent primary is gone (or it stepped down); win the next
/// generation, stop taking its log, replay what arrived, go live.
fn monitor(
    params: PairParams,
    shared: &Shared,
    mut watch: TakeoverWatch,
    mut disk_checked: Instant,
    live: TakeOver,
) {
    let heartbeat = params.heartbeat;
    loop {
        std::thread::sleep(heartbeat);
        // A secondary that cannot keep its state (events, and with
        // mirrored storage its bitmaps) stops following: protection is
        // dropped and said so, the primary's guest carries on.
        if disk_checked.elapsed() >= Duration::from_secs(1) {
            disk_checked = Instant::now();
            if let Some(why) = state_dir_full(&params.state_dir) {
                params.fence(FenceReason::StateDirFull(why));
            }
        }
        // Bytes the follow thread has not read yet (it may be behind,
        // or this side was frozen) are the primary speaking.
        let unread = shared
            .link_socket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|s| unread_bytes(s) > 0);
        let reason = watch.tick(
            millis(shared.base),
            shared.last_heard.load(Ordering::Acquire),
            unread,
            shared.step_down.load(Ordering::Acquire),
        );
        if let Some(reason) = reason {
            return take_over(&params, shared, reason, live);
        }
    }
}

/// The primary is gone or stepped down (`reason`): stops following it,
/// wins the next generation and goes live, or fences.
fn take_over(params: &PairParams, shared: &Shared, reason: GoLive, live: TakeOver) {
    shared.gone.store(true, Ordering::Release);
    if let Some(s) = shared
        .link_socket
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        let _ = s.shutdown(Shutdown::Both);
    }
    match params.claim(shared.generation) {
        Ok(Some(g)) => go_live(params, reason, g, live),
        Ok(None) => params.fence(FenceReason::LostArbitration(
            "another side won the arbitration",
        )),
        Err(e) => params.fence(FenceReason::ArbiterUnreachable(format!(
            "cannot reach the arbiter to take over: {e}"
        ))),
    }
}

/// Having won generation `g`: goes live, the one path of a failover and a
/// switch-over. A primary that stepped down stopped itself, so there is no
/// STONITH for a host being upgraded and no replacement to start.
fn go_live(params: &PairParams, reason: GoLive, g: u64, live: TakeOver) {
    let TakeOver {
        successor,
        frames,
        pipe_closer,
    } = live;
    match reason {
        GoLive::SteppedDown => {
            eprintln!(
                "tandem: the primary stepped down (switch-over); going live as generation {g}"
            );
            params.event(&format!("switchover generation={g}"));
        }
        GoLive::PrimarySilent(silent) => {
            if let Err(e) = params.run_fence_command() {
                params.fence(FenceReason::FenceCommandFailed(format!("{e:#}")));
            }
            eprintln!("tandem: primary silent for {silent} ms; going live as generation {g}");
            params.event(&format!(
                "failover generation={g} primary-silent-ms={silent}"
            ));
        }
    }
    successor.generation.store(g, Ordering::Release);
    successor.set_replica_generation(g);
    params.board.set(Role::Primary, g, "none (took over)");
    if reason != GoLive::SteppedDown {
        params.respawn();
    }
    if let Err(e) = successor.start(Some(frames)) {
        warn!("live, but cannot take a new secondary: {e:#}");
    }
    // The replay runs what arrived, then goes live.
    let _ = pipe_closer.shutdown(Shutdown::Write);
}

/// Less free space than this under `state_dir` counts as full.
const STATE_DIR_MIN_FREE: u64 = 1 << 20;

/// Why `dir` cannot take more state (full, or unreadable), if so.
fn state_dir_full(dir: &std::path::Path) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: zeroed statvfs is a valid out-parameter for statvfs(3).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid statvfs to fill.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        // A state_dir not created yet is not full.
        return None;
    }
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    (free < STATE_DIR_MIN_FREE).then(|| {
        format!(
            "state_dir {} is full ({} KiB free)",
            dir.display(),
            free >> 10
        )
    })
}

/// The joining side's view of pre-copy: a progress bar per round (on a
/// terminal) and a line when each round ends.
#[derive(Default)]
struct PrecopyProgress {
    round: Option<u32>,
    bar: Option<indicatif::ProgressBar>,
    started: Option<Instant>,
    bytes: u64,
}

impl PrecopyProgress {
    fn update(&mut self, round: u32, total: u64, scanned: u64, bytes: usize) {
        let page = tandem_replay::log::PAGE_SIZE as u64;
        if self.round != Some(round) {
            self.round = Some(round);
            self.started = Some(Instant::now());
            self.bytes = 0;
            let bar = indicatif::ProgressBar::new(total * page);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_prefix(format!("pre-copy round {round}"));
            self.bar = Some(bar);
        }
        self.bytes += bytes as u64;
        if let Some(bar) = &self.bar {
            bar.set_position(scanned * page);
        }
        if scanned >= total {
            if let Some(bar) = self.bar.take() {
                bar.finish_and_clear();
            }
            let ms = self.started.map_or(0, |s| s.elapsed().as_millis());
            eprintln!(
                "tandem: pre-copy round {round}: {} pages received ({} KiB) of {total} looked at, in {ms} ms",
                self.bytes / wire::PAGE_ENTRY as u64,
                self.bytes >> 10
            );
        }
    }
}

/// Messages at least this big show progress as they arrive.
const STATE_PROGRESS_MIN: u64 = 16 << 20;

/// Reconnects to the primary after the replication connection broke and
/// asks to resume after `frames` frames; Err when it will not (with the
/// primary's refusal, if it refused) or the side
/// decided the primary is gone).
fn reconnect(
    (local, peer): (IpAddr, SocketAddr),
    vm: &str,
    generation: u64,
    frames: u64,
    gone: &AtomicBool,
    psk: Option<&Arc<Psk>>,
    write_limit: Duration,
) -> Result<(FrameSender, FrameReceiver), Option<String>> {
    while !gone.load(Ordering::Acquire) {
        let connected = channel::dial(local, peer, Duration::from_millis(500))
            .map_err(anyhow::Error::from)
            .and_then(|s| channel::connect(s, psk));
        if let Err(e) = &connected {
            info!("reconnecting to {peer}: {e:#}");
        }
        if let Ok((mut tx, mut rx)) = connected {
            let _ = tx.set_write_timeout(Some(write_limit));
            let resume = Message::Resume {
                vm: vm.to_string(),
                frames,
            };
            if tx.send(generation, &resume).is_ok() {
                let _ = rx.set_read_timeout(Some(Duration::from_secs(2)));
                match rx.recv() {
                    Ok((g, Message::Welcome { .. })) if g == generation => {
                        let _ = rx.set_read_timeout(None);
                        return Ok((tx, rx));
                    }
                    Ok((_, Message::Refuse { reason })) => {
                        warn!("the primary will not resume: {reason}");
                        return Err(Some(reason));
                    }
                    Ok((g, other)) => warn!(
                        "resuming: the primary answered with {} (generation {g}): trying again",
                        other.kind()
                    ),
                    Err(e) => info!("resuming: no answer from the primary: {e}"),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(None)
}
