//! What every measurement needs: paths, mode, CPU pinning and progress.

use std::cell::Cell;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// The benchmark run's settings and progress counter.
pub struct Ctx {
    /// The workspace root.
    pub root: PathBuf,
    pub tandem: PathBuf,
    pub guests: PathBuf,
    /// A private temporary directory (removed at the end).
    pub tmp: PathBuf,
    pub quick: bool,
    /// The CPU the measured VMM runs on (`taskset -c`).
    pub cpu: usize,
    /// The CPU of a pair's secondary (and its witness): the next allowed
    /// CPU, or `cpu` on a one-CPU machine.
    pub cpu2: usize,
    /// Runs done / planned, for the progress lines.
    pub done: Cell<usize>,
    pub planned: Cell<usize>,
    pub started: Instant,
}

impl Ctx {
    /// `taskset -c CPU program`: the measured process, pinned.
    pub fn pinned(&self, program: &str) -> Command {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", &self.cpu.to_string(), program]);
        cmd
    }

    /// A guest image path.
    pub fn guest(&self, name: &str) -> PathBuf {
        self.guests.join(format!("{name}.elf"))
    }

    /// Repetitions for a measurement: quick mode uses fewer.
    pub fn reps(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }

    /// One progress line on stderr.
    pub fn progress(&self, what: &str) {
        self.done.set(self.done.get() + 1);
        let (done, planned) = (self.done.get(), self.planned.get().max(self.done.get()));
        let t = self.started.elapsed().as_secs_f64();
        eprintln!("[{done:>3}/{planned:<3} {t:>6.1}s] {what}");
    }

    /// A note on stderr that is not a measurement.
    pub fn note(&self, what: &str) {
        let t = self.started.elapsed().as_secs_f64();
        eprintln!("[        {t:>6.1}s] {what}");
    }
}

/// A temporary raw disk image of `bytes` zero bytes.
pub fn make_image(path: &std::path::Path, bytes: u64) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(bytes)
}
