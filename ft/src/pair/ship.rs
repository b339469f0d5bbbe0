//! The primary's log on its way to the link: [`ShipSink`] turns records
//! into frames for the ship thread (`Replicator::ship` in `pair.rs`), and
//! [`batch`] puts the frames queued behind one into the same message.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, OnceLock};

use tandem_replay::log::{LogError, Record};
use tandem_vmm::journal::{RecordSink, Throttle};
use tandem_vmm::VmHandle;

use super::PairParams;

/// A record sink that ships frames to the replication thread.
pub(super) struct ShipSink {
    frames: Sender<ShipFrame>,
    throttle: Arc<Throttle>,
    /// The VM (set once it exists): the stop of its last full sync point
    /// is where a joining secondary starts.
    vm: Arc<OnceLock<VmHandle>>,
}

impl ShipSink {
    /// A sink for `params`' link, the frames it ships, and the slot where
    /// the VM's handle goes once the VM exists (the vCPU publishes the stop
    /// of each full sync point before it logs it; the sink tags that record
    /// for the ship thread).
    pub(super) fn new(params: &PairParams) -> (Self, Receiver<ShipFrame>, Arc<OnceLock<VmHandle>>) {
        let (frames, shipped) = channel::<ShipFrame>();
        let vm: Arc<OnceLock<VmHandle>> = Arc::default();
        let sink = Self {
            frames,
            throttle: params.throttle.clone(),
            vm: vm.clone(),
        };
        (sink, shipped, vm)
    }
}

impl RecordSink for ShipSink {
    fn append(&mut self, record: &Record) -> Result<u64, LogError> {
        // A sync point larger than a frame comes as several frames: each
        // is shipped (and counted for resume) on its own.
        let frames = record.encode_frames()?;
        let len: u64 = frames.iter().map(|f| f.len() as u64).sum();
        self.throttle.shipped(record.stop(), len);
        if let Record::Watermark { stop, .. } = record {
            self.throttle.watermark_shipped(*stop);
        }
        let full = matches!(record, Record::SyncPoint { stop, .. }
            if self.vm.get().is_some_and(|vm| *stop == vm.last_full_sync_stop()));
        for (i, bytes) in frames.into_iter().enumerate() {
            // A joiner starts at the head frame of the full sync point.
            let _ = self.frames.send(ShipFrame {
                stop: record.stop(),
                full: full && i == 0,
                bytes,
            });
        }
        Ok(len)
    }
    fn sync(&mut self) -> Result<(), LogError> {
        Ok(())
    }
}

/// The ship thread puts queued frames into one message up to this size.
const BATCH_BYTES: usize = 1 << 20;

/// A frame for the replication thread: the record's stop, whether it is a
/// full sync point (where a joining secondary starts), and its bytes.
pub(super) struct ShipFrame {
    pub(super) stop: u64,
    pub(super) full: bool,
    pub(super) bytes: Vec<u8>,
}

/// `first` and the frames queued behind it, up to [`BATCH_BYTES`], as one
/// message to an attached secondary: each message costs both sides a seal
/// and system calls, which is what limited a Linux pair in the emulated
/// harness. A full sync point's head frame starts a message of its own (a
/// joiner starts there): one met behind `first` is left in `carried`.
pub(super) fn batch(
    mut first: ShipFrame,
    frames: &Receiver<ShipFrame>,
    carried: &mut Option<ShipFrame>,
) -> ShipFrame {
    if first.full {
        return first;
    }
    while first.bytes.len() < BATCH_BYTES {
        match frames.try_recv() {
            Ok(next) if !next.full => {
                first.bytes.extend_from_slice(&next.bytes);
                first.stop = first.stop.max(next.stop);
            }
            Ok(next) => {
                *carried = Some(next);
                break;
            }
            Err(_) => break,
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(stop: u64, full: bool, bytes: &[u8]) -> ShipFrame {
        ShipFrame {
            stop,
            full,
            bytes: bytes.to_vec(),
        }
    }

    #[test]
    fn queued_frames_join_one_message_until_a_full_sync_point() {
        let (tx, rx) = channel();
        for f in [
            frame(3, false, b"b"),
            frame(4, false, b"c"),
            frame(5, true, b"F"),
            frame(6, false, b"d"),
        ] {
            tx.send(f).unwrap();
        }
        let mut carried = None;
        let m = batch(frame(2, false, b"a"), &rx, &mut carried);
        assert_eq!(
            (m.stop, m.full, m.bytes.as_slice()),
            (4, false, &b"abc"[..])
        );
        // The full one starts the next message, alone.
        let next = carried.take().unwrap();
        let m = batch(next, &rx, &mut carried);
        assert_eq!((m.stop, m.full, m.bytes.as_slice()), (5, true, &b"F"[..]));
        let m = batch(rx.try_recv().unwrap(), &rx, &mut carried);
        assert_eq!((m.stop, m.bytes.as_slice()), (6, &b"d"[..]));
        assert!(carried.is_none());
    }

    #[test]
    fn a_message_stops_growing_at_the_batch_size() {
        let (tx, rx) = channel();
        let big = vec![0u8; BATCH_BYTES / 2 + 1];
        for stop in 1..=3 {
            tx.send(frame(stop, false, &big)).unwrap();
        }
        let mut carried = None;
        let m = batch(rx.try_recv().unwrap(), &rx, &mut carried);
        assert_eq!(m.stop, 2);
        assert_eq!(rx.try_recv().unwrap().stop, 3, "left queued");
    }
}
