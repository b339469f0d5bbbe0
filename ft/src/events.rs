//! The event journal, `state_dir/events.log`: one line per generation won,
//! takeover or fencing, appended and fsynced before the act it records.
//!
//! It is capped: when a line would take it past [`CAP`] bytes it becomes
//! `events.log.1` (replacing the one before) and a new file starts, so the
//! journal keeps at least the last `CAP` bytes of events and never more
//! than twice that. A new file's directory entry is fsynced too, so the
//! journal survives a power cut right after it was created.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

/// The largest `events.log` before it is rotated, bytes.
pub const CAP: u64 = 1 << 20;

/// The journal's file name in the state directory.
pub const FILE: &str = "events.log";

/// Appends `line` (newline-ended) to the journal in `dir`.
pub fn append(dir: &Path, line: &str) -> io::Result<()> {
    append_capped(dir, line, CAP)
}

fn append_capped(dir: &Path, line: &str, cap: u64) -> io::Result<()> {
    if !dir.exists() {
        std::fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    let path = dir.join(FILE);
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let mut created = size == 0 && !path.exists();
    if size > 0 && size + line.len() as u64 > cap {
        std::fs::rename(&path, dir.join(format!("{FILE}.1")))?;
        created = true;
    }
    let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
    if created {
        sync_dir(dir)?;
    }
    f.write_all(line.as_bytes())?;
    f.sync_data()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_journal_rotates_at_its_cap_and_keeps_the_last_lines() {
        let dir = std::env::temp_dir()
            .join(format!("tandem-events-{}", std::process::id()))
            .join("state");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
        for i in 0..100 {
            append_capped(&dir, &format!("event {i:03}\n"), 100).unwrap();
        }
        let now = std::fs::read_to_string(dir.join(FILE)).unwrap();
        let before = std::fs::read_to_string(dir.join(format!("{FILE}.1"))).unwrap();
        assert!(
            now.len() <= 100 && before.len() <= 100,
            "{now:?} {before:?}"
        );
        assert!(now.ends_with("event 099\n"), "{now:?}");
        // Nothing between the two files is lost.
        let first_now: u32 = now[6..9].parse().unwrap();
        let last_before: u32 = before
            .trim_end()
            .rsplit(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(first_now, last_before + 1);
        let entries = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(entries, 2, "only the journal and one rotated file");
        let _ = std::fs::remove_dir_all(dir.parent().unwrap());
    }
}
