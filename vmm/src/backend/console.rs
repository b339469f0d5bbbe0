//! The console writer: serial output leaves the vCPU thread through a channel
//! so a slow terminal or file never stalls the guest.

use std::io::Write;
use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

/// A thread writing console bytes to a sink, flushing after each batch.
pub struct Console {
    tx: Option<Sender<Vec<u8>>>,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// Starts the writer thread over `sink`.
    pub fn start(mut sink: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let (tx, rx) = channel::<Vec<u8>>();
        let thread = std::thread::Builder::new()
            .name("tandem-console".into())
            .spawn(move || {
                let mut failed = false;
                while let Ok(mut bytes) = rx.recv() {
                    // Batch whatever else is already queued.
                    while let Ok(more) = rx.try_recv() {
                        bytes.extend(more);
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
            let _ = tx.send(bytes);
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
