//! `file:DIR`: an arbiter on shared storage.
//!
//! Generation `g + 1` of VM `vm` is won by creating `DIR/<vm>/gen-<g+1>` with
//! `O_CREAT|O_EXCL`, writing the holder's name into it, and fsyncing the file
//! and then the directory. The current generation is the highest `gen-N`
//! present; its content is the holder. Nothing is ever deleted (deleting an
//! old `gen-N` would let a stale claimer win it again), and nothing is ever
//! locked (a frozen holder would keep a lock forever).
//!
//! `DIR` itself must exist: it is never created, so that an unmounted share
//! is an error rather than an empty local directory that grants generation 1
//! again. The storage must honour `O_EXCL` (local file systems, NFSv3+,
//! CephFS, GFS2/OCFS2 do).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::witness::sync_dir;
use super::{validate_name, Arbiter, ArbiterError, ClaimOutcome, Grant, MAX_NAME_LEN};

/// An arbiter on a shared directory.
#[derive(Clone, Debug)]
pub struct FileArbiter {
    dir: PathBuf,
}

/// `gen-N` for N > 0 written canonically (no sign, no leading zeros).
fn parse_gen_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("gen-")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl FileArbiter {
    /// The arbiter on `dir` (`file:DIR`). Nothing is touched until the first
    /// request.
    pub fn new(dir: &Path) -> Self {
        FileArbiter {
            dir: dir.to_path_buf(),
        }
    }

    /// The shared directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn check_base(&self) -> Result<(), ArbiterError> {
        match fs::metadata(&self.dir) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(ArbiterError::CorruptDir {
                path: self.dir.clone(),
                reason: "not a directory".into(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ArbiterError::CorruptDir {
                path: self.dir.clone(),
                reason: "the directory does not exist (is the shared storage mounted?)".into(),
            }),
            Err(e) => Err(ArbiterError::io("cannot reach", &self.dir, e)),
        }
    }

    /// The highest generation in `vm_dir` (0 if none or no directory).
    fn highest(&self, vm_dir: &Path) -> Result<u64, ArbiterError> {
        let entries = match fs::read_dir(vm_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(ArbiterError::io("cannot list", vm_dir, e)),
        };
        let mut highest = 0;
        for entry in entries {
            let entry = entry.map_err(|e| ArbiterError::io("cannot list", vm_dir, e))?;
            let name = entry.file_name();
            match name.to_str().and_then(parse_gen_name) {
                Some(g) => highest = highest.max(g),
                None => {
                    let name = name.to_string_lossy();
                    if name.starts_with("gen-") {
                        warn!(
                            "file arbiter: ignoring {} (not a generation file)",
                            vm_dir.join(&*name).display()
                        );
                    }
                }
            }
        }
        Ok(highest)
    }

    /// The holder recorded in `gen-<generation>`: `None` if it is empty (its
    /// creator crashed before writing) or unreadable as a name.
    fn holder(&self, vm_dir: &Path, generation: u64) -> Result<Option<String>, ArbiterError> {
        let path = vm_dir.join(format!("gen-{generation}"));
        let mut bytes = fs::read(&path).map_err(|e| ArbiterError::io("cannot read", &path, e))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Ok(None);
        }
        match String::from_utf8(bytes) {
            Ok(h) if validate_name("holder", &h).is_ok() => Ok(Some(h)),
            _ => {
                warn!(
                    "file arbiter: {} holds no valid holder name",
                    path.display()
                );
                Ok(None)
            }
        }
    }

    fn current(&self, vm_dir: &Path) -> Result<Grant, ArbiterError> {
        let generation = self.highest(vm_dir)?;
        if generation == 0 {
            return Ok(Grant::unclaimed());
        }
        Ok(Grant {
            generation,
            holder: self.holder(vm_dir, generation)?,
        })
    }

    /// Creates `DIR/<vm>` if needed, durably.
    fn ensure_vm_dir(&self, vm_dir: &Path) -> Result<(), ArbiterError> {
        match fs::create_dir(vm_dir) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(ArbiterError::io("cannot create", vm_dir, e)),
        }
    }
}

impl Arbiter for FileArbiter {
    fn query(&self, vm: &str) -> Result<Grant, ArbiterError> {
        validate_name("vm", vm)?;
        self.check_base()?;
        self.current(&self.dir.join(vm))
    }

    fn claim(&self, vm: &str, expected: u64, holder: &str) -> Result<ClaimOutcome, ArbiterError> {
        validate_name("vm", vm)?;
        validate_name("holder", holder)?;
        let Some(next) = expected.checked_add(1) else {
            return Err(ArbiterError::GenerationExhausted(expected));
        };
        self.check_base()?;
        let vm_dir = self.dir.join(vm);
        // Refuses if gen-(expected+1) or anything higher exists (and if the
        // generation is lower than expected: the CAS is exact).
        if self.highest(&vm_dir)? != expected {
            return Ok(ClaimOutcome::Refused(self.current(&vm_dir)?));
        }
        self.ensure_vm_dir(&vm_dir)?;
        let path = vm_dir.join(format!("gen-{next}"));
        let mut f = match OpenOptions::new()
            .write(true)
            .create_new(true) // O_CREAT | O_EXCL: the compare-and-set
            .mode(0o644)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Ok(ClaimOutcome::Refused(self.current(&vm_dir)?));
            }
            Err(e) => return Err(ArbiterError::io("cannot create", &path, e)),
        };
        // From here the generation is ours; an error below burns it (the
        // caller does not use it, nobody else can win it) and the next
        // claim must expect `next`.
        let mut content = String::with_capacity(MAX_NAME_LEN + 1);
        content.push_str(holder);
        content.push('\n');
        f.write_all(content.as_bytes())
            .map_err(|e| ArbiterError::io("cannot write", &path, e))?;
        f.sync_all()
            .map_err(|e| ArbiterError::io("cannot fsync", &path, e))?;
        drop(f);
        sync_dir(&vm_dir)?;
        info!("file arbiter: {vm} generation {next} granted to {holder}");
        Ok(ClaimOutcome::Granted(next))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::TempDir;
    use super::*;
    use std::sync::{Arc, Barrier};

    fn refused(g: u64, h: Option<&str>) -> ClaimOutcome {
        ClaimOutcome::Refused(Grant {
            generation: g,
            holder: h.map(String::from),
        })
    }

    #[test]
    fn gen_names() {
        assert_eq!(parse_gen_name("gen-1"), Some(1));
        assert_eq!(parse_gen_name("gen-18446744073709551615"), Some(u64::MAX));
        for bad in [
            "gen-",
            "gen-0",
            "gen-01",
            "gen-+1",
            "gen-1.tmp",
            "gen-x",
            "gen1",
            "gen-99999999999999999999",
        ] {
            assert_eq!(parse_gen_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn claim_query_and_files() {
        let dir = TempDir::new("file-basic");
        let a = FileArbiter::new(dir.path());
        assert_eq!(a.query("vm1").unwrap(), Grant::unclaimed());
        assert!(!dir.path().join("vm1").exists(), "query creates nothing");
        assert_eq!(a.claim("vm1", 1, "a").unwrap(), refused(0, None));
        assert!(!dir.path().join("vm1/gen-2").exists());
        assert_eq!(a.claim("vm1", 0, "a").unwrap(), ClaimOutcome::Granted(1));
        assert_eq!(a.claim("vm1", 0, "b").unwrap(), refused(1, Some("a")));
        assert_eq!(a.claim("vm1", 1, "b").unwrap(), ClaimOutcome::Granted(2));
        assert_eq!(a.claim("vm1", 2, "a").unwrap(), ClaimOutcome::Granted(3));
        assert_eq!(
            a.query("vm1").unwrap(),
            Grant {
                generation: 3,
                holder: Some("a".into())
            }
        );
        for (g, h) in [(1, "a"), (2, "b"), (3, "a")] {
            let p = dir.path().join(format!("vm1/gen-{g}"));
            assert_eq!(fs::read_to_string(p).unwrap(), format!("{h}\n"));
        }
        // Stale and future expectations are refused and create nothing.
        assert_eq!(a.claim("vm1", 1, "c").unwrap(), refused(3, Some("a")));
        assert_eq!(a.claim("vm1", 5, "c").unwrap(), refused(3, Some("a")));
        assert!(!dir.path().join("vm1/gen-6").exists());
        // A second instance (another host) sees the same.
        let b = FileArbiter::new(dir.path());
        assert_eq!(b.query("vm1").unwrap().generation, 3);
        assert_eq!(b.claim("vm1", 3, "c").unwrap(), ClaimOutcome::Granted(4));
        assert_eq!(a.query("vm1").unwrap().holder.as_deref(), Some("c"));
    }

    #[test]
    fn higher_generation_refuses_even_with_a_gap() {
        let dir = TempDir::new("file-gap");
        let a = FileArbiter::new(dir.path());
        assert_eq!(a.claim("vm1", 0, "a").unwrap(), ClaimOutcome::Granted(1));
        fs::write(dir.path().join("vm1/gen-5"), "x\n").unwrap();
        // gen-2 does not exist, but gen-5 does.
        assert_eq!(a.claim("vm1", 1, "b").unwrap(), refused(5, Some("x")));
        assert!(!dir.path().join("vm1/gen-2").exists());
        assert_eq!(a.claim("vm1", 5, "b").unwrap(), ClaimOutcome::Granted(6));
        // Files that are not canonical generation files are ignored.
        for junk in ["gen-007", "gen-9.tmp", "gen-x", "notes"] {
            fs::write(dir.path().join("vm1").join(junk), "y\n").unwrap();
        }
        assert_eq!(a.query("vm1").unwrap().generation, 6);
    }

    #[test]
    fn torn_generation_file_still_counts() {
        let dir = TempDir::new("file-torn");
        let a = FileArbiter::new(dir.path());
        assert_eq!(a.claim("vm1", 0, "a").unwrap(), ClaimOutcome::Granted(1));
        // A claimer created gen-2 and crashed before writing its name.
        fs::File::create(dir.path().join("vm1/gen-2")).unwrap();
        assert_eq!(
            a.query("vm1").unwrap(),
            Grant {
                generation: 2,
                holder: None
            }
        );
        assert_eq!(a.claim("vm1", 1, "b").unwrap(), refused(2, None));
        assert_eq!(a.claim("vm1", 2, "b").unwrap(), ClaimOutcome::Granted(3));
    }

    #[test]
    fn concurrent_claims_one_winner() {
        let dir = TempDir::new("file-race");
        const N: usize = 8;
        for round in 0..10u64 {
            let barrier = Arc::new(Barrier::new(N));
            let threads: Vec<_> = (0..N)
                .map(|i| {
                    // One arbiter per thread, as on separate hosts.
                    let a = FileArbiter::new(dir.path());
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        let holder = format!("h{i}");
                        barrier.wait();
                        (holder.clone(), a.claim("vm", round, &holder).unwrap())
                    })
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let winners: Vec<_> = results
                .iter()
                .filter(|(_, o)| *o == ClaimOutcome::Granted(round + 1))
                .map(|(h, _)| h.clone())
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            for (_, o) in &results {
                if let ClaimOutcome::Refused(g) = o {
                    // A loser may have read the file before its winner wrote
                    // its name; the generation is always right.
                    assert_eq!(g.generation, round + 1, "{results:?}");
                    if let Some(h) = &g.holder {
                        assert_eq!(h, &winners[0]);
                    }
                }
            }
            let content = fs::read_to_string(dir.path().join(format!("vm/gen-{}", round + 1)));
            assert_eq!(content.unwrap(), format!("{}\n", winners[0]));
        }
        let count = fs::read_dir(dir.path().join("vm")).unwrap().count();
        assert_eq!(count, 10, "exactly one file per generation");
    }

    #[test]
    fn errors() {
        let dir = TempDir::new("file-errors");
        let missing = FileArbiter::new(&dir.path().join("not-mounted"));
        let e = missing.claim("vm1", 0, "a").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!dir.path().join("not-mounted").exists(), "never created");
        assert!(missing.query("vm1").is_err());

        let a = FileArbiter::new(dir.path());
        for vm in ["..", ".", "a/b", "", "-x"] {
            assert!(
                matches!(a.claim(vm, 0, "h"), Err(ArbiterError::InvalidName { .. })),
                "{vm}"
            );
            assert!(
                matches!(a.query(vm), Err(ArbiterError::InvalidName { .. })),
                "{vm}"
            );
        }
        assert!(matches!(
            a.claim("vm1", 0, "a b"),
            Err(ArbiterError::InvalidName { .. })
        ));
        assert!(matches!(
            a.claim("vm1", u64::MAX, "a"),
            Err(ArbiterError::GenerationExhausted(_))
        ));
        // The VM path is a file, not a directory.
        fs::write(dir.path().join("vm2"), "").unwrap();
        assert!(matches!(
            a.claim("vm2", 0, "a"),
            Err(ArbiterError::Io { .. })
        ));
    }
}
