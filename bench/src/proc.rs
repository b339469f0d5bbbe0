//! Running one measured process: wall time, CPU time (its own rusage, not
//! the harness's), exit status and output, with a hard time limit.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What one run gave.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// Spawn to exit, seconds.
    pub wall: f64,
    /// User + system CPU seconds of the process and its waited-for children.
    pub cpu: f64,
    /// Exit status, or `128 + signal`.
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl Outcome {
    /// The last non-empty stdout line.
    pub fn last_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    }
}

/// A spawned child whose exit (with rusage) is collected by a waiter thread.
pub struct Running {
    pub pid: libc::pid_t,
    pub start: Instant,
    pub stdout: Option<std::process::ChildStdout>,
    err: mpsc::Receiver<String>,
    exited: mpsc::Receiver<(Instant, i32, f64)>,
}

/// Spawns `cmd` with stdin closed and stdout/stderr piped.
pub fn spawn(mut cmd: Command) -> std::io::Result<Running> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let (etx, err) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            let mut buf = Vec::new();
            let _ = e.read_to_end(&mut buf);
            s = String::from_utf8_lossy(&buf).into_owned();
        }
        let _ = etx.send(s);
    });
    let (xtx, exited) = mpsc::channel();
    std::thread::spawn(move || {
        // The std Child is forgotten: this thread reaps the pid itself so
        // that it gets the child's own rusage.
        std::mem::forget(child);
        let mut status = 0;
        // SAFETY: rusage is plain data that wait4 fills in.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        loop {
            // SAFETY: waits for our own child; both pointers are valid locals.
            let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
            if r == pid
                || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
            {
                break;
            }
        }
        let end = Instant::now();
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let cpu = tv(ru.ru_utime) + tv(ru.ru_stime);
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            128 + libc::WTERMSIG(status)
        };
        let _ = xtx.send((end, code, cpu));
    });
    Ok(Running {
        pid,
        start,
        stdout,
        err,
        exited,
    })
}

impl Running {
    /// Sends SIGKILL to the child.
    pub fn kill(&self) {
        // SAFETY: kill(2) has no memory effects. The pid is our own child,
        // called only before its waiter thread has reported it reaped.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
    }

    /// Waits until the child exits or `limit` after its start (then kills it).
    pub fn finish(mut self, limit: Duration) -> Outcome {
        let out_reader = self.stdout.take().map(|mut o| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = o.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        });
        let left = limit.saturating_sub(self.start.elapsed());
        let (timed_out, got) = match self.exited.recv_timeout(left) {
            Ok(x) => (false, x),
            Err(_) => {
                self.kill();
                let x = self.exited.recv().unwrap_or((Instant::now(), 137, 0.0));
                (true, x)
            }
        };
        let (end, status, cpu) = got;
        let stdout = out_reader.and_then(|h| h.join().ok()).unwrap_or_default();
        let stderr = self
            .err
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        Outcome {
            wall: end.duration_since(self.start).as_secs_f64(),
            cpu,
            status,
            stdout,
            stderr,
            timed_out,
        }
    }
}

/// Runs `cmd` to completion (at most `limit`).
pub fn run(cmd: Command, limit: Duration) -> Outcome {
    match spawn(cmd) {
        Ok(r) => r.finish(limit),
        Err(e) => Outcome {
            status: -1,
            stderr: format!("spawn failed: {e}"),
            ..Outcome::default()
        },
    }
}

/// Output of a quick helper command (git, uname, ...), trimmed; empty on failure.
pub fn capture(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
