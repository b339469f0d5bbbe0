//! One side of a protected VM run as its own `tandem pair` process, for
//! `tandem node` and the spare hosts: start it, wait for it, pause before
//! starting it again.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tandem_config::cluster::ClusterVm;

/// A side that the VM does not prefer lets the preferred one start it as
/// primary, then follows: it waits until the arbiter shows the VM live, or
/// a grace period (so a VM whose preferred host is down still starts).
pub fn wait_until_live(
    vm: &ClusterVm,
    arbiter: Option<&dyn crate::arbiter::Arbiter>,
    stop: &dyn Fn() -> bool,
) {
    let grace = vm.pair.ft.failover_timeout * 3 + Duration::from_secs(2);
    let started = Instant::now();
    while !stop() && started.elapsed() < grace {
        let live = arbiter
            .and_then(|a| a.query(&vm.pair.vm.name).ok())
            .is_some_and(|g| g.holder.is_some());
        if live {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs one `tandem pair --config CONFIG --host SLOT` (dying with this
/// process, as in a host crash) until it ends, or until `stop()` says so
/// (SIGTERM, then SIGKILL after 5 s). Its status; None when it could not
/// start or was stopped here.
pub fn run_side(
    exe: &Path,
    config: &Path,
    slot: &str,
    flags: &[String],
    who: &str,
    stop: &dyn Fn() -> bool,
) -> Option<std::process::ExitStatus> {
    let mut cmd = Command::new(exe);
    cmd.arg("pair")
        .arg("--config")
        .arg(config)
        .arg("--host")
        .arg(slot)
        .args(flags)
        .stdin(std::process::Stdio::null());
    // SAFETY: prctl in the forked child before exec only sets a process
    // attribute; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(|| {
            // The VM processes die with the node, as with a host crash.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandem: {who}: cannot start tandem pair: {e}");
            return None;
        }
    };
    eprintln!("tandem: {who}: started its side (pid {})", child.id());
    loop {
        if stop() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Says that a side ended and waits before it is started again: a clean
/// end (the VM moved away) re-joins at once; anything else after a pause,
/// longer if it keeps failing at start.
pub fn pause_after(who: &str, status: std::process::ExitStatus, started: Instant) {
    let pause = if status.success() {
        Duration::from_millis(200)
    } else if started.elapsed() < Duration::from_secs(5) {
        Duration::from_secs(3)
    } else {
        Duration::from_secs(1)
    };
    eprintln!(
        "tandem: {who}: its side ended ({status}); starting it again in {} ms",
        pause.as_millis()
    );
    std::thread::sleep(pause);
}
