//! Positioned stops (exact injection): with a position counter, a
//! recording logs where a kick interrupted the guest (instructions since
//! the previous stop, RIP and the position digest) instead of the machine
//! state, and a replay runs the guest to exactly that point and checks it
//! there. The guest then executes on the replaying side; nothing is copied.
//!
//! Landing (GUEST-NOTES "Counting guest instructions"): kicks from a POSIX
//! timer aimed at part of the remaining distance (the rate is an upper
//! bound, so they fall short, never past), then a hardware breakpoint on
//! the target RIP, stepping over each early visit with one single step (a
//! breakpoint ignores RF), until the count is reached. Any other exit on
//! the way is a divergence at that stop.

use kvm_bindings::{
    kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuExit;

use super::*;
use crate::journal::RecordedPosition;
use crate::position::{countable, digest, PositionCounter};

/// Below this many instructions from the target, landing stops kicking and
/// uses the breakpoint and single steps.
const FINE_DISTANCE: u64 = 200;
/// An upper bound of the emulation rate (instructions per second) for
/// aiming kicks; the estimate only ever rises above it.
const RATE_FLOOR: f64 = 3e6;
/// A kick is aimed at this share of the remaining distance (the rate can
/// run above the floor in bursts, and a kick can come late: one past the
/// target is a divergence).
const AIM: f64 = 0.5;
/// The least time entering the guest is assumed to take before it makes
/// progress; the estimate doubles after a kick that came too early.
const ENTRY_LATENCY_MIN_S: f64 = 10e-6;
/// The most it is assumed to take.
const ENTRY_LATENCY_MAX_S: f64 = 2e-3;
/// Runs shorter than this do not update the rate (too noisy).
const RATE_MIN_SPAN: Duration = Duration::from_micros(50);

/// The vCPU's position counter and what landing learned.
#[derive(Default)]
pub(super) struct Positions {
    counter: Option<Box<dyn PositionCounter>>,
    /// The count read at the current stop.
    at_stop: u64,
    /// The highest emulation rate measured (instructions per second).
    rate: f64,
    /// How long entering the guest takes before it makes progress (s).
    entry_latency: f64,
    /// The landing timer, created on the vCPU thread at the first landing.
    timer: Option<LandingTimer>,
    /// Whether the landing timer may have a kick pending.
    timer_armed: bool,
    /// Guest-debug control bits and breakpoint now set.
    debug: Option<(u32, u64)>,
    /// Whether the last `KVM_RUN` before this stop could enter the guest
    /// (no kick was pending when it was called).
    entered: bool,
    /// The last stop that injected an interrupt.
    injected_at: Option<u64>,
    /// Landings tried (the `TANDEM_TEST_LAND_LATE` index).
    attempts: u64,
    /// A landing missed and the guest's state is wrong: stops pass without
    /// running the guest until a sync point repairs it.
    lost: bool,
    /// A test fault point (`TANDEM_TEST_FAULT_DIR`): the process kills
    /// itself in the middle of a landing once `kill-in-landing.PID` exists
    /// there.
    kill_point: Option<std::path::PathBuf>,
    /// A test hook (`TANDEM_TEST_LAND_LATE=N`): the N-th landing (from 1)
    /// aims one instruction past its recorded count, which the checks there
    /// must catch.
    late_at: Option<u64>,
    /// A test hook (`TANDEM_TEST_SYNC_PAGE_FLIP=N`): before the N-th
    /// comparison of a landed sync point (from 1), one byte of the replay's
    /// copy of its first page is flipped, which the comparison must catch.
    pub(super) flip_at: Option<u64>,
    /// Landed sync points compared (the `TANDEM_TEST_SYNC_PAGE_FLIP` index).
    pub(super) sync_compares: u64,
    /// A test hook (`TANDEM_TEST_EPOCH_FLIP=N`): before the N-th epoch end
    /// is verified (from 1), the replay writes a byte of guest memory's
    /// last page, which that epoch end must find (a page the recording did
    /// not dirty) and a later sync point must repair.
    pub(super) epoch_flip_at: Option<u64>,
    /// A test hook (`TANDEM_TEST_REPAIR_IN_HALT=1`): a recorder answers a
    /// repair request only while its guest sleeps in HLT, never at a kick
    /// stop, so that a test can rely on that path.
    repair_in_halt_only: bool,
}

impl Positions {
    /// Instructions since the current stop.
    fn since_stop(&self) -> Result<u64, VcpuError> {
        match &self.counter {
            Some(counter) => Ok(counter
                .read()
                .map_err(position_err)?
                .wrapping_sub(self.at_stop)),
            None => Ok(0),
        }
    }
}

fn position_err(e: crate::position::PositionError) -> VcpuError {
    VcpuError::Memory(format!("position counter: {e}"))
}

/// Landing-time histogram buckets: four per power of two of microseconds.
const BUCKETS: usize = 96;

/// What a landing's `KVM_RUN` was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandingRun {
    /// A timer kick aimed short of the target.
    Coarse = 0,
    /// A run to the breakpoint on the target RIP (or a handler's entry).
    Breakpoint = 1,
    /// A single step over an early visit of the target RIP.
    Step = 2,
}

impl LandingRun {
    /// Every kind, in the order of [`LandingStats::by_run`].
    pub const ALL: [LandingRun; 3] = [Self::Coarse, Self::Breakpoint, Self::Step];

    /// What the replay's summary calls it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Coarse => "coarse kicks",
            Self::Breakpoint => "breakpoint runs",
            Self::Step => "single steps",
        }
    }
}

/// The runs of one [`LandingRun`] kind and the time they took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LandingRuns {
    /// `KVM_RUN`s.
    pub runs: u64,
    /// Their time in µs (the guest's own progress toward the target, and
    /// entering and leaving it).
    pub micros: u64,
}

/// Positioned stops and what landing on them cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LandingStats {
    /// Positioned stops recorded (recording) or landed (replaying).
    pub positioned: u64,
    /// Time in landings in µs (also those that missed): the runs of
    /// `by_run` and, between them, reading the counter and registers and
    /// setting the debug state and timer.
    pub micros: u64,
    /// Runs and their time by [`LandingRun`] kind.
    pub by_run: [LandingRuns; 3],
    /// Landing times: bucket `i` holds those under 2^((i+1)/4) µs.
    histogram: [u64; BUCKETS],
}

impl Default for LandingStats {
    fn default() -> Self {
        Self {
            positioned: 0,
            micros: 0,
            by_run: [LandingRuns::default(); 3],
            histogram: [0; BUCKETS],
        }
    }
}

impl LandingStats {
    /// `KVM_RUN`s the landings took.
    pub fn runs(&self) -> u64 {
        self.by_run.iter().map(|r| r.runs).sum()
    }

    /// Each kind of landing run, named, with its runs and time.
    pub fn runs_by_kind(&self) -> impl Iterator<Item = (&'static str, LandingRuns)> + '_ {
        LandingRun::ALL
            .iter()
            .map(|&kind| (kind.name(), self.by_run[kind as usize]))
    }

    fn add(&mut self, took: Duration) {
        let micros = took.as_secs_f64() * 1e6;
        let bucket = (4.0 * (micros.max(1.0)).log2()) as usize;
        self.histogram[bucket.min(BUCKETS - 1)] += 1;
        self.positioned += 1;
    }

    /// The median and 99th percentile landing time in microseconds (the
    /// upper bound of their histogram bucket, within 19%); None: no landing.
    pub fn percentiles(&self) -> Option<(u64, u64)> {
        let total: u64 = self.histogram.iter().sum();
        if total == 0 {
            return None;
        }
        let at = |share: u64| {
            let want = (total * share).div_ceil(100).max(1);
            let mut seen = 0;
            let bucket = self
                .histogram
                .iter()
                .position(|&n| {
                    seen += n;
                    seen >= want
                })
                .unwrap_or(BUCKETS - 1);
            2f64.powf((bucket + 1) as f64 / 4.0).ceil() as u64
        };
        Some((at(50), at(99)))
    }
}

impl Vcpu {
    /// Gives the vCPU its position counter (None: sync points only).
    pub fn set_position_counter(&mut self, counter: Option<Box<dyn PositionCounter>>) {
        self.positions.counter = counter;
        self.positions.rate = RATE_FLOOR;
        self.positions.entry_latency = ENTRY_LATENCY_MIN_S;
        self.positions.kill_point = std::env::var_os("TANDEM_TEST_FAULT_DIR").map(|dir| {
            std::path::PathBuf::from(dir).join(format!("kill-in-landing.{}", std::process::id()))
        });
        self.positions.late_at = std::env::var("TANDEM_TEST_LAND_LATE")
            .ok()
            .and_then(|n| n.parse().ok());
        self.positions.flip_at = std::env::var("TANDEM_TEST_SYNC_PAGE_FLIP")
            .ok()
            .and_then(|n| n.parse().ok());
        self.positions.epoch_flip_at = std::env::var("TANDEM_TEST_EPOCH_FLIP")
            .ok()
            .and_then(|n| n.parse().ok());
        self.positions.repair_in_halt_only =
            std::env::var_os("TANDEM_TEST_REPAIR_IN_HALT").is_some_and(|v| v == "1");
    }

    /// At every new stop: the instructions run since the previous one, and
    /// this stop becomes the base of the next count.
    pub(super) fn count_stop(&mut self) -> Result<u64, VcpuError> {
        let Some(counter) = &self.positions.counter else {
            return Ok(0);
        };
        let now = counter.read().map_err(position_err)?;
        let since = now.wrapping_sub(self.positions.at_stop);
        self.positions.at_stop = now;
        Ok(since)
    }

    /// Recording, at a kick stop: log it as a positioned stop when it can
    /// be one (a counter, a countable state, not a joining secondary's full
    /// sync point, not an interrupt delivered before any instruction).
    /// False: the caller takes a sync point (as it does after a position
    /// when one is due anyway).
    pub(super) fn record_positioned(&mut self, count: u64) -> Result<bool, VcpuError> {
        // A joining secondary starts at its full sync point: it has no
        // state to land with.
        if self.positions.counter.is_none()
            || self.full_sync.load(std::sync::atomic::Ordering::Acquire)
        {
            return Ok(false);
        }
        let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        if !countable(&sregs, &events) {
            return Ok(false);
        }
        // No instruction counted: the state of the previous stop, unless
        // KVM entered the guest and delivered the interrupt injected there,
        // which a replay cannot do without running an instruction. (Code
        // the counter does not see, 64-bit CPL3, could also have run: the
        // landing's RIP check finds that, as a divergence repaired at the
        // next sync point.)
        let delivered = self.positions.entered
            && self.positions.injected_at == Some(self.stop - 1)
            && events.interrupt.injected == 0;
        if count == 0 && delivered {
            return Ok(false);
        }
        // A joining secondary's pre-copy is served at every kind of stop.
        self.serve_precopy()?;
        let at = RecordedPosition {
            count,
            rip: regs.rip,
            digest: digest(&regs, &sregs, &events, false),
        };
        self.journal.positioned(self.stop, at);
        self.stats.landing.positioned += 1;
        self.live_counters
            .positioned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(true)
    }

    /// Notes an interrupt injected at the current stop.
    pub(super) fn note_injection(&mut self) {
        self.positions.injected_at = Some(self.stop);
    }

    /// Notes, before a `KVM_RUN`, whether it can enter the guest.
    pub(super) fn note_entry(&mut self) {
        self.positions.entered = self.fd.get_kvm_run().immediate_exit == 0;
    }

    /// The flag a repair sets to have the next kick stop be a sync point.
    pub fn sync_request(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.sync_request.clone()
    }

    /// The flag the replication side sets while held output waits for
    /// verified epochs.
    pub fn output_awaits_verification(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.output_awaits_verification.clone()
    }

    /// Whether this kick stop must be a sync point anyway: a joining
    /// secondary or a repair needs one, or `--sync-interval` has passed.
    pub(super) fn sync_point_due(&self) -> Option<SyncReason> {
        self.sync_point_asked(!self.positions.repair_in_halt_only)
            .or_else(|| {
                self.policy
                    .sync_interval
                    .is_some_and(|every| {
                        let every = u64::try_from(every.as_nanos()).unwrap_or(u64::MAX);
                        self.since_start_ns() >= self.last_sync_ns.saturating_add(every)
                    })
                    .then_some(SyncReason::Interval)
            })
    }

    /// Recording, while the guest sleeps in HLT: a sync point a joining
    /// secondary or a repair asked for (an interval one waits for a kick:
    /// a sleeping guest changes nothing worth carrying).
    pub(super) fn sync_point_due_in_halt(&self) -> Option<SyncReason> {
        if !self.journal.recording() {
            return None;
        }
        self.sync_point_asked(true)
    }

    /// A sync point asked for: a joiner's full one, else (where `repair`)
    /// one a repair asked for, which taking it answers.
    fn sync_point_asked(&self, repair: bool) -> Option<SyncReason> {
        use std::sync::atomic::Ordering;
        if self.full_sync.load(Ordering::Acquire) {
            return Some(SyncReason::Full);
        }
        (repair && self.sync_request.swap(false, Ordering::AcqRel)).then_some(SyncReason::Requested)
    }

    /// Replaying: runs the guest to the recorded position of stop `stop`
    /// and checks RIP and digest there. Every way out clears the guest
    /// debug state and the landing timer.
    pub(super) fn land(&mut self, stop: u64, target: RecordedPosition) -> Result<Step, VcpuError> {
        let began = Instant::now();
        self.complete_pending_exit()?;
        self.positions.attempts += 1;
        let late = self.positions.late_at == Some(self.positions.attempts);
        let target = RecordedPosition {
            count: target.count + u64::from(late),
            ..target
        };
        let result = match self.land_inner(stop, target) {
            Err(VcpuError::Journal(JournalError::Diverged { stop, what }))
                if self.shadow.is_some() =>
            {
                self.landing_missed(stop, what);
                Ok(Step::Stop(None))
            }
            other => other,
        };
        self.disarm_landing_timer();
        let cleared = self.set_debug(0, 0);
        self.stats.landing.micros += began.elapsed().as_micros() as u64;
        // Counted when it landed (not a miss, a stop request or an error).
        if matches!(result, Ok(Step::Stop(None))) && !self.lost() {
            self.stats.landing.add(began.elapsed());
            self.live_counters
                .positioned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if let Some((p50, p99)) = self.stats.landing.percentiles() {
                use std::sync::atomic::Ordering::Relaxed;
                self.live_counters.landing_p50_us.store(p50, Relaxed);
                self.live_counters.landing_p99_us.store(p99, Relaxed);
            }
        }
        let step = result?;
        cleared?;
        Ok(step)
    }

    fn land_inner(&mut self, stop: u64, target: RecordedPosition) -> Result<Step, VcpuError> {
        if self.positions.counter.is_none() {
            return Err(missed(stop, "this replay has no position counter".into()));
        }
        // A kick aimed no further than the guest can run at its fastest
        // made no progress: this landing goes on with the breakpoint only.
        let mut coarse_done = false;
        // An exception delivered at the recorded count (see delivery.rs).
        let mut delivered = false;
        // RIP as the last debug exit gave it (KVM_GET_REGS costs ~12 µs
        // here); None before the first run and after a kick. An event can
        // be on its way in only then (debug exits come at instruction
        // boundaries).
        let mut rip: Option<u64> = None;
        // The last run was a single step: whether an event was on its way
        // in, and the count it started from.
        let mut stepped: Option<(bool, u64)> = None;
        loop {
            let done = self.positions.since_stop()?;
            if let Some((in_flight, from)) = stepped.take() {
                if !self.clear_leaked_tf(target.rip, in_flight, done.saturating_sub(from))? {
                    return Err(missed(
                        stop,
                        "a single step delivered an event whose frame holds no TF to clear".into(),
                    ));
                }
            }
            if self.stop_requested() {
                return Ok(Step::Done(RunOutcome::Stopped));
            }
            if done > target.count {
                let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                return Err(missed(
                    stop,
                    format!(
                        "ran {done} instructions, past the recorded {} (RIP {:#x})",
                        target.count, regs.rip
                    ),
                ));
            }
            let left = target.count - done;
            if left == 0 {
                let regs = self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
                // This replay's own kick came between a fault and its
                // delivery; the recorder advanced to the handler's entry.
                if regs.rip != target.rip && !delivered && self.arm_delivery_to(target.rip)? {
                    delivered = true;
                    rip = self.land_run(stop, done, LandingRun::Breakpoint)?;
                    continue;
                }
                return self
                    .check_landed(stop, target, &regs)
                    .map(|()| Step::Stop(None));
            }
            if left > FINE_DISTANCE && !coarse_done {
                (rip, coarse_done) = self.coarse_kick(stop, done, left)?;
                continue;
            }
            if self
                .positions
                .kill_point
                .as_ref()
                .is_some_and(|p| p.exists())
            {
                // SAFETY: raising SIGKILL on this process has no
                // preconditions (a test fault point: it does not return).
                unsafe { libc::raise(libc::SIGKILL) };
            }
            let at = match rip {
                Some(at) => at,
                None => self.fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?.rip,
            };
            if at == target.rip {
                // An early visit of the target RIP: one step over it (the
                // breakpoint would fire again at once: it ignores RF). What
                // the step delivers pushes its TF (delivery.rs).
                let in_flight = rip.is_none() && self.event_in_flight()?;
                stepped = Some((in_flight, done));
                self.set_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0)?;
                rip = self.land_run(stop, done, LandingRun::Step)?;
            } else {
                self.set_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, target.rip)?;
                rip = self.land_run(stop, done, LandingRun::Breakpoint)?;
            }
        }
    }

    /// One run of the coarse phase, `left` instructions from the target:
    /// a kick aimed short of it. The RIP of a debug exit (None: a kick),
    /// and whether kicks cannot get closer (entering takes longer than the
    /// rest of the way).
    fn coarse_kick(
        &mut self,
        stop: u64,
        done: u64,
        left: u64,
    ) -> Result<(Option<u64>, bool), VcpuError> {
        self.set_debug(0, 0)?;
        let p = &self.positions;
        // Never longer than the rest of the way at the fastest rate seen:
        // an entry latency learned on a loaded host (up to 2 ms, 3,000
        // instructions here) once overshot a target 51 instructions away
        // when the next entry was quick.
        let fastest = left as f64 / p.rate;
        let aim = (p.entry_latency + AIM * fastest).min(fastest);
        self.arm_landing_timer(Duration::from_secs_f64(aim))?;
        let rip = self.land_run(stop, done, LandingRun::Coarse)?;
        // A kick that came before the guest ran anything was aimed too
        // early: enter for longer next time.
        let p = &mut self.positions;
        let stalled = p.since_stop()? == done;
        p.entry_latency = if stalled {
            (p.entry_latency * 2.0).min(ENTRY_LATENCY_MAX_S)
        } else {
            (p.entry_latency * 0.9).max(ENTRY_LATENCY_MIN_S)
        };
        Ok((rip, stalled && aim >= fastest))
    }

    /// One `KVM_RUN` of a landing: a kick or a debug exit are progress;
    /// any other exit is one the recording did not have here. Some: a
    /// debug exit ended it, at this RIP (its linear address: code segments
    /// are flat where breakpoints on a RIP work); None: a kick.
    fn land_run(
        &mut self,
        stop: u64,
        done: u64,
        kind: LandingRun,
    ) -> Result<Option<u64>, VcpuError> {
        let began = Instant::now();
        let run = self.fd.run();
        self.live_counters.charge(super::Phase::Guest, began);
        let exit = match run {
            Ok(VcpuExit::Debug(debug)) => Ok(Some(debug.pc)),
            Ok(other) => {
                // KVM completes a PIO/MMIO/MSR exit on the next entry: the
                // install that repairs this must complete it first.
                self.exit_pending = matches!(
                    other,
                    VcpuExit::IoIn(..)
                        | VcpuExit::IoOut(..)
                        | VcpuExit::MmioRead(..)
                        | VcpuExit::MmioWrite(..)
                        | VcpuExit::X86Rdmsr(..)
                        | VcpuExit::X86Wrmsr(..)
                );
                Err(format!("{other:?}"))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(None),
            Err(e) => {
                return Err(VcpuError::Kvm {
                    what: "KVM_RUN (landing)",
                    source: e,
                })
            }
        };
        let span = began.elapsed();
        self.disarm_landing_timer();
        // The landing timer's kick is answered by this exit; a stop request
        // is seen at the top of the landing loop.
        self.fd.set_kvm_immediate_exit(0);
        let by_run = &mut self.stats.landing.by_run[kind as usize];
        by_run.runs += 1;
        by_run.micros += span.as_micros() as u64;
        let exit = exit.map_err(|exit| {
            missed(
                stop,
                format!("the guest made an exit ({exit}) before the recorded position"),
            )
        })?;
        if kind == LandingRun::Coarse && span >= RATE_MIN_SPAN {
            let ran = self.positions.since_stop()?.saturating_sub(done);
            let rate = ran as f64 / span.as_secs_f64();
            self.positions.rate = self.positions.rate.max(rate);
        }
        Ok(exit)
    }

    /// A landing missed: the epoch diverged (a live secondary asks its
    /// primary for a sync point); until one arrives, stops pass without
    /// running the guest, whose state is wrong. (Without repair only a sync
    /// point at this same stop, installed next, can follow a miss.)
    pub(super) fn landing_missed(&mut self, stop: u64, what: String) {
        self.diverged_at_stop(stop, what, "waiting for a sync point");
        self.positions.lost = true;
    }

    /// Whether stops pass without running the guest (a missed landing,
    /// not yet repaired).
    pub(super) fn lost(&self) -> bool {
        self.positions.lost
    }

    /// A sync point was installed: the guest runs again.
    pub(super) fn found(&mut self) {
        self.positions.lost = false;
    }

    /// At the recorded count: RIP and the digest must be the recorded ones.
    fn check_landed(
        &mut self,
        stop: u64,
        target: RecordedPosition,
        regs: &kvm_bindings::kvm_regs,
    ) -> Result<(), VcpuError> {
        if regs.rip != target.rip {
            return Err(missed(
                stop,
                format!(
                    "at the recorded count RIP is {:#x}, recorded {:#x}",
                    regs.rip, target.rip
                ),
            ));
        }
        let sregs = self.fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        let ours = digest(regs, &sregs, &events, false);
        if ours != target.digest {
            return Err(missed(
                stop,
                format!(
                    "at RIP {:#x} the position digest is {ours:#x}, recorded {:#x}",
                    regs.rip, target.digest
                ),
            ));
        }
        Ok(())
    }

    /// Sets the guest-debug state (control bits, breakpoint 0) if it changed.
    pub(super) fn set_debug(&mut self, control: u32, breakpoint: u64) -> Result<(), VcpuError> {
        let want = (control, breakpoint);
        if self.positions.debug.unwrap_or((0, 0)) == want {
            return Ok(());
        }
        let mut debug = kvm_guest_debug {
            control,
            ..Default::default()
        };
        if control & KVM_GUESTDBG_USE_HW_BP != 0 {
            debug.arch.debugreg[0] = breakpoint;
            debug.arch.debugreg[7] = 1;
        }
        self.fd
            .set_guest_debug(&debug)
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        self.positions.debug = Some(want);
        Ok(())
    }

    /// Whether this vCPU has a position counter.
    pub(super) fn has_position_counter(&self) -> bool {
        self.positions.counter.is_some()
    }

    /// Cancels the landing timer's pending kick, if it has one.
    pub(super) fn disarm_landing_timer(&mut self) {
        if !std::mem::take(&mut self.positions.timer_armed) {
            return;
        }
        if let Some(timer) = &self.positions.timer {
            timer.disarm();
        }
    }

    /// Has the landing timer kick this thread once, `after` from now.
    pub(super) fn arm_landing_timer(&mut self, after: Duration) -> Result<(), VcpuError> {
        self.landing_timer()?.arm(after);
        self.positions.timer_armed = true;
        Ok(())
    }

    fn landing_timer(&mut self) -> Result<&LandingTimer, VcpuError> {
        if self.positions.timer.is_none() {
            self.positions.timer = Some(LandingTimer::new().map_err(|source| VcpuError::Kvm {
                what: "timer_create (landing timer)",
                source,
            })?);
        }
        self.positions
            .timer
            .as_ref()
            .ok_or_else(|| VcpuError::Memory("landing timer".into()))
    }
}

/// A landing that did not reach the recorded position: a divergence there.
fn missed(stop: u64, what: String) -> VcpuError {
    JournalError::Diverged {
        stop,
        what: format!("positioned stop: {what}"),
    }
    .into()
}

/// A POSIX timer that sends the kick signal to the vCPU thread itself: the
/// kernel delivers it, so a busy host cannot delay it behind a thread.
struct LandingTimer {
    id: libc::timer_t,
}

impl LandingTimer {
    /// Creates the timer for the calling (vCPU) thread, whose timers then
    /// fire without the default 50 µs slack (75 instructions here).
    fn new() -> Result<Self, kvm_ioctls::Error> {
        // SAFETY: PR_SET_TIMERSLACK takes a plain integer for this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        // SAFETY: a zeroed sigevent is valid; the fields set below are the
        // ones SIGEV_THREAD_ID reads.
        let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
        event.sigev_notify = libc::SIGEV_THREAD_ID;
        event.sigev_signo = crate::kick::kick_signal();
        // SAFETY: gettid has no preconditions.
        event.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `event` and `id` are live locals of the types timer_create
        // reads and writes.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut id) } != 0 {
            return Err(kvm_ioctls::Error::last());
        }
        Ok(Self { id })
    }

    /// Fires once after `after`.
    fn arm(&self, after: Duration) {
        let after = after.max(Duration::from_micros(1));
        self.set(libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
        });
    }

    /// Cancels a pending expiry.
    fn disarm(&self) {
        self.set(libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        });
    }

    fn set(&self, value: libc::timespec) {
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: value,
        };
        // SAFETY: `id` is a live timer of this process and `spec` a live
        // local; the old value is not asked for.
        unsafe { libc::timer_settime(self.id, 0, &spec, std::ptr::null_mut()) };
    }
}

impl Drop for LandingTimer {
    fn drop(&mut self) {
        // SAFETY: `id` was created by timer_create and is deleted once.
        unsafe { libc::timer_delete(self.id) };
    }
}

// SAFETY: the timer id is a plain handle the kernel keys by process; it is
// used only by the vCPU that owns it.
unsafe impl Send for LandingTimer {}
