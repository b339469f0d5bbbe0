//! A protected pair: the primary runs and ships its log, the secondary
//! replays it and takes over when the primary is gone.
//!
//! Threads, on each side, besides the vCPU: one reading the peer, one
//! writing to it (log, releases, acks, heartbeats — a heartbeat never waits
//! behind bulk data for longer than a frame), and a monitor that declares
//! the peer gone after `failover_timeout` without any message (EOF is only a
//! hint). Before running the guest live a side must win the next generation
//! from the arbiter; a side that loses fences itself: it stops and exits
//! with [`EXIT_FENCED`] without releasing anything more.
//!
//! Here: the primary's `Replicator` core (the link, shipping, the acks
//! thread, the monitor). `pair/primary.rs` is `run_primary`; taking
//! secondaries is in `pair/accept.rs`, a joiner's copy (disks, pre-copy) in
//! `pair/join.rs`, the two leases in `pair/lease.rs`, the switch-over in
//! `pair/switchover.rs`, the control socket's figures in `pair/publish.rs`,
//! the secondary in `pair/secondary.rs`; the decisions without sockets are
//! `pair/follower.rs` and `pair/acks.rs`.

use super::silence::unread_bytes;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tandem_replay::log::LogWriter;
use tandem_replay::Outputs as _;
use tandem_vmm::journal::{RecordOptions, Throttle};
use tandem_vmm::vm::RunMode;
use tandem_vmm::{Vm, VmConfig, VmHandle};
use tracing::{info, warn};

use super::admission::{self, Admission};
use super::arbiter::{Arbiter, ClaimOutcome};
use super::auth::Psk;
use super::channel::{self, FrameReceiver, FrameSender};
use super::events;
use super::local_socket::Access;
use super::mirror;
use super::wire::{self, Message, PROTOCOL_MAX, PROTOCOL_MIN};
use tandem_vmm::backend::replica::Replica;

use super::fence::{self, fence, FenceReason};
use super::status::{ControlRequest, Role, StatusBoard};

// The secondary side, a child of this module: it runs this module's
// `Replicator` once live, and as a sibling its imports and `cmd.rs`'s
// `pair::run_secondary` would make an import cycle.
mod accept;
pub mod acks;
pub mod follower;
mod join;
mod lease;
mod primary;
mod publish;
mod secondary;
mod ship;
mod switchover;
pub use primary::run_primary;
use publish::publish;
pub use secondary::run_secondary;
use ship::{ShipFrame, ShipSink};

use accept::{admit, listen, Greeted};
use acks::{AckAction, AckLedger, SecondaryWatch};

/// How one side of a pair ended, handed up to the command, which chooses
/// the exit status.
#[derive(Debug)]
pub enum Ended {
    /// The VM ran to its end (or failed): the README's exit statuses.
    Vm(Box<Result<tandem_vmm::RunReport, tandem_vmm::VmError>>),
    /// This side handed the VM to its secondary (a switch-over) and stopped.
    SteppedDown,
    /// This side fenced itself: it answers `role=fenced` until terminated.
    Fenced(FenceReason),
}

impl Ended {
    /// The process exit status; a fenced side first waits for SIGTERM
    /// (its control socket keeps saying why it fenced).
    pub fn exit_code(self) -> ExitCode {
        match self {
            Ended::Vm(report) => crate::exit::finish_report(*report),
            Ended::SteppedDown => ExitCode::SUCCESS,
            Ended::Fenced(_) => {
                fence::until_terminated();
                ExitCode::from(crate::exit::EXIT_FENCED)
            }
        }
    }
}

/// What both sides of a pair need to know.
#[derive(Clone)]
pub struct PairParams {
    /// The VM's name at the arbiter.
    pub vm_name: String,
    /// This host's id ("a" or "b").
    pub me: String,
    /// This host's replication address (the primary listens here).
    pub listen: SocketAddr,
    /// The peer's replication address (the secondary connects there).
    pub peer: SocketAddr,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// No message for this long: the peer is gone.
    pub failover_timeout: Duration,
    /// Who decides who is live (None: `--i-accept-split-brain`).
    pub arbiter: Option<Arc<dyn Arbiter>>,
    /// Run without waiting for a secondary.
    pub alone: bool,
    /// Where this host keeps its event journal.
    pub state_dir: std::path::PathBuf,
    /// STONITH: run before going live (must succeed).
    pub fence_command: Option<String>,
    /// Run to start a fresh secondary after losing one.
    pub respawn: Option<String>,
    /// The peer's host id ("a" or "b").
    pub peer_name: String,
    /// Release output only once the secondary has replayed and verified
    /// it (`output_commit = "replayed"`), not merely received it.
    pub replayed_commit: bool,
    /// The primary's brake (`max_unacked_bytes`, `max_lag_ms`).
    pub throttle: Arc<Throttle>,
    /// The console socket and its path, served by the live side.
    pub console: Option<(super::console::ConsoleSocket, std::path::PathBuf)>,
    /// This side's status, served on `control`.
    pub board: Arc<StatusBoard>,
    /// This side's control socket.
    pub control: std::path::PathBuf,
    /// Who may use the control and console sockets.
    pub access: Access,
    /// Take a secondary only from the peer host's address.
    pub verify_peer_address: bool,
    /// The pair's key (None: `--insecure`, an unauthenticated channel).
    pub psk: Option<Arc<Psk>>,
    /// Mirrored storage: each host has its own replica of every disk.
    pub mirrored: bool,
    /// The position counter a primary places kick stops with.
    pub position: tandem_vmm::position::PositionChoice,
    /// `[ft] irq_defer_us`: the primary's interrupt deferral.
    pub irq_defer: Duration,
    /// This host's disks (its replicas, with mirrored storage).
    pub disks: Vec<tandem_vmm::DiskConfig>,
    /// Where this host keeps its replicas' sidecars.
    pub replica_dir: std::path::PathBuf,
}

impl PairParams {
    /// The only address a secondary may connect from (None: any, NAT).
    fn expected_peer_ip(&self) -> Option<std::net::IpAddr> {
        self.verify_peer_address.then(|| self.peer.ip())
    }

    /// Wins the generation after `expected`; Ok(None) when another side has it.
    /// A claim that fails (the arbiter restarting, an etcd leader change, a
    /// lost reply) has an unknown outcome: look, and try again, for up to a
    /// failover timeout before giving up.
    fn claim(&self, expected: u64) -> anyhow::Result<Option<u64>> {
        let Some(arbiter) = &self.arbiter else {
            // Split brain accepted: every side believes it won.
            return Ok(Some(expected + 1));
        };
        // At least long enough for an etcd leader election (a member lost
        // while the peer died): giving up fences this side, which loses the
        // VM; waiting only holds it.
        let deadline = Instant::now() + self.failover_timeout.max(ARBITER_PATIENCE);
        loop {
            match arbiter.claim(&self.vm_name, expected, &self.me) {
                Ok(ClaimOutcome::Granted(g)) => return Ok(Some(g)),
                Ok(ClaimOutcome::Refused(current)) => {
                    warn!("claim of generation {} refused: {current}", expected + 1);
                    return Ok(None);
                }
                Err(e) if Instant::now() < deadline => {
                    warn!(
                        "claim of generation {} failed ({e}); looking, then trying again",
                        expected + 1
                    );
                    std::thread::sleep(Duration::from_millis(200));
                    match arbiter.query(&self.vm_name) {
                        Ok(g)
                            if g.generation == expected + 1
                                && g.holder.as_deref() == Some(self.me.as_str()) =>
                        {
                            return Ok(Some(g.generation));
                        }
                        Ok(g) if g.generation != expected => {
                            warn!("claim of generation {} refused: {g}", expected + 1);
                            return Ok(None);
                        }
                        _ => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn current(&self) -> anyhow::Result<super::arbiter::Grant> {
        match &self.arbiter {
            Some(a) => Ok(a.query(&self.vm_name)?),
            None => Ok(super::arbiter::Grant::unclaimed()),
        }
    }

    /// Appends one line to `state_dir/events.log` (generations won,
    /// failovers, fencing); a journal that cannot be written is reported,
    /// never fatal.
    pub fn event(&self, what: &str) {
        let line = format!(
            "{} host={} vm={} {what}\n",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            self.me,
            self.vm_name
        );
        if let Err(e) = events::append(&self.state_dir, &line) {
            warn!("event journal {}: {e}", self.state_dir.display());
        }
    }

    /// Fences this side for `reason`, recorded in `events.log` first.
    fn fence(&self, reason: FenceReason) -> ! {
        self.event(&format!("fenced {}", reason.event()));
        fence(reason)
    }

    /// Starts the configured `respawn` command in the background.
    fn respawn(&self) {
        let Some(cmd) = &self.respawn else {
            return;
        };
        let spawned = std::process::Command::new("sh")
            .args(["-c", cmd])
            .env("TANDEM_VM", &self.vm_name)
            .env("TANDEM_HOST", &self.me)
            .env("TANDEM_PEER", &self.peer_name)
            .spawn();
        match spawned {
            Ok(mut child) => {
                self.event("respawn started");
                std::thread::spawn(move || {
                    let _ = child.wait();
                });
            }
            Err(e) => warn!("respawn `{cmd}`: {e}"),
        }
    }

    /// Runs the configured fence command (STONITH) before going live.
    fn run_fence_command(&self) -> anyhow::Result<()> {
        let Some(cmd) = &self.fence_command else {
            return Ok(());
        };
        let status = std::process::Command::new("sh")
            .args(["-c", cmd])
            .env("TANDEM_VM", &self.vm_name)
            .env("TANDEM_HOST", &self.me)
            .status()
            .with_context(|| format!("fence_command `{cmd}`"))?;
        if !status.success() {
            bail!("fence_command `{cmd}` failed ({status})");
        }
        Ok(())
    }
}

/// Milliseconds since `base`, for last-heard bookkeeping.
fn millis(base: Instant) -> u64 {
    u64::try_from(base.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Recording options for a pair: watermarks flow every half heartbeat.
fn pair_record_options(params: &PairParams) -> RecordOptions {
    RecordOptions {
        path: std::path::PathBuf::from("<replication channel>"),
        max_size: None,
        // With positions, a kick is no sync point and an interval one would
        // make its epoch transferred: repair asks for the sync point it
        // needs.
        sync_interval: match params.position {
            tandem_vmm::position::PositionChoice::None => Duration::from_secs(1),
            _ => Duration::from_secs(3600),
        },
        min_kick_interval: Duration::from_micros(500),
        irq_defer: params.irq_defer,
        epoch_interval: Duration::from_millis(10),
        // Held output waits for the secondary's ack of the watermark that
        // covers it: flush often so that wait is one round trip, not a
        // heartbeat.
        sync_period: Duration::from_millis(1).min(params.heartbeat),
        throttle: Some(params.throttle.clone()),
        mirrored: params.mirrored,
        position: params.position,
    }
}

/// Where the primary's log goes right now.
enum Link {
    /// No secondary: frames are dropped, output flows unprotected.
    Detached,
    /// A secondary connected; it starts at the next full sync point.
    Joining(FrameSender),
    /// A secondary follows.
    Attached(FrameSender),
}

/// The primary's replication state, shared by its threads.
struct Replicator {
    params: PairParams,
    link: Mutex<Link>,
    generation: AtomicU64,
    base: Instant,
    last_heard: AtomicU64,
    header: Vec<u8>,
    gate: Arc<tandem_vmm::backend::gate::GatedOutputs>,
    /// The running VM: kicks, full sync points, stopping it.
    vm: VmHandle,
    causes: tandem_replay::CauseQueue,
    /// Frames sent on the current link and not yet acknowledged: a
    /// secondary that reconnects resumes from them.
    sent: Mutex<std::collections::VecDeque<SentFrame>>,
    /// Index of the next frame on the current link.
    next_index: AtomicU64,
    /// The link is `Attached` (readable without the link lock, which a
    /// blocked send may hold).
    attached: AtomicBool,
    /// The current link's socket (None: detached), to shut it without the
    /// link lock.
    socket: Mutex<Option<TcpStream>>,
    /// Until when (ms since `base`) output may leave without re-validating
    /// the generation: the send time of the newest ping the secondary
    /// echoed, plus half the failover timeout.
    lease_until: AtomicU64,
    /// Pre-copy rounds for a joining secondary, and the memory they copy.
    precopy: Arc<tandem_vmm::precopy::PrecopyPort>,
    memory: tandem_vmm::precopy::MemoryReader,
    /// Mirrored storage: this host's replicas (empty otherwise).
    replicas: Vec<Arc<Replica>>,
    /// What a joining secondary's disk copy sends (taken by pre-copy).
    disk_plan: Mutex<Option<mirror::Plan>>,
    /// A disk sync sent and not yet confirmed: (sync id, the secondary's
    /// replica uuids).
    disk_sync: Mutex<Option<(u64, Vec<[u8; 16]>)>>,
    /// A switch-over is under way: the monitor leaves the link alone.
    stepping_down: AtomicBool,
    /// This side handed the VM to its secondary and stopped.
    stepped_down: AtomicBool,
    /// With an arbiter that grants leases (etcd): until when (ms since
    /// `base`) this side's lease surely holds; u64::MAX: no leases.
    arbiter_lease_until: AtomicU64,
    /// The arbiter lease ran out: nothing is released until it is held
    /// again.
    arbiter_lease_lost: AtomicBool,
}

/// Lets held disk writes go on when a re-sync ends, however it ends.
struct ResumeWrites<'a>(&'a [Arc<Replica>]);

impl Drop for ResumeWrites<'_> {
    fn drop(&mut self) {
        for r in self.0 {
            r.resume_writes();
        }
    }
}

impl Replicator {
    /// The replication state of a side that runs `vm` live as `generation`
    /// (a primary, or a secondary once it takes over); no secondary yet.
    fn new(params: PairParams, vm: &Vm, generation: u64) -> anyhow::Result<Arc<Self>> {
        let (precopy, memory) = vm.precopy();
        Ok(Arc::new(Self {
            header: LogWriter::new(Vec::new(), vm.identity())?.into_inner(),
            params,
            link: Mutex::new(Link::Detached),
            generation: AtomicU64::new(generation),
            base: Instant::now(),
            last_heard: AtomicU64::new(0),
            gate: vm
                .gate()
                .ok_or_else(|| anyhow!("the VM has no output gate"))?,
            vm: vm.handle(),
            causes: vm.cause_queue(),
            sent: Mutex::default(),
            next_index: AtomicU64::new(0),
            attached: AtomicBool::new(false),
            socket: Mutex::default(),
            lease_until: AtomicU64::new(0),
            precopy,
            memory,
            replicas: vm.replicas(),
            disk_plan: Mutex::default(),
            disk_sync: Mutex::default(),
            stepping_down: AtomicBool::new(false),
            stepped_down: AtomicBool::new(false),
            arbiter_lease_until: AtomicU64::new(u64::MAX),
            arbiter_lease_lost: AtomicBool::new(false),
        }))
    }

    /// Mirrored storage: records that `generation` writes the replicas now.
    fn set_replica_generation(&self, generation: u64) {
        for r in &self.replicas {
            if let Err(e) = r.set_generation(generation) {
                warn!(
                    "replica {}: cannot record generation {generation}: {e}",
                    r.path().display()
                );
            }
        }
    }

    fn link(&self) -> std::sync::MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn heard(&self) {
        self.last_heard.store(millis(self.base), Ordering::Release);
    }

    /// Remembers the socket of a new link (see `socket`).
    fn set_socket(&self, tx: &FrameSender) {
        *self.socket.lock().unwrap_or_else(|p| p.into_inner()) = tx.try_clone_socket().ok();
    }

    /// The ship thread: frames to the secondary, with releases and
    /// heartbeats; a joining secondary gets the header and then everything
    /// from the full sync point on.
    fn ship(self: &Arc<Self>, frames: Receiver<ShipFrame>) {
        let heartbeat = self.params.heartbeat;
        let mut next_beat = Instant::now();
        // A frame taken from the queue that starts the next message.
        let mut carried: Option<ShipFrame> = None;
        loop {
            let frame = match carried
                .take()
                .map(Ok)
                .unwrap_or_else(|| frames.recv_timeout(heartbeat))
            {
                Ok(f) => Some(f),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let generation = self.generation.load(Ordering::Acquire);
            let mut link = self.link();
            let mut broken = false;
            // To an attached secondary, the frames queued behind this one
            // go in the same message: each message costs both sides a seal
            // and system calls, which is what limited a Linux pair in the
            // emulated harness. A full sync point's head frame starts a
            // message of its own (a joiner starts there).
            let frame = match (frame, &*link) {
                (Some(first), Link::Attached(_)) => Some(ship::batch(first, &frames, &mut carried)),
                (frame, _) => frame,
            };
            if let Some(frame) = frame {
                match &mut *link {
                    Link::Detached => {}
                    Link::Joining(tx) => {
                        if frame.full {
                            self.remember(frame.stop, &frame.bytes);
                            broken = tx
                                .send(generation, &Message::Log(self.header.clone()))
                                .and_then(|()| tx.send(generation, &Message::Log(frame.bytes)))
                                .is_err();
                            if !broken {
                                eprintln!(
                                    "tandem: secondary joined at stop {}; protected again",
                                    frame.stop
                                );
                                self.params.throttle.protect();
                                self.params.board.set(Role::Primary, generation, "attached");
                                self.params
                                    .event(&format!("secondary-joined stop={}", frame.stop));
                                let stream = std::mem::replace(&mut *link, Link::Detached);
                                if let Link::Joining(s) = stream {
                                    self.renew_lease(millis(self.base));
                                    *link = Link::Attached(s);
                                    self.attached.store(true, Ordering::Release);
                                }
                            }
                        }
                    }
                    Link::Attached(tx) => {
                        self.remember(frame.stop, &frame.bytes);
                        broken = tx.send(generation, &Message::Log(frame.bytes)).is_err();
                    }
                }
            }
            if let Link::Attached(tx) = &mut *link {
                if Instant::now() >= next_beat {
                    let released = Message::Released(self.gate.released());
                    let ping = Message::Ping(millis(self.base));
                    broken |= tx.send(generation, &released).is_err()
                        || tx.send(generation, &ping).is_err();
                    next_beat = Instant::now() + heartbeat;
                }
            }
            if broken {
                // The monitor decides what a silent secondary means.
                info!("replication link write failed");
            }
        }
    }

    /// Keeps a frame sent on the current link until it is acknowledged.
    fn remember(&self, stop: u64, bytes: &[u8]) {
        let index = self.next_index.fetch_add(1, Ordering::AcqRel);
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((index, stop, Instant::now(), bytes.to_vec()));
    }

    /// Log lag: frames shipped and not yet acknowledged, and how long the
    /// oldest of them has waited (ms).
    fn lag(&self) -> (u64, u64) {
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let age = sent
            .front()
            .map_or(0, |(_, _, at, _)| at.elapsed().as_millis() as u64);
        (sent.len() as u64, age)
    }

    /// The secondary has everything up to stop `stop`.
    fn forget_acked(&self, stop: u64) {
        let mut sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        while sent.front().is_some_and(|(_, s, _, _)| *s <= stop) {
            sent.pop_front();
        }
    }

    /// Reads one secondary's acks, verifications and repair requests: the
    /// I/O shell around [`AckLedger`].
    fn read_acks(self: &Arc<Self>, mut input: FrameReceiver) {
        let mut ledger = AckLedger::new(self.params.replayed_commit);
        // Short epochs for replayed commit only: a repair releases what it
        // held when its sync point is installed (the secondary reports that
        // stop verified), and shortened epochs during repairs made a Linux
        // pair end an epoch every 4.5 stops.
        self.vm
            .set_output_awaits_verification(self.params.replayed_commit);
        loop {
            let msg = input.recv();
            if msg.is_ok() && !self.lease_valid() && !self.gate.suspended() {
                // Read after a silence (perhaps this process was frozen):
                // hold everything until the monitor re-validates.
                self.check_lease();
            }
            // Why this connection ends (None: it closed, nothing to say).
            let refused = match msg {
                Ok((g, m)) => {
                    let current = self.generation.load(Ordering::Acquire);
                    match ledger.on_message(g, current, m) {
                        Ok(actions) => {
                            self.heard();
                            for action in actions {
                                self.on_ack_action(action);
                            }
                            continue;
                        }
                        Err(r) if !r.ends_connection() => {
                            warn!("{r}");
                            continue;
                        }
                        Err(r) => Some(r.to_string()),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::InvalidData => Some(e.to_string()),
                Err(_) => None,
            };
            // A broken, forged or meaningless message ends this connection:
            // the secondary sees it close, reconnects and resumes.
            if let Some(why) = refused {
                warn!("replication connection reset: {why}");
            }
            input.shutdown();
            return;
        }
    }

    /// Carries out one of the ledger's decisions.
    fn on_ack_action(&self, action: AckAction) {
        match action {
            AckAction::RenewLease(sent) => self.renew_lease(sent),
            AckAction::Acked(stop) => {
                self.params.throttle.acked(stop);
                self.forget_acked(stop);
            }
            AckAction::Release(stop) => self.gate.release(stop),
            AckAction::DiskSynced(id) => self.finish_disk_sync(id),
            AckAction::Replayed(stop) => self.params.throttle.replayed(stop),
            AckAction::Repair(epoch) => {
                warn!("the secondary reports epoch {epoch} diverged: committing on verified epochs until one verifies");
                self.vm.request_sync_point();
            }
        }
    }

    /// Listens for a secondary and starts the ship, accept and monitor
    /// threads (a secondary that went live becomes a primary that takes a
    /// new secondary).
    fn start(self: &Arc<Self>, frames: Option<Receiver<ShipFrame>>) -> anyhow::Result<()> {
        self.start_on(
            admit(
                listen(&self.params)?,
                self.params.psk.clone(),
                self.params.expected_peer_ip(),
            )?,
            frames,
        )
    }

    /// Starts the ship (when given frames), accept and monitor threads.
    fn start_on(
        self: &Arc<Self>,
        greeted: Receiver<Greeted>,
        frames: Option<Receiver<ShipFrame>>,
    ) -> anyhow::Result<()> {
        if let Some(frames) = frames {
            let r = self.clone();
            std::thread::Builder::new()
                .name("tandem-ship".into())
                .spawn(move || r.ship(frames))?;
        }
        let r = self.clone();
        std::thread::Builder::new()
            .name("tandem-secondaries".into())
            .spawn(move || r.accept(greeted))?;
        let r = self.clone();
        std::thread::Builder::new()
            .name("tandem-monitor".into())
            .spawn(move || r.monitor())?;
        if self.params.arbiter.is_some() {
            let r = self.clone();
            std::thread::Builder::new()
                .name("tandem-lease".into())
                .spawn(move || r.keep_arbiter_lease())?;
        }
        Ok(())
    }

    /// A silent secondary is gone: win the next generation before releasing
    /// anything unprotected (or fence), then wait for a new secondary.
    fn monitor(self: &Arc<Self>) {
        let timeout = self.params.failover_timeout.as_millis() as u64;
        let mut watch = SecondaryWatch::new(timeout, self.params.heartbeat.as_millis() as u64);
        loop {
            std::thread::sleep(self.params.heartbeat);
            if self.stepping_down.load(Ordering::Acquire) {
                continue;
            }
            // Never the link lock here: a send blocked behind a stalled
            // peer may hold it, and this thread is what ends that.
            let unread = match self
                .socket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
            {
                Some(s) => unread_bytes(s) > 0,
                None => continue,
            };
            self.check_lease();
            let echoed = self
                .lease_until
                .load(Ordering::Acquire)
                .saturating_sub(self.lease_span());
            let Some(lost) = watch.tick(
                millis(self.base),
                self.last_heard.load(Ordering::Acquire),
                echoed,
                unread,
                self.attached.load(Ordering::Acquire),
            ) else {
                continue;
            };
            let socket = self.socket.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(socket) = socket {
                let _ = socket.shutdown(Shutdown::Both);
            }
            // The shutdown ends any send blocked with the link lock held.
            let old = std::mem::replace(&mut *self.link(), Link::Detached);
            self.attached.store(false, Ordering::Release);
            if let Link::Joining(s) | Link::Attached(s) = old {
                s.shutdown();
            }
            self.go_unprotected(&lost.to_string());
        }
    }

    /// The secondary is gone (or will not ack): win the next generation and
    /// release everything held, or fence if the other side won.
    fn go_unprotected(&self, why: &str) {
        // A fenced side releases nothing more, whoever asks.
        if fence::fenced().is_some() {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        match self.params.claim(generation) {
            Ok(Some(g)) => {
                eprintln!("tandem: {why}; running unprotected as generation {g}");
                self.set_replica_generation(g);
                self.params
                    .event(&format!("secondary-lost generation={g} unprotected"));
                self.generation.store(g, Ordering::Release);
                self.params
                    .board
                    .set(Role::Primary, g, "none (unprotected)");
                self.gate.open();
                self.params.throttle.open();
                self.params.respawn();
            }
            Ok(None) => self.params.fence(FenceReason::LostArbitration(
                "the secondary took over (lost the arbitration)",
            )),
            Err(e) => self.params.fence(FenceReason::ArbiterUnreachable(format!(
                "cannot reach the arbiter after losing the secondary: {e}"
            ))),
        }
    }
}

/// A shipped frame kept until acked: (index on the link, stop, when sent,
/// bytes).
type SentFrame = (u64, u64, Instant, Vec<u8>);

/// How long a claim keeps trying an arbiter that does not answer (at least;
/// the failover timeout if longer).
const ARBITER_PATIENCE: Duration = Duration::from_secs(5);
