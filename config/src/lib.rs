//! The pair file: one TOML file, used unchanged on both hosts of a
//! fault-tolerant pair (`docs/pair-config.md` documents every key).
//!
//! clap → serde → `validate()` → typed runtime values (STYLE.md §6). serde
//! reads `raw` structs whose fields are all optional and carry their byte
//! span (`#[serde(deny_unknown_fields)]` on every one, so a typo is an
//! error); `validate` applies the defaults and turns strings into addresses,
//! sizes, MACs, durations and enums. Every error names the file, the line and
//! the key: `pair.toml:12: [ft] failover_timeout_ms = 100 must be more than
//! twice heartbeat_ms (100)`. Whether the kernel and disks exist is checked
//! by the caller, not here.
//!
//! Roles (primary, secondary) are not in the file: they come from the
//! arbiter. The file only says which two hosts form the pair; a process finds
//! out which one it is with [`which_host`].

pub mod cluster;
mod error;
mod host;
mod mac;
pub mod names;
mod raw;
pub mod size;
#[cfg(test)]
mod tests;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_vmm::{DiskConfig, NetConfig};

pub use error::ConfigError;
use error::Ctx;
#[allow(unused_imports)] // until main.rs calls them
pub use host::{local_addresses, which_host, HostId};
pub use mac::parse_mac;
pub use names::group_id;
use raw::RawFile;

/// `[vm] mem` when not given.
pub const DEFAULT_MEM: u64 = 64 << 20;
/// `[ft] heartbeat_ms` when not given.
pub const DEFAULT_HEARTBEAT_MS: u64 = 100;
/// `[ft] failover_timeout_ms` when not given.
pub const DEFAULT_FAILOVER_TIMEOUT_MS: u64 = 2000;
/// `[ft] max_unacked_bytes` when not given.
pub const DEFAULT_MAX_UNACKED_BYTES: u64 = 64 << 20;
/// The smallest `[ft] max_unacked_bytes` accepted.
pub const MIN_MAX_UNACKED_BYTES: u64 = 1 << 20;
/// `[ft] max_lag_ms` when not given.
pub const DEFAULT_MAX_LAG_MS: u64 = 500;
/// `[ft] max_replay_lag_ms` when not given: the default failover timeout,
/// so a failover's catch-up takes at most about as long as its detection.
pub const DEFAULT_MAX_REPLAY_LAG_MS: u64 = 2000;
/// `[ft] announce_*` when not given: QEMU's announce-self defaults.
pub const DEFAULT_ANNOUNCE: Announce = Announce {
    rounds: 5,
    initial: Duration::from_millis(50),
    step: Duration::from_millis(100),
    max: Duration::from_millis(550),
};
/// Where `[ft] state_dir` lives when not given: `<this>/<vm name>`.
pub const DEFAULT_STATE_ROOT: &str = "/var/lib/tandem";
/// The guest MAC of NIC 0 when `[vm] net` gives none; NIC i adds i to the
/// last byte, as `tandem run` does.
pub const DEFAULT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Longest tap name Linux accepts (IFNAMSIZ - 1).
const MAX_TAP_NAME: usize = 15;

/// A validated pair file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairConfig {
    /// `[vm]`: the guest, identical on both hosts.
    pub vm: VmConfigSection,
    /// `[hosts]`: `a` then `b`; index with [`HostId::index`] or use [`PairConfig::host`].
    pub hosts: [HostEntry; 2],
    /// `[ft]`: failure detection, output commit, arbitration, pacing, announce.
    pub ft: FtConfig,
}

impl PairConfig {
    /// One host's entry.
    pub fn host(&self, id: HostId) -> &HostEntry {
        &self.hosts[id.index()]
    }

    /// The virtio-blk disks as host `id` opens them: its own replicas with
    /// mirrored storage (`[hosts] X.disk`, else the `[vm] disk` paths).
    pub fn disk_configs(&self, id: HostId) -> Vec<DiskConfig> {
        match &self.host(id).disks {
            Some(paths) => self
                .vm
                .disks
                .iter()
                .zip(paths)
                .map(|(d, path)| DiskConfig {
                    path: path.clone(),
                    read_only: d.read_only,
                })
                .collect(),
            None => self.vm.disks.clone(),
        }
    }

    /// The virtio-net devices as host `id` builds them: each NIC of `[vm]
    /// net` on that host's tap of the same position.
    pub fn net_configs(&self, id: HostId) -> Vec<NetConfig> {
        self.vm
            .nics
            .iter()
            .zip(&self.host(id).taps)
            .map(|(nic, tap)| NetConfig {
                tap: tap.clone(),
                mac: Some(nic.mac),
            })
            .collect()
    }
}

/// `[vm]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfigSection {
    /// The VM's identity for the arbiter and the default state_dir.
    pub name: String,
    /// Kernel image (existence is the caller's to check).
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem: u64,
    /// virtio-blk disks, in order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net devices, in order; the taps are per host.
    pub nics: Vec<Nic>,
    /// Unix socket the live side serves the console on.
    pub console: Option<PathBuf>,
    /// Pinned device-model version (None: the newest this build runs).
    pub device_model: Option<u32>,
}

/// One entry of `[vm] net`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nic {
    /// Guest MAC: the VM's network identity, announced at failover.
    pub mac: [u8; 6],
}

/// One host of `[hosts]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostEntry {
    /// Where the peer reaches this host's replication channel.
    pub address: SocketAddr,
    /// One tap per `[vm] net` entry, same order.
    pub taps: Vec<String>,
    /// Unix socket for `tandem status` and control requests.
    pub control: Option<PathBuf>,
    /// Mirrored storage: this host's replica of each `[vm] disk`, same
    /// order (None: the `[vm] disk` paths, each host's own file).
    pub disks: Option<Vec<PathBuf>>,
}

/// `[ft]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FtConfig {
    /// How often each side sends a heartbeat.
    pub heartbeat: Duration,
    /// Silence after which the peer is taken for dead.
    pub failover_timeout: Duration,
    /// When the primary releases output.
    pub output_commit: OutputCommit,
    /// How the disks are shared.
    pub storage: Storage,
    /// The arbiter; None means the pair needs `--i-accept-split-brain`.
    pub witness: Option<Witness>,
    /// This host's replica sidecars, bitmaps and event journal.
    pub state_dir: PathBuf,
    /// Shell command (STONITH) run before going live.
    pub fence_command: Option<String>,
    /// Shell command the live side runs to start a fresh secondary after
    /// losing one.
    pub respawn: Option<String>,
    /// Cap of the primary's in-memory log of unacknowledged records, bytes.
    pub max_unacked_bytes: u64,
    /// Secondary lag beyond which the primary slows its vCPU.
    pub max_lag: Duration,
    /// How far the secondary's replay may stay behind a shipped watermark
    /// before the primary slows its vCPU.
    pub max_replay_lag: Duration,
    /// Gratuitous ARP/RARP at go-live.
    pub announce: Announce,
    /// The pre-shared key of the replication channel and the witness (None:
    /// the hosts must be started with `--insecure`).
    pub psk_file: Option<PathBuf>,
    /// The key this pair proves itself with at its witness (None: the one
    /// derived from `psk_file` for this VM, `tandem keygen --witness-key-for`).
    pub witness_key_file: Option<PathBuf>,
    /// Encrypt the replication link (the default), or only authenticate it.
    pub encrypt: bool,
    /// The primary takes a secondary only from its peer's configured
    /// address (false: behind NAT, any address that holds the key).
    pub verify_peer_address: bool,
    /// The group (its id) whose members may use the control and console
    /// sockets besides their owner and root (None: nobody else).
    pub socket_group: Option<u32>,
    /// What a guest software crash does.
    pub on_guest_crash: tandem_vmm::CrashPolicy,
    /// TLS and authentication towards an etcd witness.
    pub etcd: EtcdAccess,
    /// The position counter the primary places kick stops with (`position`:
    /// `"none"`, the default, `"auto"` or `"kvm-insn-stat"`).
    pub position: tandem_vmm::position::PositionChoice,
    /// How long the primary lets a timer or device interrupt wait for an
    /// exit of the guest's own before a kick (`irq_defer_us`, default 0).
    pub irq_defer: Duration,
}

/// How tandem reaches etcd (`[ft]` of a pair file, `[cluster]` of a cluster
/// file): TLS with a client certificate, and etcd's own user and password.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdAccess {
    /// The CA that signed etcd's server certificates (`etcd_ca`): TLS on.
    pub ca: Option<PathBuf>,
    /// This host's client certificate and its private key (`etcd_cert`,
    /// `etcd_key`), for etcd's `--client-cert-auth`.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// etcd's own authentication: the user and the file holding its
    /// password (`etcd_user`, `etcd_password_file`).
    pub user: Option<(String, PathBuf)>,
}

impl EtcdAccess {
    /// Whether the client speaks TLS.
    pub fn tls(&self) -> bool {
        self.ca.is_some()
    }
}

/// When the primary may release an output (network frame, console byte).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputCommit {
    /// Once the secondary has acknowledged receiving the log that produced it.
    #[default]
    Received,
    /// Once the secondary has replayed it and its epoch hash matched.
    Replayed,
}

/// Where the guest's disks live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Storage {
    /// One image both hosts reach; only the live side does I/O.
    #[default]
    Shared,
    /// Each host keeps its own replica; the secondary performs the guest's
    /// I/O on its replica at the logged completions.
    Mirrored,
}

/// The arbiter that grants generations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Witness {
    /// `tandem witness` at this address (`tcp://IP:PORT`).
    Tcp(SocketAddr),
    /// A directory on shared storage (`file:PATH`).
    File(PathBuf),
    /// An etcd cluster (`etcd://IP:PORT[,IP:PORT...]/PREFIX`).
    Etcd {
        /// The members' client addresses, tried in order.
        endpoints: Vec<SocketAddr>,
        /// The key prefix (starting with `/`).
        prefix: String,
    },
}

impl fmt::Display for Witness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Witness::Tcp(addr) => write!(f, "tcp://{addr}"),
            Witness::File(path) => write!(f, "file:{}", path.display()),
            Witness::Etcd { endpoints, prefix } => {
                let list: Vec<String> = endpoints.iter().map(|e| e.to_string()).collect();
                write!(f, "etcd://{}{prefix}", list.join(","))
            }
        }
    }
}

/// Gratuitous ARP/RARP rounds at go-live, as QEMU's announce-self.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announce {
    /// How many rounds.
    pub rounds: u32,
    /// Delay before the second round.
    pub initial: Duration,
    /// Added to the delay after each round.
    pub step: Duration,
    /// The delay never exceeds this.
    pub max: Duration,
}

impl Announce {
    /// The wait after round `round` (0-based) before the next one.
    pub fn delay_after(&self, round: u32) -> Duration {
        self.initial
            .saturating_add(self.step.saturating_mul(round))
            .min(self.max)
    }
}

/// Reads, parses and validates the pair file at `path`.
/// Parses an arbiter URL as `[ft] witness` takes it (`tcp://`, `file:`,
/// `etcd://`).
pub fn parse_witness(text: &str) -> Result<Witness, &'static str> {
    validate::parse_witness(text)
}

pub fn load(path: &Path) -> Result<PairConfig, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        file: file.clone(),
        error,
    })?;
    parse(&text, &file)
}

/// Parses and validates a pair file's `text`; `file_name` is used in error
/// messages and, by its stem, as the default VM name.
pub fn parse(text: &str, file_name: &str) -> Result<PairConfig, ConfigError> {
    let ctx = Ctx {
        file: file_name,
        text,
    };
    let raw: RawFile = toml::from_str(text).map_err(|e| ctx.toml_error(&e))?;
    let vm = raw.vm.ok_or_else(|| ctx.missing_section("vm"))?;
    let hosts = raw.hosts.ok_or_else(|| ctx.missing_section("hosts"))?;
    let vm = validate::validate_vm(&ctx, vm)?;
    let ft = validate::validate_ft(&ctx, raw.ft, &vm.name)?;
    let hosts = validate::validate_hosts(&ctx, hosts, &vm, ft.storage)?;
    Ok(PairConfig { vm, hosts, ft })
}
