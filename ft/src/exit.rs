//! The process exit statuses of every `tandem` command (the README's table)
//! and how a VM's end maps to one.

use std::process::ExitCode;

use tandem_vmm::{ReplayEnd, RunOutcome, RunReport};
use tracing::info;

/// The guest crashed: triple fault, emulation failure, HLT with interrupts off.
pub const EXIT_GUEST_CRASH: u8 = 120;
/// tandem or KVM failed while the guest ran.
pub const EXIT_VMM_ERROR: u8 = 121;
/// A replay stopped early: the log was cut short (torn tail, no End record).
pub const EXIT_REPLAY_TRUNCATED: u8 = 122;
/// A replay diverged and could not be repaired.
pub const EXIT_DIVERGED: u8 = 123;
/// The VM could not be started (bad kernel, bad option, no KVM).
pub const EXIT_START_FAILED: u8 = 3;
/// A side fenced itself (see [`crate::fence`]).
pub const EXIT_FENCED: u8 = 124;

/// Maps how a VM ended to the process exit status (the README's table).
pub fn finish_report(result: Result<RunReport, tandem_vmm::VmError>) -> ExitCode {
    match result {
        Ok(RunReport { outcome, stats, .. }) => {
            info!(?stats, "VM stopped");
            match outcome {
                RunOutcome::GuestExit(code) => ExitCode::from(code),
                RunOutcome::Reset => ExitCode::SUCCESS,
                RunOutcome::Crashed(crash) => {
                    eprintln!("tandem: {crash}");
                    ExitCode::from(EXIT_GUEST_CRASH)
                }
                RunOutcome::ReplayEnded(ReplayEnd::AtWatermark { stop }) => {
                    eprintln!(
                        "tandem: warning: the log was cut short (no End record); replayed up to its last watermark, stop {stop}"
                    );
                    ExitCode::from(EXIT_REPLAY_TRUNCATED)
                }
                RunOutcome::Stopped => ExitCode::SUCCESS,
                RunOutcome::ReplayEnded(ReplayEnd::LogExhausted { stop }) => {
                    eprintln!(
                        "tandem: warning: the log ends while the guest is halted at stop {stop}; replayed all of it"
                    );
                    ExitCode::from(EXIT_REPLAY_TRUNCATED)
                }
            }
        }
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
}
