//! `tandem run`: one VM on this host.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use tandem_replay::{Cause, CauseQueue};
use tandem_vmm::{RunOutcome, Vm, VmConfig, DEFAULT_KVM_PATH};
use tracing::info;

use crate::{EXIT_GUEST_CRASH, EXIT_START_FAILED, EXIT_VMM_ERROR};

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
    /// The KVM device.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_KVM_PATH)]
    kvm_device: PathBuf,
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
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 64M, 1G, 67108864)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// Runs `tandem run` and maps the outcome to the process exit status.
pub fn run(args: RunArgs) -> ExitCode {
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
    match vm.run() {
        Ok((outcome, stats)) => {
            info!(?stats, "VM stopped");
            match outcome {
                RunOutcome::GuestExit(code) => ExitCode::from(code),
                RunOutcome::Reset => ExitCode::SUCCESS,
                RunOutcome::Crashed(crash) => {
                    eprintln!("tandem: {crash}");
                    ExitCode::from(EXIT_GUEST_CRASH)
                }
            }
        }
        Err(e) => {
            eprintln!("tandem: {e}");
            ExitCode::from(EXIT_VMM_ERROR)
        }
    }
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
    fn serial_targets() {
        assert!(matches!(parse_serial("stdio"), Ok(SerialTarget::Stdio)));
        assert!(
            matches!(parse_serial("file:/tmp/x"), Ok(SerialTarget::File(p)) if p == std::path::Path::new("/tmp/x"))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1").is_err());
    }
}
