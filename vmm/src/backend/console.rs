//! The console writer: serial output leaves the vCPU thread through a channel
//! so a slow terminal or file never stalls the guest.

use std::io::Write;
use std::sync::mpsc::{channel, sync_channel, Sender, SyncSender};
use std::thread::JoinHandle;

/// What the writer thread is asked to do.
enum Job {
    Write(Vec<u8>),
    /// Answer once everything queued before has been written.
    Flush(SyncSender<()>),
}

/// A thread writing console bytes to a sink, flushing after each batch.
pub struct Console {
    tx: Option<Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// Starts the writer thread over `sink`.
    pub fn start(mut sink: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let (tx, rx) = channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("tandem-console".into())
            .spawn(move || {
                let mut failed = false;
                while let Ok(job) = rx.recv() {
                    let mut bytes = match job {
                        Job::Write(bytes) => bytes,
                        Job::Flush(done) => {
                            let _ = done.send(());
                            continue;
                        }
                    };
                    // Batch whatever else is already queued, up to a flush
                    // request (answered once the batch is out).
                    let mut flushed = None;
                    while let Ok(more) = rx.try_recv() {
                        match more {
                            Job::Write(more) => bytes.extend(more),
                            Job::Flush(done) => {
                                flushed = Some(done);
                                break;
                            }
                        }
                    }
                    let result = sink.write_all(&bytes).and_then(|()| sink.flush());
                    if let Err(e) = result {
                        if !failed {
                            tracing::warn!(
                                "console output failed (further errors not logged): {e}"
                            );
                            failed = true;
                        }
                    }
                    if let Some(done) = flushed {
                        let _ = done.send(());
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues bytes for the sink.
    pub fn write(&self, bytes: Vec<u8>) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Write(bytes));
        }
    }

    /// Blocks until every byte queued so far has been written to the sink.
    pub fn flush(&self) {
        if let Some(tx) = &self.tx {
            let (done, written) = sync_channel(1);
            if tx.send(Job::Flush(done)).is_ok() {
                let _ = written.recv();
            }
        }
    }

    /// Writes out everything queued and stops the thread.
    pub fn finish(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.finish();
    }
}
