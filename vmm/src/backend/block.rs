//! Block I/O for virtio-blk in live mode: one worker thread per disk image.
//!
//! The device submits requests (write data captured at the submission stop)
//! as `Output::BlockSubmit`; the worker performs them in order on the image
//! file and queues `Cause::BlockDone` (with the data a read returned) for the
//! vCPU thread. A flush completes only after `fsync` returns.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tandem_replay::{BlockOp, Cause, CauseQueue};

use super::replica::Replica;
use super::sector::read_full;

/// virtio-blk status: success.
const STATUS_OK: u8 = 0;
/// virtio-blk status: I/O error.
const STATUS_IOERR: u8 = 1;
pub use super::sector::SECTOR_SIZE;

/// Why a disk image could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Opening or inspecting the file failed.
    #[error("disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The image is empty.
    #[error("disk image {0} is smaller than one 512-byte sector")]
    TooSmall(PathBuf),
}

/// An opened disk image.
pub struct DiskImage {
    file: File,
    /// Capacity in 512-byte sectors (the file's size, rounded down).
    pub capacity_sectors: u64,
    /// Whether the guest may write.
    pub read_only: bool,
    /// The image path.
    pub path: PathBuf,
}

impl DiskImage {
    /// Opens `path`, read-only if `read_only`.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let capacity_sectors = len / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(DiskError::TooSmall(path.to_path_buf()));
        }
        Ok(Self {
            file,
            capacity_sectors,
            read_only,
            path: path.to_path_buf(),
        })
    }
}

/// What a worker performs requests on.
enum Backing {
    /// One image (local, or shared storage).
    Image(DiskImage),
    /// This host's replica of a mirrored disk: each write sets its chunks'
    /// bits in the sidecar first.
    Replica(Arc<Replica>),
}

/// The worker for one disk.
pub struct BlockWorker {
    tx: Option<Sender<(u64, BlockOp)>>,
    thread: Option<JoinHandle<()>>,
}

impl BlockWorker {
    /// Starts the worker for virtio-blk device `device` over `image`.
    pub fn start(device: u8, image: DiskImage, queue: CauseQueue) -> std::io::Result<Self> {
        Self::spawn(device, Backing::Image(image), queue)
    }

    /// Starts the worker for virtio-blk device `device` over this host's
    /// replica of a mirrored disk.
    pub fn start_mirrored(
        device: u8,
        replica: Arc<Replica>,
        queue: CauseQueue,
    ) -> std::io::Result<Self> {
        Self::spawn(device, Backing::Replica(replica), queue)
    }

    fn spawn(device: u8, backing: Backing, queue: CauseQueue) -> std::io::Result<Self> {
        let (tx, rx) = channel::<(u64, BlockOp)>();
        let thread = std::thread::Builder::new()
            .name(format!("tandem-blk{device}"))
            .spawn(move || {
                for (request, op) in rx {
                    let (status, data) = match &backing {
                        Backing::Image(image) => perform(image, op),
                        Backing::Replica(replica) => match replica.perform(&op) {
                            Ok(done) => done,
                            Err(e) => {
                                tracing::warn!("disk {device}: {e}");
                                (STATUS_IOERR, Vec::new())
                            }
                        },
                    };
                    queue.push(Cause::BlockDone {
                        device,
                        request,
                        status,
                        data,
                    });
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a request.
    pub fn submit(&self, request: u64, op: BlockOp) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((request, op));
        }
    }
}

impl Drop for BlockWorker {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn log_io_error(image: &DiskImage, what: &str, e: &std::io::Error) {
    tracing::warn!("disk {}: {what} failed: {e}", image.path.display());
}

/// Performs one request; returns the virtio status and the data read.
fn perform(image: &DiskImage, op: BlockOp) -> (u8, Vec<u8>) {
    match op {
        BlockOp::Read { sector, len } => {
            let mut data = vec![0u8; len as usize];
            let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
                return (STATUS_IOERR, Vec::new());
            };
            match read_full(&image.file, &mut data, offset) {
                Ok(()) => (STATUS_OK, data),
                Err(e) => {
                    log_io_error(image, "read", &e);
                    (STATUS_IOERR, Vec::new())
                }
            }
        }
        BlockOp::Write { sector, data } => {
            if image.read_only {
                return (STATUS_IOERR, Vec::new());
            }
            let Some(offset) = sector.checked_mul(SECTOR_SIZE) else {
                return (STATUS_IOERR, Vec::new());
            };
            match image.file.write_all_at(&data, offset) {
                Ok(()) => (STATUS_OK, Vec::new()),
                Err(e) => {
                    log_io_error(image, "write", &e);
                    (STATUS_IOERR, Vec::new())
                }
            }
        }
        BlockOp::Flush => match image.file.sync_all() {
            Ok(()) => (STATUS_OK, Vec::new()),
            Err(e) => {
                log_io_error(image, "fsync", &e);
                (STATUS_IOERR, Vec::new())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_reads_writes_and_flushes_a_real_file_in_order() {
        let path = std::env::temp_dir().join(format!("tandem-blk-{}.img", std::process::id()));
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let queue = CauseQueue::new(Arc::new(|| {}));
        let image = DiskImage::open(&path, false).unwrap();
        assert_eq!(image.capacity_sectors, 8);
        let worker = BlockWorker::start(3, image, queue.clone()).unwrap();
        worker.submit(
            1,
            BlockOp::Write {
                sector: 1,
                data: vec![9; 512],
            },
        );
        worker.submit(2, BlockOp::Flush);
        worker.submit(
            3,
            BlockOp::Read {
                sector: 0,
                len: 1024,
            },
        );
        drop(worker); // joins: all three are done
        let mut done = Vec::new();
        queue.drain_into(&mut done);
        assert_eq!(done.len(), 3);
        let Cause::BlockDone {
            device,
            request,
            status,
            data,
        } = &done[2]
        else {
            panic!("{done:?}")
        };
        assert_eq!((*device, *request, *status), (3, 3, STATUS_OK));
        assert_eq!(&data[..512], &[7u8; 512][..]);
        assert_eq!(&data[512..], &[9u8; 512][..]);
        assert_eq!(std::fs::read(&path).unwrap()[512..1024], [9u8; 512]);
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn read_only_images_refuse_writes_and_missing_images_are_named() {
        let path = std::env::temp_dir().join(format!("tandem-blk-ro-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 1024]).unwrap();
        let image = DiskImage::open(&path, true).unwrap();
        assert_eq!(
            perform(
                &image,
                BlockOp::Write {
                    sector: 0,
                    data: vec![1; 512]
                }
            )
            .0,
            STATUS_IOERR
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 1024]);
        let err = DiskImage::open(Path::new("/nonexistent.img"), false)
            .err()
            .unwrap();
        assert!(
            err.to_string().starts_with("disk image /nonexistent.img:"),
            "{err}"
        );
        let _ = std::fs::remove_file(path);
    }
}
