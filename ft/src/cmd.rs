//! `tandem primary` and `tandem secondary`: one host of a pair, from the
//! pair file both hosts share.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use tandem_vmm::vm::RunMode;
use tandem_vmm::{VmConfig, DEFAULT_KVM_PATH};

use super::console::ConsoleSocket;
use super::local_socket::Access;
use super::pair::{run_primary, run_secondary, PairParams};
use super::status::{self, Status, StatusError};
use crate::exit::EXIT_START_FAILED;
use tandem_config::{self as config, HostId, PairConfig};

/// Options of `tandem primary` / `tandem secondary`.
#[derive(Args)]
pub struct PairArgs {
    /// The pair file (the same on both hosts).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Which host of the file this is (default: found from local addresses).
    #[arg(long, value_name = "a|b")]
    host: Option<String>,
    /// Primary only: run without waiting for a secondary (after winning the
    /// arbitration).
    #[arg(long)]
    alone: bool,
    /// Run a pair with no arbiter configured: both sides may go live at once.
    #[arg(long)]
    i_accept_split_brain: bool,
    /// Run with no `[ft] psk_file`: the replication channel and the witness
    /// are then unauthenticated (anyone reaching the port could feed or
    /// impersonate a side).
    #[arg(long)]
    insecure: bool,
}

/// Which role to start in (what a side reports is [`status::Role`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Run the guest and ship its log.
    Primary,
    /// Follow a primary and take over when it is gone.
    Secondary,
    /// Whatever the arbiter's record says (`tandem pair`).
    FromArbiter,
}

extern "C" fn freeze(_: libc::c_int) {
    // SAFETY: raise is async-signal-safe; SIGSTOP freezes the whole process
    // with its sockets open and nothing more sent: a host hang as the peer
    // sees it (test failover). SIGCONT resumes it.
    unsafe { libc::raise(libc::SIGSTOP) };
}

fn install_freeze_on_usr1() {
    // SAFETY: installs a handler that only calls an async-signal-safe function.
    unsafe { libc::signal(libc::SIGUSR1, freeze as *const () as libc::sighandler_t) };
}

/// Runs one host of a pair in `role`.
pub fn run(role: Role, args: PairArgs) -> ExitCode {
    match start(role, args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(EXIT_START_FAILED)
        }
    }
}

fn start(role: Role, args: PairArgs) -> anyhow::Result<ExitCode> {
    let cfg = config::load(&args.config)?;
    let me = config::which_host(&cfg, args.host.as_deref(), &config::local_addresses())?;
    if !cfg.vm.kernel.is_file() {
        anyhow::bail!(
            "{}: kernel {} does not exist",
            args.config.display(),
            cfg.vm.kernel.display()
        );
    }
    let (psk, arbiter) =
        super::arbiter::open(&cfg, &args.config, args.insecure, args.i_accept_split_brain)?;
    if psk.is_none() {
        eprintln!("tandem: WARNING: no [ft] psk_file: replication and witness traffic is unauthenticated (--insecure)");
    } else if !cfg.ft.encrypt {
        eprintln!("tandem: WARNING: [ft] encrypt = false: guest memory, disk data, network frames and console input cross the replication link readable (authenticated, not encrypted)");
    }
    install_freeze_on_usr1();
    crate::fence::handle_term();
    let control = status::control_path(
        cfg.host(me).control.as_deref(),
        &cfg.ft.state_dir,
        me.name(),
    );
    let params = PairParams {
        vm_name: cfg.vm.name.clone(),
        me: me.name().to_string(),
        listen: cfg.host(me).address,
        peer: cfg.host(me.peer()).address,
        heartbeat: cfg.ft.heartbeat,
        failover_timeout: cfg.ft.failover_timeout,
        arbiter,
        alone: args.alone,
        state_dir: cfg.ft.state_dir.clone(),
        fence_command: cfg.ft.fence_command.clone(),
        respawn: cfg.ft.respawn.clone(),
        peer_name: me.peer().name().to_string(),
        replayed_commit: cfg.ft.output_commit == config::OutputCommit::Replayed,
        console: cfg
            .vm
            .console
            .clone()
            .map(|path| (ConsoleSocket::new(), path)),
        board: Arc::default(),
        control,
        access: Access::new(cfg.ft.socket_group),
        verify_peer_address: cfg.ft.verify_peer_address,
        psk,
        mirrored: cfg.ft.storage == config::Storage::Mirrored,
        position: cfg.ft.position,
        irq_defer: cfg.ft.irq_defer,
        disks: cfg.disk_configs(me),
        replica_dir: replica_dir(&cfg.ft.state_dir, me),
        throttle: Arc::new(tandem_vmm::journal::Throttle::new(
            cfg.ft.max_unacked_bytes,
            cfg.ft.max_lag,
            cfg.ft.max_replay_lag,
        )),
    };
    let role = match role {
        Role::FromArbiter => match &params.arbiter {
            Some(a) => {
                let grant = a.query(&params.vm_name)?;
                let peer = me.peer().name();
                if grant.holder.as_deref() == Some(peer) {
                    eprintln!("tandem: the arbiter shows host {peer} live ({grant}): joining as secondary");
                    Role::Secondary
                } else {
                    eprintln!("tandem: the arbiter shows no other live host ({grant}): starting as primary");
                    Role::Primary
                }
            }
            None => anyhow::bail!("`tandem pair` needs an arbiter ([ft] witness) to know its role"),
        },
        other => other,
    };
    let console = params.console.as_ref().map(|(socket, _)| socket.clone());
    let vm_config = move |mode: RunMode| vm_config(&cfg, me, mode, &console);
    let ended = match role {
        Role::Primary | Role::FromArbiter => run_primary(params, vm_config)?,
        Role::Secondary => run_secondary(params, vm_config)?,
    };
    Ok(ended.exit_code())
}

/// Where host `me` keeps its replicas' sidecars: named by host, so two
/// hosts of a pair on one machine (tests, demos) never share one.
fn replica_dir(state_dir: &std::path::Path, me: HostId) -> PathBuf {
    state_dir.join(format!("replicas-{}", me.name()))
}

fn vm_config(
    cfg: &PairConfig,
    me: HostId,
    mode: RunMode,
    console: &Option<ConsoleSocket>,
) -> VmConfig {
    VmConfig {
        kvm_path: PathBuf::from(DEFAULT_KVM_PATH),
        kernel: cfg.vm.kernel.clone(),
        initrd: cfg.vm.initrd.clone(),
        cmdline: cfg.vm.cmdline.clone(),
        mem_size: cfg.vm.mem,
        serial_out: match console {
            Some(socket) => Box::new(socket.clone()),
            None => Box::new(std::io::stdout()),
        },
        disks: cfg.disk_configs(me),
        nets: cfg.net_configs(me),
        rtc_base: None,
        repair: false,
        mode,
        on_live: None,
        go_live_record: None,
        announce: tandem_vmm::backend::announce::AnnounceSchedule {
            rounds: cfg.ft.announce.rounds,
            initial: cfg.ft.announce.initial,
            step: cfg.ft.announce.step,
            max: cfg.ft.announce.max,
        },
        device_model: cfg.vm.device_model,
        on_guest_crash: cfg.ft.on_guest_crash,
        mirror: (cfg.ft.storage == config::Storage::Mirrored)
            .then(|| replica_dir(&cfg.ft.state_dir, me)),
    }
}

/// Options of `tandem status`.
#[derive(Args)]
pub struct StatusArgs {
    /// The pair file.
    #[arg(
        long,
        value_name = "FILE",
        required_unless_present = "cluster",
        conflicts_with = "cluster"
    )]
    config: Option<PathBuf>,
    /// A cluster file (`tandem node`): one line per VM, with where it is
    /// live, whether it is protected, its generation and lag.
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// One JSON object per host (per VM with --cluster) instead of text.
    #[arg(long)]
    json: bool,
}

/// `tandem status --cluster`: every VM of a cluster file, one line each.
fn cluster_status(path: &std::path::Path, json: bool) -> ExitCode {
    let tandem_config::cluster::Cluster { vms, membership } =
        match tandem_config::cluster::load_cluster(path) {
            Ok(cluster) => cluster,
            Err(e) => {
                eprintln!("tandem: {e:#}");
                return ExitCode::from(EXIT_START_FAILED);
            }
        };
    // With etcd membership, which host fills each slot (default: a and b).
    let slot_hosts = super::spare::slot_hosts(membership.as_ref());
    let mut unprotected = 0;
    for vm in &vms {
        let cfg = &vm.pair;
        let sides = query_both_sides(cfg);
        let hosts = slot_hosts.get(&cfg.vm.name);
        if json {
            println!("{}", vm_status_json(vm, &sides, hosts));
        }
        let (line, protected) = vm_status_line(&sides);
        if !protected {
            unprotected += 1;
        }
        if !json {
            let hosts = hosts.map(|h| format!("; hosts {h}")).unwrap_or_default();
            println!(
                "{}: {line}; prefers {}{hosts}",
                cfg.vm.name,
                vm.prefer.name()
            );
        }
    }
    if unprotected == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// One host's answer on its control socket.
type SideStatus = (HostId, Result<Status, StatusError>);

/// Both hosts' status answers for one VM.
fn query_both_sides(cfg: &PairConfig) -> Vec<SideStatus> {
    [HostId::A, HostId::B]
        .into_iter()
        .map(|host| {
            let control = status::control_path(
                cfg.host(host).control.as_deref(),
                &cfg.ft.state_dir,
                host.name(),
            );
            (host, status::query_status(&control))
        })
        .collect()
}

/// `--json`: one object for a VM, each host's status (null: no answer).
fn vm_status_json<T: serde::Serialize>(
    vm: &tandem_config::cluster::ClusterVm,
    sides: &[SideStatus],
    slot_hosts: Option<T>,
) -> serde_json::Value {
    let hosts: serde_json::Map<String, serde_json::Value> = sides
        .iter()
        .map(|(h, s)| {
            let value = s
                .as_ref()
                .ok()
                .and_then(|s| serde_json::to_value(s).ok())
                .unwrap_or(serde_json::Value::Null);
            (h.name().to_string(), value)
        })
        .collect();
    serde_json::json!({
        "vm": vm.pair.vm.name,
        "prefer": vm.prefer.name(),
        "hosts": hosts,
        "slot_hosts": slot_hosts,
    })
}

/// The text line for one VM, and whether it is protected (live with a
/// secondary following).
fn vm_status_line(sides: &[SideStatus]) -> (String, bool) {
    let in_role = |role: status::Role| {
        sides
            .iter()
            .find_map(|(h, s)| s.as_ref().ok().filter(|s| s.role == role).map(|s| (*h, s)))
    };
    let figure = |s: &Status, name: &str| s.figures.get(name).unwrap_or(0);
    match (in_role(status::Role::Primary), in_role(status::Role::Secondary)) {
        (Some((host, v)), Some((peer, _))) => (
            format!(
                "live on {} (generation {}), protected by {} (log lag {} ms), guest crashes {} ({} rolled back, {} rebooted)",
                host.name(),
                v.generation,
                peer.name(),
                figure(v, "lag_ms"),
                figure(v, "guest_crashes"),
                figure(v, "guest_rollbacks"),
                figure(v, "guest_reboots")
            ),
            true,
        ),
        (Some((host, v)), None) => (
            format!(
                "live on {} (generation {}), UNPROTECTED (no secondary follows)",
                host.name(),
                v.generation
            ),
            false,
        ),
        (None, _) => {
            let seen: Vec<String> = sides
                .iter()
                .map(|(h, s)| {
                    let role = match s {
                        Ok(s) => s.role.name(),
                        Err(StatusError::NoAnswer(_)) => "no answer",
                        Err(StatusError::Garbled { .. }) => "garbled status",
                        Err(StatusError::Refused(_)) => "refused",
                    };
                    format!("{}: {role}", h.name())
                })
                .collect();
            (format!("NOT LIVE ({})", seen.join(", ")), false)
        }
    }
}

/// `tandem switchover` arguments.
#[derive(clap::Args)]
pub struct SwitchoverArgs {
    /// The pair file.
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
}

/// `tandem switchover`: the live side hands the VM to its secondary without
/// losing anything (for upgrading or servicing that host); the secondary
/// goes live at once, the old side stops and can re-join with `tandem pair`.
pub fn switchover(args: SwitchoverArgs) -> ExitCode {
    let cfg = match config::load(&args.config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("tandem: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    match status::switch_over(&cfg, None) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::from(1)
        }
    }
}

/// One line of `tandem status --json`: a host and its status or why there
/// is none.
#[derive(serde::Serialize)]
struct HostLine<'a> {
    host: &'a str,
    #[serde(flatten)]
    answer: HostAnswer<'a>,
}

/// What one host answered, for [`HostLine`].
#[derive(serde::Serialize)]
#[serde(rename_all = "lowercase")]
enum HostAnswer<'a> {
    Status(&'a Status),
    Error(String),
}

/// `tandem status`: asks each host's control socket where it stands.
pub fn status(args: StatusArgs) -> ExitCode {
    if let Some(cluster) = &args.cluster {
        return cluster_status(cluster, args.json);
    }
    let Some(config) = &args.config else {
        eprintln!("tandem: give --config PAIR.toml or --cluster CLUSTER.toml");
        return ExitCode::from(EXIT_START_FAILED);
    };
    let cfg = match config::load(config) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("tandem: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    let mut any = false;
    for host in [HostId::A, HostId::B] {
        let path = status::control_path(
            cfg.host(host).control.as_deref(),
            &cfg.ft.state_dir,
            host.name(),
        );
        let answer = status::query_status(&path);
        any |= answer.is_ok();
        if args.json {
            let line = HostLine {
                host: host.name(),
                answer: match &answer {
                    Ok(s) => HostAnswer::Status(s),
                    Err(e) => HostAnswer::Error(e.to_string()),
                },
            };
            println!("{}", serde_json::to_string(&line).unwrap_or_default());
        } else {
            match &answer {
                Ok(s) => println!("host {}: {}", host.name(), s.to_text()),
                Err(e) => println!("host {}: {e}", host.name()),
            }
        }
    }
    if any {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{is_primary, Figures, Role};

    fn status(role: Role, peer: &str, reason: Option<&str>) -> Status {
        let mut figures = Figures::default();
        figures.push("inputs_dropped", 3);
        Status {
            role,
            generation: 4,
            peer: peer.into(),
            reason: reason.map(str::to_string),
            figures,
        }
    }

    #[test]
    fn only_a_primary_status_is_primary() {
        assert!(is_primary(&status(Role::Primary, "attached", None).to_json()).unwrap());
        assert!(is_primary(
            "{\"role\":\"primary\",\"generation\":1,\"peer\":\"none (alone)\",\"held_outputs\":0}\n"
        )
        .unwrap());
        for role in [
            Role::Starting,
            Role::Secondary,
            Role::SteppedDown,
            Role::Fenced,
        ] {
            assert!(!is_primary(&status(role, "connected", None).to_json()).unwrap());
        }
        // Text that merely contains the primary's key/value is not a primary
        // (the substring test this replaced said it was).
        let sneaky = status(
            Role::Fenced,
            "connected",
            Some("peer says \"role\":\"primary\""),
        )
        .to_json();
        assert!(sneaky.contains("\\\"role\\\":\\\"primary\\\""), "{sneaky}");
        assert!(!is_primary(&sneaky).unwrap());
        assert!(!is_primary(
            "{\"role\":\"secondary\",\"generation\":1,\"peer\":\"\\\"role\\\":\\\"primary\\\"\"}"
        )
        .unwrap());
    }

    #[test]
    fn a_garbled_answer_is_an_error_not_a_primary() {
        for bad in [
            "",
            "\"role\":\"primary\"",
            "{\"role\":\"primary\"",
            "{\"role\":\"primary\"}",
            "{\"role\":\"PRIMARY\",\"generation\":1,\"peer\":\"x\"}",
            "error: unknown command \"switchover\" (this side knows: status)",
        ] {
            match is_primary(bad) {
                Err(StatusError::Garbled { .. }) => {}
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn status_json_lines_keep_their_shape() {
        let s = status(Role::Secondary, "connected", None);
        let line = HostLine {
            host: "b",
            answer: HostAnswer::Status(&s),
        };
        assert_eq!(
            serde_json::to_string(&line).unwrap(),
            "{\"host\":\"b\",\"status\":{\"role\":\"secondary\",\"generation\":4,\"peer\":\"connected\",\"inputs_dropped\":3}}"
        );
        let line = HostLine {
            host: "a",
            answer: HostAnswer::Error("no answer on /x/a.ctl: \"refused\"".into()),
        };
        let text = serde_json::to_string(&line).unwrap();
        assert_eq!(
            text,
            "{\"host\":\"a\",\"error\":\"no answer on /x/a.ctl: \\\"refused\\\"\"}"
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], "no answer on /x/a.ctl: \"refused\"");
    }
}
