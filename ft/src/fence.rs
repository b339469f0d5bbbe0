//! Fencing: a side that may no longer run its VM (another side won it, or
//! it cannot tell) stops the VM at once, releases nothing more, keeps
//! answering `role=fenced` with its [`FenceReason`] on the control socket,
//! and exits with [`EXIT_FENCED`] when terminated.
//!
//! A fence can happen on any thread (a monitor, a lease keeper, the
//! decoder); that thread stops the VM and parks. The vCPU's `Vm::run` then
//! returns on the main thread, which finds the reason with [`fenced`] and
//! hands it up to the command ([`crate::pair::Ended::Fenced`]); the command
//! waits for SIGTERM ([`until_terminated`]) and chooses the exit status.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tandem_vmm::vm::VmStopper;

pub use crate::exit::EXIT_FENCED;
use crate::status::StatusBoard;

/// Why a side fenced itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FenceReason {
    /// The arbiter shows a newer generation held by another side.
    Superseded(String),
    /// Another side won the arbitration this side needed (`while_`: what
    /// this side was doing).
    LostArbitration(&'static str),
    /// The arbiter could not be reached when this side needed it.
    ArbiterUnreachable(String),
    /// The configured fence command (STONITH) failed: not going live.
    FenceCommandFailed(String),
    /// The replication stream could not be decoded: a secondary that cannot
    /// follow must not go live on its own.
    DamagedStream(String),
    /// `state_dir` cannot take more state.
    StateDirFull(String),
    /// This side lost its arbiter lease and handed the VM to its secondary.
    LeaseLost {
        /// The generation this side held.
        generation: u64,
        /// The host told to go live.
        to: String,
    },
}

impl FenceReason {
    /// The word `events.log` records after `fenced`.
    pub fn event(&self) -> &'static str {
        match self {
            FenceReason::Superseded(_) => "superseded",
            FenceReason::LostArbitration(_) => "lost-arbitration",
            FenceReason::ArbiterUnreachable(_) => "arbiter-unreachable",
            FenceReason::FenceCommandFailed(_) => "fence-command-failed",
            FenceReason::DamagedStream(_) => "damaged-stream",
            FenceReason::StateDirFull(_) => "state-dir-full",
            FenceReason::LeaseLost { .. } => "lease-lost",
        }
    }
}

impl fmt::Display for FenceReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FenceReason::Superseded(grant) => write!(f, "another side holds the VM now ({grant})"),
            FenceReason::LostArbitration(what) => write!(f, "{what}"),
            FenceReason::ArbiterUnreachable(why) => write!(f, "{why}"),
            FenceReason::FenceCommandFailed(why) => write!(f, "{why}; not going live"),
            FenceReason::DamagedStream(why) => {
                write!(f, "the replication stream is damaged: {why}")
            }
            FenceReason::StateDirFull(why) => write!(
                f,
                "{why}: this secondary stops; the primary runs on unprotected"
            ),
            FenceReason::LeaseLost { generation, to } => write!(
                f,
                "lost the arbiter lease of generation {generation}: told host {to} to go live (it reaches the arbiter) and stopped"
            ),
        }
    }
}

/// What fencing and shutdown act on, once the VM exists.
pub struct Side {
    /// The status board.
    pub board: Arc<StatusBoard>,
    /// Stops the VM.
    pub stopper: VmStopper,
}

static SIDE: OnceLock<Side> = OnceLock::new();
static FENCED: OnceLock<FenceReason> = OnceLock::new();
static TERM: AtomicBool = AtomicBool::new(false);

/// Registers this process's side (once its VM exists).
pub fn register(side: Side) {
    let _ = SIDE.set(side);
}

/// Fences this side: stops the VM (nothing more leaves it) and parks the
/// calling thread; the main thread takes it from there ([`fenced`]). Before
/// the VM exists there is nothing to hand up: the process exits with
/// [`EXIT_FENCED`] at once.
pub fn fence(reason: FenceReason) -> ! {
    eprintln!("tandem: fenced: {reason}");
    let text = reason.to_string();
    let _ = FENCED.set(reason);
    match SIDE.get() {
        Some(side) => {
            side.board.fenced(&text);
            side.stopper.stop();
            loop {
                std::thread::park();
            }
        }
        None => std::process::exit(i32::from(EXIT_FENCED)),
    }
}

/// Why this side fenced itself, if it did.
pub fn fenced() -> Option<FenceReason> {
    FENCED.get().cloned()
}

/// A fenced side keeps answering on its control socket until it is
/// terminated (SIGTERM): returns then.
pub fn until_terminated() {
    while !TERM.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::Release);
}

/// SIGTERM: a clean shutdown of this side. A side that runs stops its VM;
/// a fenced one is ended by its main thread ([`until_terminated`]), or
/// here if the main thread does not get there within two seconds.
pub fn handle_term() {
    // SAFETY: the handler only stores to an atomic.
    unsafe { libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t) };
    let spawned = std::thread::Builder::new()
        .name("tandem-term".into())
        .spawn(|| loop {
            std::thread::sleep(Duration::from_millis(50));
            if !TERM.load(Ordering::Acquire) {
                continue;
            }
            match SIDE.get() {
                Some(side) if side.board.is_fenced() => {
                    std::thread::sleep(Duration::from_secs(2));
                    std::process::exit(i32::from(EXIT_FENCED))
                }
                Some(side) => {
                    eprintln!("tandem: terminated: stopping the VM");
                    side.stopper.stop();
                    return;
                }
                None => std::process::exit(0),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no SIGTERM handling: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reason_names_its_event_and_says_why() {
        let r = FenceReason::LeaseLost {
            generation: 4,
            to: "b".into(),
        };
        assert_eq!(r.event(), "lease-lost");
        assert!(r.to_string().contains("generation 4: told host b"), "{r}");
        let r = FenceReason::DamagedStream("bad frame".into());
        assert_eq!(
            (r.event(), r.to_string().as_str()),
            (
                "damaged-stream",
                "the replication stream is damaged: bad frame"
            )
        );
        assert_eq!(
            FenceReason::LostArbitration("another side won the arbitration").to_string(),
            "another side won the arbitration"
        );
    }
}
