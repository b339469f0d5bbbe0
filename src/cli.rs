//! `tandem run`: one VM on this host.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use std::time::Duration;
use tandem_replay::{Cause, CauseQueue};

/// `--irq-defer` of a recording without a position counter, where every
/// kick is a sync point: Debian's kernel boot recorded in 2.9x its plain
/// time at 7.2 MiB/s of guest time with it; no run without it finished
/// (the Linux harness, README "Linux").
const DEFAULT_IRQ_DEFER_US: u64 = 10_000;
/// `--sync-interval` without a position counter (ms of guest time).
const DEFAULT_SYNC_INTERVAL_MS: u64 = 1000;
/// `--sync-interval` with one: a replay lands on positions and compares
/// interval sync points instead of installing them, so they serve only as
/// an offline replay's repair point; at 1 s they were three quarters of
/// compute's log (0.77 of 1.0 Mbit/s at 100 Hz).
const DEFAULT_SYNC_INTERVAL_POSITIONED_MS: u64 = 10_000;
use tandem_vmm::journal::RecordOptions;
use tandem_vmm::vm::RunMode;
use tandem_vmm::{DiskConfig, NetConfig, Vm, VmConfig, DEFAULT_KVM_PATH};

use crate::config::parse_mac;
use crate::ft::exit::finish_report as finish;
use crate::{EXIT_DIVERGED, EXIT_START_FAILED};

/// Options of `tandem run`.
#[derive(Args)]
pub struct RunArgs {
    /// Kernel: a Linux bzImage or an ELF image with a PVH entry note.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Initial ramdisk.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
    /// Guest memory: bytes, or a number with K, M or G (2M to 3G).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    mem: u64,
    /// Where COM1 goes: `stdio` (output to stdout, stdin to the guest) or `file:PATH`.
    #[arg(long, value_name = "stdio|file:PATH", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialTarget,
    /// A virtio-blk disk backed by a raw image file; `,ro` makes it read-only.
    /// Repeatable.
    #[arg(long, value_name = "PATH[,ro]", value_parser = parse_disk)]
    disk: Vec<DiskConfig>,
    /// A virtio-net device on an existing tap; the guest MAC defaults to
    /// 52:54:00:12:34:56 (+ the device index). Repeatable.
    #[arg(long, value_name = "tap=NAME[,mac=MAC]", value_parser = parse_net)]
    net: Vec<NetConfig>,
    /// The KVM device.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KVM_PATH)]
    kvm_device: PathBuf,
    /// Record every input to this log file (replay it with `tandem replay`).
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Stop recording (and the VM, with an error) before the log passes SIZE.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "record")]
    record_max: Option<u64>,
    /// Take a sync point at least this often, in milliseconds of guest time
    /// [default: 1000; 10000 when --position asks for auto or
    /// kvm-insn-stat (also where auto finds no counter), where it serves
    /// only as an offline replay's repair point].
    #[arg(long, value_name = "MS", requires = "record")]
    sync_interval: Option<u64>,
    /// End a verified-lockstep epoch about this often (milliseconds): the
    /// log then holds state hashes the replayer checks.
    #[arg(long, value_name = "MS", default_value_t = 10, requires = "record")]
    epoch_ms: u64,
    /// The RTC's time at VM creation, in Unix seconds (default: the host's
    /// clock). Like QEMU's `-rtc base=`.
    #[arg(long, value_name = "UNIX_SECS")]
    rtc_base: Option<u64>,
    /// Kick the vCPU out of the guest at most this often, in microseconds.
    #[arg(long, value_name = "US", default_value_t = 500)]
    min_kick_interval: u64,
    /// Recording: how long (microseconds) a timer or device interrupt may
    /// wait for a stop the guest makes itself (an exit with interrupts on,
    /// or HLT) before a kick stops it, which costs a sync point or a
    /// positioned stop. 0: kick at the deadline. Default: 10000 with
    /// `--position none` (every kick a sync point), 0 with a counter.
    #[arg(long, value_name = "US", requires = "record")]
    irq_defer: Option<u64>,
    /// What a guest crash (triple fault, pvpanic report, HLT with
    /// interrupts off) does: `halt` ends the run, `reboot` restarts the
    /// guest from its boot state (at most 3 times a minute of guest time),
    /// `restart-checkpoint` rolls it back to a checkpoint taken every 20 ms
    /// (output waits for the next one) and reboots if that does not help.
    #[arg(long, value_name = "halt|reboot|restart-checkpoint", default_value = "halt", value_parser = parse_crash_policy)]
    on_guest_crash: tandem_vmm::CrashPolicy,
    /// The position counter (where the guest is in its instruction
    /// stream): `kvm-insn-stat` (KVM's emulated-instruction count, used only
    /// if its self-check proves it exact here; refused otherwise), `auto`
    /// (it if it passes, else none; `-v` says why), `none`. With a counter,
    /// `--record` logs a kick as a positioned stop (where the guest was,
    /// not its state) and the replay executes to it; without one, and where
    /// the guest's state is not countable, a kick is a sync point.
    #[arg(long, value_name = "auto|kvm-insn-stat|none", default_value = "none", value_parser = parse_position)]
    position: tandem_vmm::position::PositionChoice,
}

fn parse_position(text: &str) -> Result<tandem_vmm::position::PositionChoice, String> {
    use tandem_vmm::position::PositionChoice;
    match text {
        "auto" => Ok(PositionChoice::Auto),
        "kvm-insn-stat" => Ok(PositionChoice::KvmInsnStat),
        "none" => Ok(PositionChoice::None),
        other => Err(format!("{other:?}: must be auto, kvm-insn-stat or none")),
    }
}

fn parse_crash_policy(text: &str) -> Result<tandem_vmm::CrashPolicy, String> {
    match text {
        "halt" => Ok(tandem_vmm::CrashPolicy::Halt),
        "reboot" => Ok(tandem_vmm::CrashPolicy::Reboot),
        "restart-checkpoint" => Ok(tandem_vmm::CrashPolicy::RESTART_CHECKPOINT),
        other => Err(format!(
            "{other:?}: must be halt, reboot or restart-checkpoint"
        )),
    }
}

/// Options of `tandem replay`.
#[derive(Args)]
pub struct ReplayArgs {
    /// The log written by `tandem run --record`.
    #[arg(value_name = "FILE")]
    log: PathBuf,
    /// The kernel image (default: the path recorded in the log). Its hash
    /// must match the recorded one.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// The initrd the recording used.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Where the replayed console goes: `stdio` or `file:PATH`.
    #[arg(long, value_name = "stdio|file:PATH", default_value = "stdio", value_parser = parse_serial)]
    serial: SerialTarget,
    /// The KVM device.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KVM_PATH)]
    kvm_device: PathBuf,
    /// Report divergences without repairing them (repair is the default).
    #[arg(long)]
    no_repair: bool,
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.strip_suffix(",ro") {
        Some(path) => (path, true),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("expected PATH or PATH,ro".into());
    }
    Ok(DiskConfig {
        path: path.into(),
        read_only,
    })
}

fn parse_net(s: &str) -> Result<NetConfig, String> {
    let mut tap = None;
    let mut mac = None;
    for part in s.split(',') {
        match part.split_once('=') {
            Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
            Some(("mac", value)) => {
                mac = Some(parse_mac(value).map_err(|problem| format!("`{value}` {problem}"))?)
            }
            _ => return Err(format!("unknown `{part}`: expected tap=NAME[,mac=MAC]")),
        }
    }
    Ok(NetConfig {
        tap: tap.ok_or("expected tap=NAME")?,
        mac,
    })
}

/// Where the guest console goes.
#[derive(Clone, Debug)]
pub enum SerialTarget {
    /// stdout, and stdin to the guest.
    Stdio,
    /// A file (created or truncated).
    File(PathBuf),
}

fn parse_serial(s: &str) -> Result<SerialTarget, String> {
    match s {
        "stdio" => Ok(SerialTarget::Stdio),
        _ => match s.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialTarget::File(path.into())),
            _ => Err(format!("expected `stdio` or `file:PATH`, got `{s}`")),
        },
    }
}

/// Parses `64M`, `1G`, `65536K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    use crate::config::size::SizeError;
    let s = s.trim();
    crate::config::size::parse_size(s).map_err(|e| match e {
        SizeError::NotASize => format!("`{s}` is not a size (examples: 64M, 1G, 67108864)"),
        SizeError::TooLarge => format!("`{s}` is too large"),
    })
}

/// Runs `tandem run` and maps the outcome to the process exit status.
pub fn run(args: RunArgs) -> ExitCode {
    if let Err(e) = choose_position(&args) {
        eprintln!("tandem: {e}");
        return ExitCode::from(EXIT_START_FAILED);
    }
    let vm = match build_vm(&args) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("tandem: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    if matches!(args.serial, SerialTarget::Stdio) {
        spawn_stdin_reader(vm.cause_queue());
    }
    finish(vm.run())
}

/// Picks the position counter `--position` asks for (and says which at
/// `-v`); an explicit counter that fails its self-check is an error.
fn choose_position(args: &RunArgs) -> anyhow::Result<()> {
    use tandem_vmm::position::{choose, PositionChoice};
    // A recording chooses its counter as its VM is built.
    if args.position == PositionChoice::None || args.record.is_some() {
        return Ok(());
    }
    let kvm = tandem_vmm::vm::open_kvm(&args.kvm_device)?;
    let plan = choose(&kvm, args.position)
        .map_err(|e| anyhow::anyhow!("--position kvm-insn-stat: {e}"))?;
    tracing::info!("position counter: {} ({})", plan.counter, plan.why);
    Ok(())
}

/// Runs `tandem replay`.
pub fn replay(args: ReplayArgs) -> ExitCode {
    let vm = match build_replay(&args) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("tandem: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    let report = match vm.run() {
        Ok(report) => report,
        Err(e) => return finish(Err(e)),
    };
    let s = &report.stats;
    eprintln!(
        "tandem: replay summary: {} stops, {} sync points, {} epochs ({} verified, {} transferred), {} divergences ({} repaired)",
        s.stops + s.sync_points + s.landing.positioned,
        s.sync_points,
        s.epochs,
        s.epochs_verified,
        s.epochs_transferred,
        s.divergences,
        s.repaired
    );
    if s.sync_points_landed > 0 {
        eprintln!(
            "tandem: {} sync points landed on and found reached by execution (nothing installed)",
            s.sync_points_landed
        );
    }
    if let Some((median, p99)) = s.landing.percentiles() {
        eprintln!(
            "tandem: {} positioned stops landed: median {median} µs, p99 {p99} µs, {:.1} runs each",
            s.landing.positioned,
            s.landing.runs() as f64 / s.landing.positioned as f64
        );
        // Where the landing time went: the runs of each kind (the guest's
        // own progress and entering and leaving it), and what lay between.
        let total = s.landing.micros.max(1) as f64;
        let mut between = s.landing.micros;
        let mut parts = Vec::new();
        for (name, runs) in s.landing.runs_by_kind() {
            between = between.saturating_sub(runs.micros);
            parts.push(format!(
                "{:.0}% {name} ({:.1} each)",
                100.0 * runs.micros as f64 / total,
                runs.runs as f64 / s.landing.positioned as f64
            ));
        }
        eprintln!(
            "tandem: landing time: {}, {:.0}% between runs",
            parts.join(", "),
            100.0 * between as f64 / total
        );
    }
    if !report.divergences.is_empty() {
        let dump = divergence_dump_path(&args.log);
        match write_divergence_dump(&dump, &report.divergences) {
            Ok(()) => eprintln!(
                "tandem: divergences at epochs {} (details in {})",
                report
                    .divergences
                    .iter()
                    .map(|d| format!("{} (stop {}: {})", d.epoch, d.stop, d.components.join(", ")))
                    .collect::<Vec<_>>()
                    .join("; "),
                dump.display()
            ),
            Err(e) => eprintln!(
                "tandem: cannot write divergence dump {}: {e}",
                dump.display()
            ),
        }
        if s.divergences >= 3 && s.divergences * 10 > s.epochs {
            eprintln!(
                "tandem: this guest diverges again and again: it is checkpoint-protected, not lockstep"
            );
        }
    }
    if let Some(epoch) = report.unrepaired {
        eprintln!(
            "tandem: replay diverged at epoch {epoch} and the log holds no sync point after it to repair from"
        );
        return ExitCode::from(EXIT_DIVERGED);
    }
    finish(Ok(report))
}

fn divergence_dump_path(log: &std::path::Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".divergence.txt");
    PathBuf::from(name)
}

fn write_divergence_dump(
    path: &std::path::Path,
    divergences: &[tandem_vmm::vcpu::DivergenceReport],
) -> std::io::Result<()> {
    let mut out = String::new();
    for d in divergences {
        out.push_str(&format!(
            "epoch {} stop {}\n  differs: {}\n",
            d.epoch,
            d.stop,
            d.components.join(", ")
        ));
        let ours: std::collections::BTreeMap<_, _> = d.replayed.iter().cloned().collect();
        for (name, hash) in &d.recorded {
            let mine = ours
                .get(name)
                .map_or("-".to_string(), |h| format!("{h:016x}"));
            out.push_str(&format!(
                "  {name:<24} recorded {hash:016x} replayed {mine}\n"
            ));
        }
    }
    std::fs::write(path, out)
}

fn serial_sink(target: &SerialTarget) -> anyhow::Result<Box<dyn Write + Send>> {
    Ok(match target {
        SerialTarget::Stdio => Box::new(std::io::stdout()),
        SerialTarget::File(path) => {
            Box::new(File::create(path).map_err(|e| {
                anyhow::anyhow!("cannot create serial output {}: {e}", path.display())
            })?)
        }
    })
}

fn build_replay(args: &ReplayArgs) -> anyhow::Result<Vm> {
    if !args.log.is_file() {
        bail!("log {} does not exist or is not a file", args.log.display());
    }
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None => {
            let (identity, _) = tandem_vmm::journal::summarize(&args.log)?;
            PathBuf::from(identity.image_name)
        }
    };
    if !kernel.is_file() {
        bail!(
            "kernel {} does not exist (pass --kernel with the image the log recorded)",
            kernel.display()
        );
    }
    Ok(Vm::new(VmConfig {
        kvm_path: args.kvm_device.clone(),
        kernel,
        initrd: args.initrd.clone(),
        cmdline: String::new(),
        mem_size: 0,
        serial_out: serial_sink(&args.serial)?,
        disks: Vec::new(),
        nets: Vec::new(),
        rtc_base: None,
        on_live: None,
        go_live_record: None,
        announce: Default::default(),
        mirror: None,
        device_model: None,
        on_guest_crash: tandem_vmm::CrashPolicy::Halt,
        repair: !args.no_repair,
        mode: RunMode::Replay {
            log: args.log.clone(),
        },
    })?)
}

fn build_vm(args: &RunArgs) -> anyhow::Result<Vm> {
    if !args.kernel.is_file() {
        if args.kernel.exists() {
            bail!("kernel {} is not a regular file", args.kernel.display());
        }
        bail!("kernel {} does not exist", args.kernel.display());
    }
    let serial_out: Box<dyn Write + Send> =
        match &args.serial {
            SerialTarget::Stdio => Box::new(std::io::stdout()),
            SerialTarget::File(path) => Box::new(File::create(path).map_err(|e| {
                anyhow::anyhow!("cannot create serial output {}: {e}", path.display())
            })?),
        };
    let vm = Vm::new(VmConfig {
        kvm_path: args.kvm_device.clone(),
        kernel: args.kernel.clone(),
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        mem_size: args.mem,
        serial_out,
        disks: args.disk.clone(),
        nets: args.net.clone(),
        rtc_base: args.rtc_base,
        on_live: None,
        go_live_record: None,
        announce: Default::default(),
        mirror: None,
        device_model: None,
        on_guest_crash: args.on_guest_crash,
        repair: false,
        mode: match &args.record {
            None => RunMode::Live,
            Some(path) => RunMode::Record(RecordOptions {
                path: path.clone(),
                max_size: args.record_max,
                sync_interval: Duration::from_millis(
                    args.sync_interval
                        .unwrap_or(match args.position {
                            tandem_vmm::position::PositionChoice::None => DEFAULT_SYNC_INTERVAL_MS,
                            _ => DEFAULT_SYNC_INTERVAL_POSITIONED_MS,
                        })
                        .max(1),
                ),
                min_kick_interval: Duration::from_micros(args.min_kick_interval),
                irq_defer: Duration::from_micros(args.irq_defer.unwrap_or(match args.position {
                    tandem_vmm::position::PositionChoice::None => DEFAULT_IRQ_DEFER_US,
                    _ => 0,
                })),
                epoch_interval: Duration::from_millis(args.epoch_ms.max(1)),
                sync_period: tandem_vmm::journal::RECORD_SYNC_PERIOD,
                throttle: None,
                mirrored: false,
                position: args.position,
            }),
        },
    })?;
    Ok(vm)
}

/// Feeds stdin to the guest's UART. The thread ends at EOF; it is never joined
/// (a blocking read cannot be interrupted portably), which is fine for a
/// thread that owns nothing but stdin.
fn spawn_stdin_reader(causes: CauseQueue) {
    let spawned = std::thread::Builder::new()
        .name("tandem-stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 512];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => causes.push(Cause::SerialInput(buf[..n].to_vec())),
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no serial input: cannot start the stdin thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("8K"), Ok(8192));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999999999G").is_err());
    }

    #[test]
    fn disks_and_nets() {
        let d = parse_disk("/img/a.raw,ro").unwrap();
        assert_eq!((d.path.to_str(), d.read_only), (Some("/img/a.raw"), true));
        assert!(!parse_disk("/img/b").unwrap().read_only);
        assert!(parse_disk(",ro").is_err());
        let n = parse_net("tap=tap0,mac=52:54:00:aa:bb:0c").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([0x52, 0x54, 0, 0xaa, 0xbb, 0x0c]));
        assert_eq!(parse_net("tap=t1").unwrap().mac, None);
        for bad in [
            "",
            "mac=52:54:00:00:00:01",
            "tap=",
            "tap=t,mac=zz:00:00:00:00:00",
            "tap=t,mac=01:00:00:00:00:00",
            "tap=t,speed=10",
        ] {
            assert!(parse_net(bad).is_err(), "{bad}");
        }
        // The pair file's rule (config::parse_mac), with the value named.
        for (bad, problem) in [
            ("tap=t,mac=52:54:00:12:34", "is not a MAC address"),
            ("tap=t,mac=52:54:00:12:34:56:78", "is not a MAC address"),
            ("tap=t,mac=00:00:00:00:00:00", "is all zeros"),
            ("tap=t,mac=ff:ff:ff:ff:ff:ff", "is the broadcast address"),
            ("tap=t,mac=33:33:00:00:00:01", "is a multicast address"),
        ] {
            let e = parse_net(bad).unwrap_err();
            let mac = bad.trim_start_matches("tap=t,mac=");
            assert!(e.starts_with(&format!("`{mac}` {problem}")), "{bad}: {e}");
        }
    }

    #[test]
    fn serial_targets() {
        assert!(matches!(parse_serial("stdio"), Ok(SerialTarget::Stdio)));
        assert!(
            matches!(parse_serial("file:/tmp/x"), Ok(SerialTarget::File(p)) if p == std::path::Path::new("/tmp/x"))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }
}
