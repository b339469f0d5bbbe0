//! Active/active hosts (`tandem node`): several protected VMs over two
//! hosts, each VM primary on the host it prefers.
//!
//! A cluster file lists the VMs (each a pair file, as for `tandem pair`)
//! and the host each prefers:
//!
//! ```toml
//! [[vm]]
//! config = "web1.toml"   # relative to this file
//! prefer = "a"
//!
//! [[vm]]
//! config = "web2.toml"
//! prefer = "b"
//! ```
//!
//! `tandem node --config cluster.toml --host a` runs, for every VM, one
//! `tandem pair` process on this host and keeps it running: the arbiter
//! decides its role, so this host runs the primaries it prefers and the
//! secondaries of the others, and both replication links carry traffic. A
//! host that does not prefer a VM starts its side only once the VM is live
//! somewhere (or after a grace period, so a VM whose preferred host is down
//! still starts). When a `tandem pair` process ends — its VM failed over to
//! the other host, it was fenced, or it handed the VM over with `tandem
//! move` — the node starts it again and it re-joins as secondary. The VM
//! processes die with the node (as with a host crash). `tandem move VM
//! --config cluster.toml` hands a VM's primary role to the other host
//! without loss (a switch-over).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::side::{pause_after, run_side, wait_until_live};
use tandem_config::cluster::{load_cluster, Cluster, ClusterVm};
use tandem_config::HostId;

/// `tandem node` arguments.
#[derive(clap::Args)]
pub struct NodeArgs {
    /// The cluster file (the same on both hosts).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Which host this is (a or b; with a `[cluster]` section, any
    /// `[[host]]` name).
    #[arg(long, value_name = "NAME")]
    host: String,
    /// Passed to every `tandem pair` (pair files without a key).
    #[arg(long)]
    insecure: bool,
    /// Passed to every `tandem pair` (pair files without a witness).
    #[arg(long)]
    i_accept_split_brain: bool,
}

/// `tandem move` arguments.
#[derive(clap::Args)]
pub struct MoveArgs {
    /// The VM's name.
    vm: String,
    /// The cluster file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Where to move it (default: the other host).
    #[arg(long, value_name = "a|b")]
    to: Option<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

/// Runs `tandem node`.
pub fn node(args: NodeArgs) -> ExitCode {
    match run_node(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(crate::exit::EXIT_START_FAILED)
        }
    }
}

fn parse_host(text: &str) -> anyhow::Result<HostId> {
    match text {
        "a" => Ok(HostId::A),
        "b" => Ok(HostId::B),
        other => bail!("--host {other:?}: must be a or b"),
    }
}

fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let Cluster { vms, membership } = load_cluster(&args.config)?;
    if let Some(membership) = membership {
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: the handler only stores to an atomic.
            unsafe { libc::signal(sig, on_stop as *const () as libc::sighandler_t) };
        }
        let exe = std::env::current_exe().context("cannot find the tandem executable")?;
        let mut flags = Vec::new();
        if args.insecure {
            flags.push("--insecure".to_string());
        }
        if args.i_accept_split_brain {
            flags.push("--i-accept-split-brain".to_string());
        }
        return super::spare::run(&args.host, vms, membership, exe, flags, &STOP);
    }
    let me = parse_host(&args.host)?;
    // Each VM's arbiter, to know when a VM this host does not prefer is
    // live somewhere.
    let mut arbiters = Vec::new();
    for vm in &vms {
        let (_, arbiter) =
            super::arbiter::open(&vm.pair, &vm.path, args.insecure, args.i_accept_split_brain)?;
        arbiters.push(arbiter);
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_stop as *const () as libc::sighandler_t) };
    }
    let exe = std::env::current_exe().context("cannot find the tandem executable")?;
    let mut flags = Vec::new();
    if args.insecure {
        flags.push("--insecure");
    }
    if args.i_accept_split_brain {
        flags.push("--i-accept-split-brain");
    }
    eprintln!(
        "tandem: node {}: {} VM(s): {}",
        me.name(),
        vms.len(),
        vms.iter()
            .map(|v| format!(
                "{} ({})",
                v.pair.vm.name,
                if v.prefer == me {
                    "prefers this host"
                } else {
                    "prefers the other host"
                }
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut threads = Vec::new();
    for (vm, arbiter) in vms.into_iter().zip(arbiters) {
        let exe = exe.clone();
        let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        threads.push(
            std::thread::Builder::new()
                .name(format!("node-{}", vm.pair.vm.name))
                .spawn(move || supervise(&exe, me, &vm, arbiter.as_deref(), &flags))?,
        );
    }
    for t in threads {
        let _ = t.join();
    }
    eprintln!("tandem: node {}: stopped", me.name());
    Ok(())
}

/// Keeps this host's `tandem pair` of one VM running until the node stops.
fn supervise(
    exe: &Path,
    me: HostId,
    vm: &ClusterVm,
    arbiter: Option<&dyn super::arbiter::Arbiter>,
    flags: &[String],
) {
    let name = &vm.pair.vm.name;
    let stop = || STOP.load(Ordering::Acquire);
    if vm.prefer != me {
        wait_until_live(vm, arbiter, &stop);
    }
    while !stop() {
        let last_start = Instant::now();
        let who = format!("node {}: {name}", me.name());
        let Some(status) = run_side(exe, &vm.path, me.name(), flags, &who, &stop) else {
            if stop() {
                return;
            }
            std::thread::sleep(Duration::from_secs(2));
            continue;
        };
        pause_after(&who, status, last_start);
    }
}

/// Runs `tandem move`.
pub fn move_vm(args: MoveArgs) -> ExitCode {
    let result = (|| -> anyhow::Result<String> {
        let vms = load_cluster(&args.config)?.vms;
        let Some(vm) = vms.iter().find(|v| v.pair.vm.name == args.vm) else {
            bail!(
                "{}: no VM named {:?} (it has {})",
                args.config.display(),
                args.vm,
                vms.iter()
                    .map(|v| v.pair.vm.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let to = args.to.as_deref().map(parse_host).transpose()?;
        super::status::switch_over(&vm.pair, to).map_err(anyhow::Error::msg)
    })();
    match result {
        Ok(text) => {
            println!("{}: {text}", args.vm);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("tandem-cluster-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = |name: &str| {
            format!(
                "[vm]\nname = \"{name}\"\nkernel = \"/k\"\n[hosts]\na = {{ address = \"10.0.0.1:1\" }}\nb = {{ address = \"10.0.0.2:1\" }}\n"
            )
        };
        std::fs::write(dir.join("web1.toml"), pair("web1")).unwrap();
        std::fs::write(dir.join("web2.toml"), pair("web2")).unwrap();
        std::fs::write(dir.join("dup.toml"), pair("web1")).unwrap();
        let cluster = dir.join("cluster.toml");
        let check = |text: &str| {
            std::fs::write(&cluster, text).unwrap();
            load_cluster(&cluster)
                .map(|c| c.vms)
                .map_err(|e| e.to_string())
        };
        let ok = check(
            "[[vm]]\nconfig = \"web1.toml\"\nprefer = \"a\"\n[[vm]]\nconfig = \"web2.toml\"\nprefer = \"b\"\n",
        )
        .unwrap();
        assert_eq!(ok.len(), 2);
        assert_eq!((ok[0].prefer, ok[1].prefer), (HostId::A, HostId::B));
        let e = check("[[vm]]\nconfig = \"web1.toml\"\nprefer = \"c\"\n").unwrap_err();
        assert!(e.contains("prefer = \"c\" must be"), "{e}");
        let e = check(
            "[[vm]]\nconfig = \"web1.toml\"\nprefer = \"a\"\n[[vm]]\nconfig = \"dup.toml\"\nprefer = \"b\"\n",
        )
        .unwrap_err();
        assert!(e.contains("names the VM \"web1\" again"), "{e}");
        let e = check("[[vm]]\nconfig = \"missing.toml\"\nprefer = \"a\"\n").unwrap_err();
        assert!(e.contains("vm[0]"), "{e}");
        let e = check("[[vm]]\nconfig = \"web1.toml\"\nprefer = \"a\"\nweight = 3\n").unwrap_err();
        assert!(e.contains("unknown field"), "{e}");
        assert!(check("").unwrap_err().contains("no [[vm]]"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
