//! Where a pair host stands, answered on its control socket, and what it
//! does when fenced or asked to shut down.
//!
//! Each side serves a unix control socket (`[hosts] x.control`, default
//! `state_dir/<host>.ctl`): a client connects and reads one JSON line with
//! the side's role, generation, peer state and figures. A client that
//! writes a command line first (`switchover`) gets that command's one-line
//! answer instead; a status client shuts its writing side at once (one that
//! does not is answered after 200 ms). A fenced side stops
//! its VM (taps and disks closed) but keeps answering `role=fenced` with its
//! reason until it is terminated; it then exits with status 124.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tandem_vmm::vm::VmStopper;

/// Figures a side publishes; every field is optional until set.
#[derive(Default)]
struct Board {
    role: String,
    generation: u64,
    peer: String,
    fenced: Option<String>,
}

type Probe = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A control command's handler: its one-line answer.
pub type Command = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// A side's status, shared by its threads.
#[derive(Default)]
pub struct StatusBoard {
    board: Mutex<Board>,
    probes: Mutex<Vec<(&'static str, Probe)>>,
    commands: Mutex<Vec<(&'static str, Command)>>,
}

fn json_escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

impl StatusBoard {
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets role, generation and peer state.
    pub fn set(&self, role: &str, generation: u64, peer: &str) {
        let mut b = self.board();
        if b.fenced.is_none() {
            b.role = role.to_string();
        }
        b.generation = generation;
        b.peer = peer.to_string();
    }

    /// Adds a live figure (read when someone asks).
    pub fn probe(&self, name: &'static str, f: Probe) {
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, f));
    }

    /// Adds a command clients may send on the control socket.
    pub fn command(&self, name: &'static str, f: Command) {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, f));
    }

    /// One client: a command line, or (nothing written) the status.
    fn answer(&self, mut client: UnixStream) {
        use std::io::BufRead;
        let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
        let mut line = String::new();
        if let Ok(reader) = client.try_clone() {
            let _ = std::io::BufReader::new(reader).read_line(&mut line);
        }
        let name = line.trim();
        if name.is_empty() {
            let _ = writeln!(client, "{}", self.render());
            return;
        }
        let handler = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| f.clone());
        let reply = match handler {
            Some(f) => match f() {
                Ok(text) => format!("ok: {text}"),
                Err(text) => format!("error: {text}"),
            },
            None => format!("error: unknown command {name:?} (this side knows: status)"),
        };
        let _ = writeln!(client, "{reply}");
    }

    /// This side fenced itself.
    pub fn fenced(&self, reason: &str) {
        let mut b = self.board();
        b.role = "fenced".into();
        b.fenced = Some(reason.to_string());
    }

    /// Has this side fenced itself?
    pub fn is_fenced(&self) -> bool {
        self.board().fenced.is_some()
    }

    /// One JSON object.
    pub fn render(&self) -> String {
        let b = self.board();
        let mut out = format!(
            "{{\"role\":\"{}\",\"generation\":{},\"peer\":\"{}\"",
            json_escape(&b.role),
            b.generation,
            json_escape(&b.peer)
        );
        if let Some(reason) = &b.fenced {
            out.push_str(&format!(",\"reason\":\"{}\"", json_escape(reason)));
        }
        drop(b);
        for (name, f) in self.probes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&format!(",\"{name}\":{}", f()));
        }
        out.push('}');
        out
    }

    /// Serves `path` in the background: each client gets one JSON line.
    pub fn serve(self: &Arc<Self>, path: &Path) -> std::io::Result<()> {
        if path.exists() {
            std::fs::remove_file(path)?;
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let listener = UnixListener::bind(path)?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("tandem-control".into())
            .spawn(move || {
                for client in listener.incoming().flatten() {
                    let me = me.clone();
                    let _ = std::thread::Builder::new()
                        .name("tandem-control-client".into())
                        .spawn(move || me.answer(client));
                }
            })?;
        Ok(())
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
static TERM: AtomicBool = AtomicBool::new(false);

/// Registers this process's side (once its VM exists).
pub fn register(side: Side) {
    let _ = SIDE.set(side);
}

/// The exit status of a side that fenced itself.
pub const EXIT_FENCED: u8 = 124;

/// Fences this side: stops the VM (nothing more leaves it), answers
/// `role=fenced` on the control socket until terminated. Before the VM
/// exists, exits at once.
pub fn fence(reason: &str) -> ! {
    eprintln!("tandem: fenced: {reason}");
    match SIDE.get() {
        Some(side) => {
            side.board.fenced(reason);
            side.stopper.stop();
            loop {
                std::thread::park();
            }
        }
        None => std::process::exit(i32::from(EXIT_FENCED)),
    }
}

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::Release);
}

/// SIGTERM: a clean shutdown of this side (a fenced side exits 124).
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
                Some(side) if side.board.is_fenced() => std::process::exit(i32::from(EXIT_FENCED)),
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

/// After the VM stopped: a fenced side keeps answering until terminated.
pub fn linger_if_fenced() {
    if SIDE.get().is_some_and(|s| s.board.is_fenced()) {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// A probe for "milliseconds since `last` (ms since `base`)".
pub fn age_probe(base: Instant, last: Arc<AtomicU64>) -> Probe {
    Arc::new(move || {
        u64::try_from(base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_sub(last.load(Ordering::Acquire))
    })
}

/// Reads a side's status from its control socket.
pub fn query(path: &Path) -> Result<String, String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("no answer on {}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    // Nothing to ask beyond the status: say so at once.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text.trim().to_string())
}

/// Sends `command` on a side's control socket and returns its answer
/// (waiting up to `limit`).
pub fn send_command(path: &Path, command: &str, limit: Duration) -> Result<String, String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("no answer on {}: {e}", path.display()))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    writeln!(s, "{command}").map_err(|e| e.to_string())?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text.trim().to_string())
}

/// The control socket of a host.
pub fn control_path(explicit: Option<&Path>, state_dir: &Path, host: &str) -> PathBuf {
    explicit.map_or_else(|| state_dir.join(format!("{host}.ctl")), Path::to_path_buf)
}
