//! Live outputs: console bytes to the console thread, transmitted frames to
//! their tap, block requests to their disk's worker.

use std::sync::Arc;

use tandem_replay::{Output, Outputs};

use super::block::BlockWorker;
use super::console::Console;
use super::tap::Tap;

/// Where a live VM's outputs go.
pub struct LiveOutputs {
    console: Console,
    taps: Vec<Arc<Tap>>,
    disks: Vec<BlockWorker>,
}

impl LiveOutputs {
    /// Outputs over a console, the taps (by virtio-net index) and the disk
    /// workers (by virtio-blk index).
    pub fn new(console: Console, taps: Vec<Arc<Tap>>, disks: Vec<BlockWorker>) -> Self {
        Self {
            console,
            taps,
            disks,
        }
    }
}

impl Outputs for LiveOutputs {
    fn emit(&self, output: Output) {
        match output {
            Output::Serial(bytes) => self.console.write(bytes),
            Output::NetTx { device, frame } => match self.taps.get(usize::from(device)) {
                Some(tap) => tap.send(&frame),
                None => tracing::warn!("frame from unknown net device {device} dropped"),
            },
            Output::BlockSubmit {
                device,
                request,
                op,
            } => match self.disks.get(usize::from(device)) {
                Some(disk) => disk.submit(request, op),
                None => tracing::warn!("request for unknown disk {device} dropped"),
            },
        }
    }

    fn flush(&self) {
        self.console.flush();
    }
}

/// Outputs of a replay: the console prints what the recorded run printed;
/// frames and block requests go nowhere (their effects come from the log).
pub struct ReplayOutputs {
    console: Console,
}

impl ReplayOutputs {
    /// Replay outputs over a console.
    pub fn new(console: Console) -> Self {
        Self { console }
    }
}

impl Outputs for ReplayOutputs {
    fn emit(&self, output: Output) {
        if let Output::Serial(bytes) = output {
            self.console.write(bytes);
        }
    }

    fn flush(&self) {
        self.console.flush();
    }
}
