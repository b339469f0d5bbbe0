//! The console of a pair: a unix socket served by whichever side is live
//! (`[vm] console = "unix:PATH"`). Console output goes to every connected
//! client (a client that cannot keep up is dropped, never waited for);
//! what clients type becomes serial input for the guest. Clients reconnect
//! after a failover: the new live side serves the same path.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use tandem_replay::{Cause, CauseQueue};
use tracing::warn;

use super::local_socket::Access;

/// The console sink and its clients.
#[derive(Clone, Default)]
pub struct ConsoleSocket {
    clients: Arc<Mutex<Vec<UnixStream>>>,
    input: Arc<OnceLock<CauseQueue>>,
    /// The last bytes of output, shown to a client when it connects.
    history: Arc<Mutex<std::collections::VecDeque<u8>>>,
}

/// Output kept for clients that connect later.
const HISTORY: usize = 4096;

impl ConsoleSocket {
    /// A console with no clients yet; [`serve`](Self::serve) starts
    /// accepting.
    pub fn new() -> Self {
        Self::default()
    }

    /// Where typed input goes (the VM's cause queue).
    pub fn set_input(&self, queue: CauseQueue) {
        let _ = self.input.set(queue);
    }

    /// Binds `path` (replacing a stale socket) and accepts the clients
    /// `access` lets in, in the background: the console shows what is
    /// typed there (passwords) and types into the guest.
    pub fn serve(&self, path: &Path, access: Access) -> std::io::Result<()> {
        let listener = access.bind(path)?;
        let me = self.clone();
        let shown = PathBuf::from(path);
        std::thread::Builder::new()
            .name("tandem-console-socket".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    match stream {
                        Ok(mut s) => {
                            if let Err(why) = access.check(&s) {
                                warn!("console socket {}: {why}", shown.display());
                                let _ = writeln!(s, "tandem: {why}");
                                continue;
                            }
                            me.add(s)
                        }
                        Err(e) => {
                            warn!("console socket {}: {e}", shown.display());
                            return;
                        }
                    }
                }
            })?;
        Ok(())
    }

    fn add(&self, stream: UnixStream) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        if let Ok(mut reader) = stream.try_clone() {
            let input = self.input.clone();
            let spawned = std::thread::Builder::new()
                .name("tandem-console-client".into())
                .spawn(move || {
                    let _ = reader.set_nonblocking(false);
                    let mut buf = [0u8; 256];
                    loop {
                        match reader.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if let Some(q) = input.get() {
                                    q.push(Cause::SerialInput(buf[..n].to_vec()));
                                }
                            }
                        }
                    }
                });
            if spawned.is_err() {
                return;
            }
        }
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let history: Vec<u8> = self
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        let mut stream = stream;
        if stream.write_all(&history).is_ok() {
            clients.push(stream);
        }
    }
}

impl Write for ConsoleSocket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            history.extend(buf);
            let excess = history.len().saturating_sub(HISTORY);
            history.drain(..excess);
        }
        // A client whose buffer is full (or that left) is dropped.
        clients.retain_mut(|c| c.write_all(buf).is_ok());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
