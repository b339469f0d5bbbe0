//! Arbitration: who may run a VM live.
//!
//! Running the guest live requires a **generation** per VM, won by
//! compare-and-set: `claim(vm, expected: g, holder)` is granted only if the
//! VM's current generation is exactly `g`; the generation then becomes `g + 1`
//! with that holder. The generation is the fencing token: it travels in every
//! replication frame and ack, and anything older is rejected. A VM that was
//! never claimed has generation 0 and no holder.
//!
//! Two implementations sit behind the [`Arbiter`] trait:
//!
//! * [`TcpArbiter`], the client of `tandem witness` ([`WitnessServer`]), a small
//!   process on a third host that keeps `vm -> (generation, holder)` and
//!   persists (and fsyncs) every grant before it answers;
//! * [`FileArbiter`], for a directory on shared storage: generation `g + 1` is
//!   won by creating `DIR/<vm>/gen-<g+1>` with `O_CREAT|O_EXCL`. Never a lock:
//!   a frozen holder would keep a lock forever.
//!
//! Neither implementation ever grants the same generation twice, not even
//! across a crash or restart of the witness. Neither retries a claim on its
//! own: when a claim fails with an error (not a refusal), its outcome is
//! unknown (the witness may have granted it and the reply been lost), so the
//! caller must [`Arbiter::query`] before it acts on the generation.

// Until the pair/failover code calls the clients, only `tandem witness` uses
// this module in the binary.
#![allow(dead_code, unused_imports)]

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use crate::auth::Psk;

mod etcd;
mod file;
mod witness;

pub use etcd::watch::PrefixView;
pub use etcd::{EtcdArbiter, EtcdClient, KeepAlive, DEFAULT_LEASE_TTL};
pub use file::FileArbiter;
pub use witness::{TcpArbiter, WitnessHandle, WitnessServer};

pub use tandem_config::names::{is_valid_name, MAX_NAME_LEN};

/// Longest protocol line the witness accepts, newline included.
pub const MAX_LINE_LEN: usize = 1024;

/// What an arbiter knows about one VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The current generation: 0 if the VM was never claimed.
    pub generation: u64,
    /// Who won `generation`; `None` if the VM was never claimed (or, for a
    /// file arbiter, if the winner crashed before it wrote its name).
    pub holder: Option<String>,
}

impl Grant {
    /// The state of a VM that was never claimed.
    pub const fn unclaimed() -> Self {
        Grant {
            generation: 0,
            holder: None,
        }
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.holder {
            Some(h) => write!(f, "generation {} held by {h}", self.generation),
            None => write!(f, "generation {} (no holder)", self.generation),
        }
    }
}

/// The answer to a claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The claim won: this is the new generation (`expected + 1`).
    Granted(u64),
    /// The VM's generation was not `expected`: this is what it is now.
    Refused(Grant),
}

/// An arbiter failed to answer. A refused claim is not an error.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterError {
    /// A VM or holder name breaks the naming rule.
    #[error(
        "invalid {what} name {name:?}: 1 to 64 characters of [A-Za-z0-9._-], starting with a letter or digit"
    )]
    InvalidName {
        /// `vm` or `holder`.
        what: &'static str,
        /// The offending name.
        name: String,
    },
    /// `expected` is the largest generation; there is no next one.
    #[error("generation {0} is the last one; the VM cannot be claimed again")]
    GenerationExhausted(u64),
    /// The witness could not be reached at all.
    #[error("witness {addr} unreachable: {reason}")]
    Unreachable {
        /// The witness address.
        addr: SocketAddr,
        /// Why, e.g. `connection refused`, `timed out after 2s`.
        reason: String,
    },
    /// The connection broke (or timed out) after the request may have been
    /// sent: for a claim, its outcome is unknown.
    #[error("witness {addr}: {op} failed: {reason}")]
    Connection {
        /// The witness address.
        addr: SocketAddr,
        /// What was being done: `sending the request`, `reading the reply`.
        op: &'static str,
        /// Why.
        reason: String,
    },
    /// The witness answered something that is not the protocol.
    #[error("witness {addr} sent a malformed reply: {reply:?}")]
    BadReply {
        /// The witness address.
        addr: SocketAddr,
        /// The reply (truncated).
        reply: String,
    },
    /// The witness or this client failed the other's authentication (no
    /// key, another key, or a reply that was tampered with).
    #[error("witness {addr}: authentication failed: {reason}")]
    Auth {
        /// The witness address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The witness answered `ERROR <reason>`.
    #[error("witness {addr} refused to answer: {reason}")]
    Remote {
        /// The witness address.
        addr: SocketAddr,
        /// Its reason.
        reason: String,
    },
    /// The witness could not listen.
    #[error("witness: cannot listen on {addr}: {source}")]
    Bind {
        /// The listen address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The witness state file exists but is not a valid state file. The
    /// witness never starts over from generation 0 on its own: that could
    /// grant a generation twice.
    #[error("witness state file {path} is corrupt: {reason} (restore it from a backup; starting over from empty could grant a generation twice)")]
    CorruptState {
        /// The state file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Another witness process uses this state file.
    #[error("witness state file {path} is in use by another witness (lock file {lock} is held)")]
    StateLocked {
        /// The state file.
        path: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// A file-system operation failed (witness state, file arbiter).
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done, e.g. `cannot create`.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// etcd could not be reached, refused this client, or failed a request.
    #[error("etcd {endpoints}: {reason}")]
    Etcd {
        /// The endpoints, as `https://IP:PORT,...`.
        endpoints: String,
        /// What failed and why, e.g. `unreachable: connection refused`,
        /// `authentication failed: wrong user or password`.
        reason: String,
    },
    /// The arbiter refused or dropped this side's lease.
    #[error("lease refused: {0}")]
    LeaseRefused(String),
    /// A file arbiter directory holds something it did not write.
    #[error("file arbiter {path}: {reason}")]
    CorruptDir {
        /// The offending path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl ArbiterError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        ArbiterError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// An arbiter: a compare-and-set register of `(generation, holder)` per VM.
pub trait Arbiter: Send + Sync {
    /// The VM's current generation and holder (generation 0, no holder, if
    /// it was never claimed).
    fn query(&self, vm: &str) -> Result<Grant, ArbiterError>;

    /// Wins generation `expected + 1` for `holder` if the VM's generation is
    /// exactly `expected`; otherwise refuses with the current state.
    ///
    /// On `Err` the outcome is unknown: query before acting.
    fn claim(&self, vm: &str, expected: u64, holder: &str) -> Result<ClaimOutcome, ArbiterError>;

    /// Takes or renews the lease that lets `holder`, live as `generation`,
    /// release output: Ok(Some(ttl)) means it holds for `ttl` from before
    /// this call; Ok(None) means this arbiter has no leases (the witness, a
    /// directory), so the generation alone decides. An error means the
    /// lease was not renewed (unreachable, expired, or the generation is
    /// someone else's now).
    fn hold(
        &self,
        _vm: &str,
        _generation: u64,
        _holder: &str,
    ) -> Result<Option<Duration>, ArbiterError> {
        Ok(None)
    }
}

/// A client of the `tandem witness` at `addr`; every request connects anew,
/// and connecting, sending and reading each wait at most `timeout`.
pub fn tcp(addr: SocketAddr, timeout: Duration) -> TcpArbiter {
    TcpArbiter::new(addr, timeout)
}

/// An arbiter on the etcd members `endpoints`, keys under `prefix`
/// (`etcd://HOST:PORT,.../PREFIX`); the live side's lease lasts
/// `lease_ttl` (whole seconds, at least etcd's minimum).
pub fn etcd(
    endpoints: &[SocketAddr],
    prefix: &str,
    access: &tandem_config::EtcdAccess,
    timeout: Duration,
    lease_ttl: Duration,
) -> Result<EtcdArbiter, ArbiterError> {
    Ok(EtcdArbiter::connect(endpoints, prefix, access, timeout)?.with_lease_ttl(lease_ttl))
}

/// An arbiter on the shared directory `dir` (`file:DIR`).
pub fn file(dir: &Path) -> FileArbiter {
    FileArbiter::new(dir)
}

/// Opens the witness state (`state`, created if missing), listens on
/// `listen`, and serves forever.
pub fn serve(listen: SocketAddr, state: &Path) -> Result<(), ArbiterError> {
    bind(listen, state)?.run()
}

/// Opens the witness state (`state`, created if missing) and listens on
/// `listen` (port 0 picks one: see [`WitnessServer::local_addr`]); serve
/// with [`WitnessServer::run`] or [`WitnessServer::spawn`].
pub fn bind(listen: SocketAddr, state: &Path) -> Result<WitnessServer, ArbiterError> {
    WitnessServer::bind(listen, state)
}

/// Checks a VM or holder name: 1 to [`MAX_NAME_LEN`] characters of
/// `[A-Za-z0-9._-]`, the first a letter or digit (so no `.`, `..` or `-`,
/// which are a path or the protocol's "no holder").
pub fn validate_name(what: &'static str, name: &str) -> Result<(), ArbiterError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(ArbiterError::InvalidName {
            what,
            name: name.chars().take(2 * MAX_NAME_LEN).collect(),
        })
    }
}

/// Options of `tandem witness`.
#[derive(clap::Args, Debug)]
pub struct WitnessArgs {
    /// Address to listen on, e.g. `0.0.0.0:7500`.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The state file: every grant is written and fsynced here before it is
    /// answered. Created if missing; a corrupt one stops the witness.
    #[arg(long, value_name = "FILE")]
    pub state: PathBuf,
    /// A key clients may prove they hold: a pair's witness key (`tandem
    /// keygen --witness-key-for PAIR_FILE FILE`) or the witness's own key
    /// that its pairs name as `[ft] witness_key_file`. Give it once per key.
    #[arg(long, value_name = "FILE")]
    pub psk_file: Vec<PathBuf>,
    /// Serve without a key: any client may claim generations.
    #[arg(long)]
    pub insecure: bool,
}

/// `tandem witness`: serves until killed. Prints `listening on ADDR` on
/// stdout once it accepts connections; exit status 3 if it cannot start.
pub fn witness_command(args: WitnessArgs) -> ExitCode {
    let mut keys = Vec::new();
    for path in &args.psk_file {
        match crate::auth::Psk::load(path) {
            Ok(k) => keys.push(std::sync::Arc::new(k)),
            Err(e) => {
                eprintln!("tandem witness: --psk-file: {e}");
                return ExitCode::from(crate::exit::EXIT_START_FAILED);
            }
        }
    }
    if keys.is_empty() && args.insecure {
        eprintln!("tandem witness: WARNING: no key: any client may claim generations (--insecure)");
    } else if keys.is_empty() {
        eprintln!("tandem witness: no --psk-file given, so anyone who reaches it could claim a VM; give each pair's witness key (`tandem keygen --witness-key-for PAIR_FILE FILE`) or pass --insecure");
        return ExitCode::from(crate::exit::EXIT_START_FAILED);
    }
    let server = match bind(args.listen, &args.state) {
        Ok(s) => s.with_keys(keys),
        Err(e) => {
            eprintln!("tandem witness: {e}");
            return ExitCode::from(crate::exit::EXIT_START_FAILED);
        }
    };
    println!("listening on {}", server.local_addr());
    // Best effort: the line is for scripts and tests waiting for the port.
    let _ = io::Write::flush(&mut io::stdout());
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem witness: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Maps an I/O error to a short lowercase reason: `connection refused`,
/// `timed out after 2s`, ...
pub(crate) fn describe_io(e: &io::Error, timeout: Duration) -> String {
    use io::ErrorKind::*;
    match e.kind() {
        WouldBlock | TimedOut => format!("timed out after {timeout:?}"),
        ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe
        | AddrNotAvailable | UnexpectedEof => e.kind().to_string(),
        _ => match e.raw_os_error() {
            Some(libc::EHOSTUNREACH) => "no route to host".into(),
            Some(libc::ENETUNREACH) => "network unreachable".into(),
            _ => e.to_string(),
        },
    }
}

/// A pair's key and arbiter (None: `--insecure`, `--i-accept-split-brain`).
pub type KeyAndArbiter = (
    Option<std::sync::Arc<crate::auth::Psk>>,
    Option<std::sync::Arc<dyn Arbiter>>,
);

/// The pair's key and arbiter, as its file says; refuses a pair with no
/// key (unless `insecure`) or no witness (unless `split_brain`).
pub fn open(
    cfg: &tandem_config::PairConfig,
    path: &std::path::Path,
    insecure: bool,
    split_brain: bool,
) -> anyhow::Result<KeyAndArbiter> {
    let base = match &cfg.ft.psk_file {
        Some(key) => Some(
            crate::auth::Psk::load(key)
                .map_err(|e| anyhow::anyhow!("{}: [ft] psk_file: {e}", path.display()))?,
        ),
        None if insecure => None,
        None => anyhow::bail!(
            "{}: no [ft] psk_file is configured, so anyone who reaches the replication port could feed this host a VM; make a key with `tandem keygen FILE`, set psk_file on both hosts, or pass --insecure",
            path.display()
        ),
    };
    let (psk, witness_key) = keys(cfg, path, base.as_ref())?;
    let arbiter: Option<std::sync::Arc<dyn Arbiter>> = match &cfg.ft.witness {
        Some(tandem_config::Witness::Tcp(addr)) => Some(std::sync::Arc::new(
            tcp(*addr, Duration::from_secs(2)).with_psk(witness_key),
        )),
        Some(tandem_config::Witness::File(dir)) => Some(std::sync::Arc::new(file(dir))),
        // The live side's lease: two failover timeouts, at least 4 s, so
        // it outlasts an etcd leader election (a member lost).
        Some(tandem_config::Witness::Etcd { endpoints, prefix }) => Some(std::sync::Arc::new(
            etcd(
                endpoints,
                prefix,
                &cfg.ft.etcd,
                Duration::from_secs(2),
                (cfg.ft.failover_timeout * 2).max(DEFAULT_LEASE_TTL),
            )
            .map_err(|e| anyhow::anyhow!("{}: [ft] witness: {e}", path.display()))?,
        )),
        None if split_brain => None,
        None => anyhow::bail!(
            "{}: no [ft] witness is configured, so both hosts could go live at once; configure one or pass --i-accept-split-brain",
            path.display()
        ),
    };
    Ok((psk, arbiter))
}

type SharedKey = std::sync::Arc<Psk>;

/// The pair's keys, each for one purpose, from its key file `base`: the
/// replication key (this VM, these two hosts, encrypted or not) and the key
/// it proves itself with at its witness (`[ft] witness_key_file`, or one
/// derived for this VM).
fn keys(
    cfg: &tandem_config::PairConfig,
    path: &std::path::Path,
    base: Option<&crate::auth::Psk>,
) -> anyhow::Result<(Option<SharedKey>, Option<SharedKey>)> {
    use tandem_config::HostId;
    let Some(base) = base else {
        return Ok((None, None));
    };
    // The host names, not their addresses: behind NAT or a proxy the two
    // hosts' files may name different addresses for the same host.
    let replication = base.for_replication(
        &cfg.vm.name,
        [HostId::A.name(), HostId::B.name()],
        cfg.ft.encrypt,
    );
    let witness = match &cfg.ft.witness_key_file {
        Some(file) => Psk::load(file)
            .map_err(|e| anyhow::anyhow!("{}: [ft] witness_key_file: {e}", path.display()))?,
        None => base.for_witness(&cfg.vm.name),
    };
    Ok((
        Some(std::sync::Arc::new(replication)),
        Some(std::sync::Arc::new(witness)),
    ))
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "tandem-arbiter-{tag}-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["vm1", "a", "web-01.prod_x", "0", &"x".repeat(64)] {
            assert!(validate_name("vm", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-",
            ".",
            "..",
            "-x",
            ".hidden",
            "a b",
            "a/b",
            "a\nb",
            "é",
            &"x".repeat(65),
        ] {
            assert!(validate_name("vm", bad).is_err(), "{bad:?}");
        }
        let e = validate_name("holder", "a b").unwrap_err().to_string();
        assert!(e.contains("invalid holder name \"a b\""), "{e}");
    }

    #[test]
    fn describe() {
        let e = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            describe_io(&e, Duration::from_secs(1)),
            "connection refused"
        );
        let e = io::Error::from(io::ErrorKind::WouldBlock);
        assert_eq!(
            describe_io(&e, Duration::from_secs(2)),
            "timed out after 2s"
        );
    }
}
