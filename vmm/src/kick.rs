//! Getting the vCPU out of the guest, and the queue of external events.
//!
//! A guest computing without exits would never see its timer. Whenever a
//! device deadline passes or an external event is queued, the vCPU thread is
//! *kicked*: a real-time signal, blocked on every other thread, whose handler
//! (running on the vCPU thread itself) sets `kvm_run.immediate_exit`, so
//! `KVM_RUN` returns `EINTR` now or refuses to enter the guest if it was not
//! in it yet. The vCPU thread then collects its inputs at that stop.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::kvm_run;
use tandem_devices::lock;
use vmm_sys_util::signal::{block_signal, register_signal_handler, unblock_signal, SIGRTMIN};

thread_local! {
    /// The vCPU thread's `kvm_run`, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
    /// Kicks received by this thread, so clearing `immediate_exit` never loses one.
    static KICKS: Cell<u64> = const { Cell::new(0) };
}

/// The kick signal.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + 1
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KICKS.with(|k| k.set(k.get().wrapping_add(1)));
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is the mmapped `kvm_run` of this thread's
            // vCPU, installed by `VcpuKickTarget::install` and cleared before
            // the vCPU fd is dropped; a byte store is async-signal-safe.
            unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
        }
    });
}

/// Installs the kick handler (once per process) and blocks the kick signal on
/// the calling thread, so threads it spawns inherit the block (idempotent).
pub fn setup_kick_signal() -> Result<(), vmm_sys_util::errno::Error> {
    static HANDLER: Once = Once::new();
    let mut result = Ok(());
    HANDLER.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result?;
    match block_signal(kick_signal()) {
        // Blocked already (a thread spawned by one that set up kicks): fine.
        Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => Ok(()),
        Err(_) => Err(vmm_sys_util::errno::Error::last()),
    }
}

/// Done on the vCPU thread: make kicks set this `kvm_run`'s `immediate_exit`.
pub struct VcpuKickTarget {
    thread: Arc<Mutex<Option<libc::pthread_t>>>,
}

impl VcpuKickTarget {
    /// Registers the calling thread as the vCPU thread.
    pub fn install(run: &mut kvm_run, kicker: &Kicker) -> Result<Self, vmm_sys_util::errno::Error> {
        KVM_RUN.with(|r| r.set(run as *mut kvm_run));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *lock(&kicker.thread) = Some(me);
        unblock_signal(kick_signal()).map_err(|_| vmm_sys_util::errno::Error::last())?;
        Ok(Self {
            thread: kicker.thread.clone(),
        })
    }

    /// Kicks received so far on this thread.
    pub fn kicks() -> u64 {
        KICKS.with(|k| k.get())
    }
}

impl Drop for VcpuKickTarget {
    fn drop(&mut self) {
        let _ = block_signal(kick_signal());
        *lock(&self.thread) = None;
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    }
}

/// Clears `vcpu`'s `immediate_exit` unless a kick arrived on this thread
/// since `kicks_before` (the handler runs on this thread, so checking after
/// clearing is exact).
pub fn clear_immediate_exit(vcpu: &mut kvm_ioctls::VcpuFd, kicks_before: u64) {
    vcpu.set_kvm_immediate_exit(0);
    if VcpuKickTarget::kicks() != kicks_before {
        vcpu.set_kvm_immediate_exit(1);
    }
}

/// A handle that kicks the vCPU thread out of the guest.
#[derive(Clone, Default)]
pub struct Kicker {
    thread: Arc<Mutex<Option<libc::pthread_t>>>,
}

impl Kicker {
    /// Kicks the vCPU if it is running; a no-op before it starts or after it ends.
    pub fn kick(&self) {
        let thread = lock(&self.thread);
        if let Some(t) = *thread {
            // SAFETY: `t` is the live vCPU thread: it clears this slot under
            // the same lock before it exits.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }
}

#[derive(Default)]
struct TimerState {
    deadline: Option<Instant>,
    shutdown: bool,
    /// Kick at most this often.
    min_interval: std::time::Duration,
    last_kick: Option<Instant>,
}

/// Kicks the vCPU when the next device deadline passes.
pub struct DeadlineTimer {
    shared: Arc<(Mutex<TimerState>, Condvar)>,
    /// The interval last set (None: never set).
    min_interval: Option<std::time::Duration>,
    thread: Option<JoinHandle<()>>,
}

impl DeadlineTimer {
    /// Starts the timer thread.
    pub fn start(kicker: Kicker) -> std::io::Result<Self> {
        let shared: Arc<(Mutex<TimerState>, Condvar)> = Arc::default();
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("tandem-timer".into())
            .spawn(move || timer_loop(&theirs, &kicker))?;
        Ok(Self {
            shared,
            min_interval: None,
            thread: Some(thread),
        })
    }

    /// Never kick more often than `every`.
    pub fn set_min_interval(&mut self, every: std::time::Duration) {
        if self.min_interval == Some(every) {
            return;
        }
        self.min_interval = Some(every);
        lock(&self.shared.0).min_interval = every;
    }

    /// Arms the timer for `deadline` (or disarms it). A deadline that
    /// already fired and is set again kicks again (after the minimum
    /// interval): whatever it was for has not been done yet.
    pub fn set(&mut self, deadline: Option<Instant>) {
        let (state, cond) = &*self.shared;
        let mut state = lock(state);
        if state.deadline == deadline {
            return;
        }
        state.deadline = deadline;
        cond.notify_one();
    }
}

impl Drop for DeadlineTimer {
    fn drop(&mut self) {
        let (state, cond) = &*self.shared;
        lock(state).shutdown = true;
        cond.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn timer_loop(shared: &(Mutex<TimerState>, Condvar), kicker: &Kicker) {
    let (state, cond) = shared;
    let mut s = lock(state);
    loop {
        if s.shutdown {
            return;
        }
        match s.deadline {
            None => s = cond.wait(s).unwrap_or_else(|p| p.into_inner()),
            Some(d) => {
                let now = Instant::now();
                let earliest = s.last_kick.map(|k| k + s.min_interval);
                let d = earliest.map_or(d, |e| d.max(e));
                if now >= d {
                    s.deadline = None;
                    s.last_kick = Some(now);
                    kicker.kick();
                } else {
                    s = cond
                        .wait_timeout(s, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Waits (at most 5 s) until this thread has received `n` kicks.
    fn wait_for_kicks(n: u64) -> bool {
        let until = Instant::now() + Duration::from_secs(5);
        while VcpuKickTarget::kicks() < n && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(1));
        }
        VcpuKickTarget::kicks() >= n
    }

    #[test]
    fn a_deadline_set_again_after_it_fired_kicks_again() {
        setup_kick_signal().unwrap();
        let mut run = kvm_run::default();
        let kicker = Kicker::default();
        let _target = VcpuKickTarget::install(&mut run, &kicker).unwrap();
        let mut timer = DeadlineTimer::start(kicker).unwrap();
        let before = VcpuKickTarget::kicks();
        let deadline = Some(Instant::now());
        timer.set(deadline);
        assert!(
            wait_for_kicks(before + 1),
            "the first deadline never kicked"
        );
        // Not handled (a sync point still due): the same deadline again
        // must kick again, not be taken for the one already armed.
        timer.set(deadline);
        assert!(
            wait_for_kicks(before + 2),
            "the same deadline set again never kicked"
        );
        timer.set(None);
    }
}
