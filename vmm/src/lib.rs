//! tandem-vmm: the KVM side of tandem.
//!
//! One VM with one vCPU and no in-kernel irqchip or PIT: every interrupt comes
//! from tandem's userspace devices and is injected at a stop. Every
//! `KVM_RUN` exit goes through [`exit::handle_exit`] on the vCPU thread, the
//! only thread that changes what the guest sees.
//!
//! Code map: [`vm`] builds a VM (memory, kernel via [`loader`], initial state
//! via [`boot`], CPUID via [`cpuid`], TSC MSR routing via [`msr`], devices via
//! [`legacy`] on a [`bus`]); [`vcpu`] runs it; [`kick`] gets the vCPU out of
//! the guest when time or the outside world needs a stop.
#![warn(missing_docs)]

pub mod backend;
pub mod boot;
pub mod bus;
pub mod checkpoint;
pub mod cpuid;
pub mod device_manager;
pub mod dirty;
pub mod epoch;
pub mod exit;
pub mod handle;
pub mod journal;
pub mod kick;
pub mod layout;
pub mod legacy;
pub mod loader;
pub mod msr;
pub mod position;
pub mod precopy;
pub mod repair;
pub mod state;
pub mod vcpu;
pub mod vm;

pub use handle::{VmFigures, VmHandle};
pub use vcpu::{CrashPolicy, GuestCrash, ReplayEnd, RunOutcome, VcpuStats};
pub use vm::{DiskConfig, NetConfig, RunReport, Vm, VmConfig, VmError, DEFAULT_KVM_PATH};
