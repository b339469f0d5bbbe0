//! Running one measured process: wall time, CPU time (its own rusage, not
//! the harness's), exit status and output, with a hard time limit.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Lines of a stream with the time each one arrived.
pub type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

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
    /// stderr line by line as it arrives (also returned whole by `finish`).
    pub err_lines: Lines,
    exited_flag: Arc<AtomicBool>,
    err: mpsc::Receiver<String>,
    exited: mpsc::Receiver<(Instant, i32, f64)>,
}

/// Spawns `cmd` with stdin closed and stdout/stderr piped. The child is
/// killed if the harness dies first (`PR_SET_PDEATHSIG`), so no measured
/// process outlives an interrupted run.
pub fn spawn(mut cmd: Command) -> std::io::Result<Running> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of ours; it
    // runs in the forked child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (etx, err) = mpsc::channel();
    let err_lines: Lines = Arc::default();
    let lines = err_lines.clone();
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = stderr {
            for line in BufReader::new(e).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).into_owned();
                s.push_str(&line);
                s.push('\n');
                lines
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((Instant::now(), line));
            }
        }
        let _ = etx.send(s);
    });
    let exited_flag = Arc::new(AtomicBool::new(false));
    let flag = exited_flag.clone();
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
        flag.store(true, Ordering::Release);
        let _ = xtx.send((end, code, cpu));
    });
    Ok(Running {
        pid,
        start,
        stdout,
        err_lines,
        exited_flag,
        err,
        exited,
    })
}

impl Running {
    /// Sends SIGKILL to the child.
    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    /// Sends `sig` to the child, unless it has already been reaped.
    pub fn signal(&self, sig: libc::c_int) {
        if self.exited() {
            return;
        }
        // SAFETY: kill(2) has no memory effects. The pid is our own child,
        // not yet reaped (checked just above; a zombie keeps its pid).
        unsafe {
            libc::kill(self.pid, sig);
        }
    }

    /// Whether the child has exited (and been reaped).
    pub fn exited(&self) -> bool {
        self.exited_flag.load(Ordering::Acquire)
    }

    /// The first stderr line containing `pat` (with its arrival time),
    /// waiting for it until `deadline` or the child's exit.
    pub fn wait_err(&self, pat: &str, deadline: Instant) -> Option<(Instant, String)> {
        let find = || {
            self.err_lines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(_, l)| l.contains(pat))
                .cloned()
        };
        loop {
            let done = self.exited();
            let found = find();
            if found.is_some() || Instant::now() >= deadline {
                return found;
            }
            if done {
                // One more look: the reader may lag the exit slightly.
                std::thread::sleep(Duration::from_millis(50));
                return find();
            }
            std::thread::sleep(Duration::from_millis(2));
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
