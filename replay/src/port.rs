//! The `Inputs` and `Outputs` ports: everything that crosses the VM boundary.
//!
//! Devices never read a clock, a socket or a file descriptor. What comes from
//! outside reaches them as a [`Cause`], applied by the vCPU thread at a stop,
//! and what leaves the VM goes to an [`Outputs`] sink as an [`Output`]. The
//! live implementation ([`LiveInputs`]) takes causes from the world: guest
//! time from the host's monotonic clock, everything else from a
//! [`CauseQueue`] that worker threads (stdin, tap readers, block I/O) fill.
//! The record/replay issue adds `Record` (live, then append to the log) and
//! `Replay` (from the log) behind the same [`Inputs`] trait; the live pair
//! holds outputs back behind [`Outputs`] until the secondary has the log.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Something from outside the VM that changes what the guest sees, applied
/// at a stop through the same device code live and in replay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    /// Guest time advanced to this many nanoseconds since VM creation.
    Time(u64),
    /// Bytes for COM1's receiver.
    SerialInput(Vec<u8>),
    /// A frame received for virtio-net device `device`.
    NetRx {
        /// Index of the virtio-net device.
        device: u8,
        /// The Ethernet frame.
        frame: Vec<u8>,
    },
    /// Block request `request` of virtio-blk device `device` finished.
    BlockDone {
        /// Index of the virtio-blk device.
        device: u8,
        /// The id the device gave the request at submission.
        request: u64,
        /// virtio-blk status (0 OK, 1 IOERR, 2 UNSUPP).
        status: u8,
        /// For reads: the data read (in shared-storage mode it travels in the log).
        data: Vec<u8>,
    },
    /// Mirrored storage: read request `request` of virtio-blk device
    /// `device` finished. The data stays on the replicas; the log carries
    /// its hash, and the secondary reads its own replica at this stop and
    /// compares (replica drift shows at the first read that sees it).
    BlockReadHashed {
        /// Index of the virtio-blk device.
        device: u8,
        /// The id the device gave the request at submission.
        request: u64,
        /// virtio-blk status.
        status: u8,
        /// Bytes the primary read.
        len: u32,
        /// 64-bit xxh3 of the data the primary read.
        hash: u64,
    },
}

/// What a virtio-blk request asks of the backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockOp {
    /// Read `len` bytes at `sector`.
    Read {
        /// First 512-byte sector.
        sector: u64,
        /// Bytes to read.
        len: u32,
    },
    /// Write `data` at `sector` (captured at submission).
    Write {
        /// First 512-byte sector.
        sector: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Make every completed write durable.
    Flush,
}

/// Something leaving the VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Bytes written to COM1.
    Serial(Vec<u8>),
    /// A frame transmitted by virtio-net device `device`.
    NetTx {
        /// Index of the virtio-net device.
        device: u8,
        /// The Ethernet frame.
        frame: Vec<u8>,
    },
    /// A block request submitted to virtio-blk device `device`; its
    /// completion comes back as [`Cause::BlockDone`] with the same id.
    BlockSubmit {
        /// Index of the virtio-blk device.
        device: u8,
        /// Request id, unique per device.
        request: u64,
        /// What to do.
        op: BlockOp,
    },
}

/// Where device outputs go. Called on the vCPU thread; implementations hand
/// the work to other threads and never block on the network.
pub trait Outputs: Send + Sync {
    /// Emits one output.
    fn emit(&self, output: Output);

    /// Whether output is being held back (a protected primary waiting for
    /// its secondary): the recorder then ends the current epoch early, so
    /// output committed on a verified epoch does not wait a whole epoch.
    fn pending(&self) -> bool {
        false
    }

    /// A new secondary has the state as of `stop`: output produced after it
    /// waits for that secondary again (a re-protected primary).
    fn protect_from(&self, _stop: u64) {}

    /// Blocks until everything emitted so far has reached its sink (the
    /// console bytes a process prints just before it exits).
    fn flush(&self) {}

    /// Whether an output was held back since the last call (and clears it):
    /// the recorder then ships the log at once instead of on its next tick,
    /// since that output waits for the secondary's ack of it.
    fn take_newly_held(&self) -> bool {
        false
    }

    /// `on_guest_crash = "restart-checkpoint"`: the machine state at stop
    /// `stop` is a rollback target now, so output produced up to it may
    /// leave (nothing produced after the newest checkpoint ever does).
    fn checkpoint_taken(&self, _stop: u64) {}

    /// The guest was rolled back to its checkpoint at stop `stop`: output
    /// produced after it never happened and is dropped. False (and nothing
    /// dropped) when some of it has already left.
    fn discard_after(&self, _stop: u64) -> bool {
        true
    }
}

/// Where the causes of each stop come from.
pub trait Inputs: Send {
    /// Appends the causes to apply at stop `stop`, in order.
    fn collect(&mut self, stop: u64, out: &mut Vec<Cause>);
    /// Blocks until a cause may be available or `deadline_ns` (guest time)
    /// passes; used while the guest is halted.
    fn wait(&mut self, deadline_ns: Option<u64>);
}

/// Bytes of network frames and console input a queue holds at most (each
/// counted with [`QUEUED_OVERHEAD`]); beyond it new ones are dropped, as a
/// NIC or a UART drops what it has no room for. Disk completions are never
/// dropped (they are bounded by the requests in flight).
pub const QUEUED_INPUT_MAX: usize = 4 << 20;
/// What one queued input costs besides its bytes.
pub const QUEUED_OVERHEAD: usize = 64;

/// Causes waiting for the vCPU, and the droppable bytes among them.
#[derive(Default)]
struct Queued {
    causes: VecDeque<Cause>,
    input_bytes: usize,
}

impl Queued {
    /// What `cause` counts against [`QUEUED_INPUT_MAX`] (0: never dropped).
    fn weight(cause: &Cause) -> usize {
        match cause {
            Cause::NetRx { frame, .. } => frame.len() + QUEUED_OVERHEAD,
            Cause::SerialInput(bytes) => bytes.len() + QUEUED_OVERHEAD,
            _ => 0,
        }
    }
}

/// The queue that worker threads fill with causes for the vCPU thread.
/// Network frames and console input are bounded ([`QUEUED_INPUT_MAX`]): a
/// flood while the vCPU waits (a brake, a slow guest) cannot grow memory
/// without bound.
#[derive(Clone)]
pub struct CauseQueue {
    shared: Arc<(Mutex<Queued>, Condvar)>,
    /// Inputs dropped because the queue was full.
    dropped: Arc<std::sync::atomic::AtomicU64>,
    notify: Arc<dyn Fn() + Send + Sync>,
    /// When false (a replaying secondary), pushes are dropped: its tap is
    /// read and discarded.
    accepting: Arc<std::sync::atomic::AtomicBool>,
    /// A wake without a cause is pending.
    woken: Arc<std::sync::atomic::AtomicBool>,
}

impl CauseQueue {
    /// A queue that calls `notify` (the vCPU kick) after each push.
    pub fn new(notify: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self {
            shared: Arc::default(),
            dropped: Arc::default(),
            notify,
            accepting: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            woken: Arc::default(),
        }
    }

    /// Wakes a waiting vCPU without a cause (it has other work at its stop).
    pub fn wake(&self) {
        self.woken.store(true, std::sync::atomic::Ordering::Release);
        let _q = self.queue();
        self.shared.1.notify_all();
    }

    /// Starts (true) or stops (false) taking causes; stopped, pushes are
    /// dropped.
    pub fn set_accepting(&self, accepting: bool) {
        self.accepting
            .store(accepting, std::sync::atomic::Ordering::Release);
    }

    fn queue(&self) -> MutexGuard<'_, Queued> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a cause, wakes a halted vCPU and kicks a running one. A
    /// network frame or console input that does not fit is dropped.
    pub fn push(&self, cause: Cause) {
        if !self.accepting.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        {
            let mut q = self.queue();
            let weight = Queued::weight(&cause);
            if weight > 0 && q.input_bytes + weight > QUEUED_INPUT_MAX {
                drop(q);
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            q.input_bytes += weight;
            q.causes.push_back(cause);
        }
        self.shared.1.notify_all();
        (self.notify)();
    }

    /// Inputs dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Puts inputs back at the head of the queue, in order (a guest rolled
    /// back to a checkpoint sees again what it received after it). Bypasses
    /// the byte bound: these were accepted once.
    pub fn requeue(&self, causes: Vec<Cause>) {
        if causes.is_empty() {
            return;
        }
        {
            let mut q = self.queue();
            for cause in causes.into_iter().rev() {
                q.input_bytes += Queued::weight(&cause);
                q.causes.push_front(cause);
            }
        }
        self.shared.1.notify_all();
        (self.notify)();
    }

    /// Takes everything queued.
    pub fn drain_into(&self, out: &mut Vec<Cause>) {
        let mut q = self.queue();
        q.input_bytes = 0;
        out.extend(q.causes.drain(..));
    }

    /// Sleeps until something is queued or `deadline` passes (None: forever).
    pub fn wait(&self, deadline: Option<Instant>) {
        let mut q = self.queue();
        while q.causes.is_empty() {
            if self.woken.swap(false, std::sync::atomic::Ordering::AcqRel) {
                return;
            }
            let now = Instant::now();
            q = match deadline {
                None => self.shared.1.wait(q).unwrap_or_else(|p| p.into_inner()),
                Some(d) if d <= now => return,
                Some(d) => {
                    self.shared
                        .1
                        .wait_timeout(q, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

/// Live inputs: guest time from the host's monotonic clock (logged only when
/// it advances), everything else from the [`CauseQueue`].
pub struct LiveInputs {
    start: Instant,
    last_time_ns: u64,
    queue: CauseQueue,
    /// Guest time of the next device deadline: time is always advanced
    /// once it is reached.
    deadline_ns: Option<u64>,
}

/// Guest time advances in steps of at least this much between device
/// deadlines: an exit-heavy guest would otherwise log a time cause at every
/// one of its ~100k stops a second. Devices still see every deadline on
/// time (the step ends at a deadline), only reads between deadlines are
/// this coarse.
pub const TIME_QUANTUM_NS: u64 = 50_000;

impl LiveInputs {
    /// Live inputs whose guest time 0 is `start`.
    pub fn new(start: Instant, queue: CauseQueue) -> Self {
        Self {
            start,
            last_time_ns: 0,
            queue,
            deadline_ns: None,
        }
    }

    /// The next device deadline in guest time (None: none armed).
    pub fn set_deadline(&mut self, deadline_ns: Option<u64>) {
        self.deadline_ns = deadline_ns;
    }

    /// Puts inputs back at the head of the queue (see [`CauseQueue::requeue`]).
    pub fn requeue(&self, causes: Vec<Cause>) {
        self.queue.requeue(causes);
    }

    /// The host instant at which guest time reaches `ns`.
    pub fn instant_at(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns)
    }
}

impl Inputs for LiveInputs {
    fn collect(&mut self, _stop: u64, out: &mut Vec<Cause>) {
        let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let due = self.deadline_ns.is_some_and(|d| now >= d);
        if now > self.last_time_ns
            && (due || now - self.last_time_ns >= TIME_QUANTUM_NS || self.last_time_ns == 0)
        {
            self.last_time_ns = now;
            out.push(Cause::Time(now));
        }
        self.queue.drain_into(out);
    }

    fn wait(&mut self, deadline_ns: Option<u64>) {
        self.deadline_ns = deadline_ns;
        let deadline = deadline_ns.map(|ns| self.instant_at(ns));
        self.queue.wait(deadline);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn live_inputs_give_time_first_then_queued_causes_in_order() {
        let kicks = Arc::new(AtomicUsize::new(0));
        let k = kicks.clone();
        let queue = CauseQueue::new(Arc::new(move || {
            k.fetch_add(1, Ordering::SeqCst);
        }));
        let mut inputs = LiveInputs::new(Instant::now(), queue.clone());
        queue.push(Cause::SerialInput(b"a".to_vec()));
        queue.push(Cause::NetRx {
            device: 0,
            frame: vec![1, 2],
        });
        assert_eq!(kicks.load(Ordering::SeqCst), 2);
        std::thread::sleep(Duration::from_millis(2));
        let mut out = Vec::new();
        inputs.collect(1, &mut out);
        assert!(matches!(out[0], Cause::Time(t) if t >= 2_000_000));
        assert_eq!(out[1], Cause::SerialInput(b"a".to_vec()));
        assert_eq!(out.len(), 3);
        // Time is reported only when it advanced.
        out.clear();
        inputs.collect(2, &mut out);
        assert!(out.len() <= 1);
    }

    #[test]
    fn a_flood_of_inputs_is_bounded_but_disk_completions_always_queue() {
        let queue = CauseQueue::new(Arc::new(|| {}));
        let frame = vec![0u8; 1400];
        let fits = QUEUED_INPUT_MAX / (frame.len() + QUEUED_OVERHEAD);
        for _ in 0..fits + 100 {
            queue.push(Cause::NetRx {
                device: 0,
                frame: frame.clone(),
            });
        }
        assert_eq!(queue.dropped(), 100);
        queue.push(Cause::BlockDone {
            device: 0,
            request: 1,
            status: 0,
            data: Vec::new(),
        });
        let mut out = Vec::new();
        queue.drain_into(&mut out);
        assert_eq!(out.len(), fits + 1, "the completion was queued");
        // Drained: room again.
        queue.push(Cause::SerialInput(b"x".to_vec()));
        assert_eq!(queue.dropped(), 100);
    }

    #[test]
    fn time_advances_in_quanta_but_always_reaches_a_deadline() {
        let queue = CauseQueue::new(Arc::new(|| {}));
        let start = Instant::now() - Duration::from_millis(1);
        let mut inputs = LiveInputs::new(start, queue);
        let mut out = Vec::new();
        inputs.collect(1, &mut out);
        let Some(Cause::Time(t0)) = out.first().cloned() else {
            panic!("{out:?}")
        };
        out.clear();
        inputs.collect(2, &mut out);
        // Without a deadline, time moves only by whole quanta (a preempted
        // test thread may see one quantum pass, never less).
        let t0 = match out.as_slice() {
            [] => t0,
            [Cause::Time(t)] => {
                assert!(*t >= t0 + TIME_QUANTUM_NS, "{t} after {t0}");
                *t
            }
            other => panic!("{other:?}"),
        };
        out.clear();
        inputs.set_deadline(Some(t0 + 1));
        std::thread::sleep(Duration::from_micros(10));
        inputs.collect(3, &mut out);
        assert!(
            matches!(out.as_slice(), [Cause::Time(t)] if *t > t0),
            "{out:?}"
        );
    }

    #[test]
    fn wait_returns_at_the_deadline_or_on_a_push() {
        let queue = CauseQueue::new(Arc::new(|| {}));
        let mut inputs = LiveInputs::new(Instant::now(), queue.clone());
        let t0 = Instant::now();
        inputs.wait(Some(20_000_000));
        assert!(t0.elapsed() >= Duration::from_millis(15));
        let pusher = queue.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            pusher.push(Cause::SerialInput(vec![1]));
        });
        inputs.wait(None);
        t.join().unwrap();
    }
}
