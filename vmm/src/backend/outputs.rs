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
}
