//! `tandem disk`: compare mirrored replicas.
//!
//! `tandem disk verify A B` compares two replicas range by range by a
//! 64-bit hash (xxh3, the hash the log carries for mirrored reads) and
//! names the first range that differs. Either side may be the image itself
//! or the output of `tandem disk hashes IMAGE` run on the other host, so
//! replicas on two hosts are compared without copying either:
//!
//! ```text
//! ssh hostb tandem disk hashes /srv/b/web1.img > b.hashes
//! tandem disk verify /srv/a/web1.img b.hashes
//! ```

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tandem_vmm::backend::replica::data_hash;

/// First line of a hash list.
const HASHES_MAGIC: &str = "tandem-disk-hashes v1";

/// `tandem disk ...`.
#[derive(clap::Subcommand)]
pub enum DiskCommand {
    /// Compare two replicas range by range; exit 0 if identical, 1 if not.
    Verify {
        /// A replica image, or a hash list from `tandem disk hashes`.
        a: PathBuf,
        /// The other replica, or its hash list.
        b: PathBuf,
        /// Bytes per compared range (K, M or G suffix).
        #[arg(long, default_value = "1M", value_parser = parse_range)]
        range: u64,
    },
    /// Print one hash per range of an image, for `tandem disk verify` on
    /// another host.
    Hashes {
        /// The replica image.
        image: PathBuf,
        /// Bytes per range.
        #[arg(long, default_value = "1M", value_parser = parse_range)]
        range: u64,
    },
}

fn parse_range(text: &str) -> Result<u64, String> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 1M"))?;
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" | "m" => 20,
        "G" | "g" => 30,
        _ => return Err(format!("{text:?}: unknown unit (K, M or G)")),
    };
    let bytes = n << shift;
    if bytes < 4096 || bytes % 512 != 0 {
        return Err(format!(
            "{text:?}: a range must be at least 4K and whole sectors"
        ));
    }
    Ok(bytes)
}

/// One side of a comparison: its size and per-range hashes.
struct Hashes {
    size: u64,
    range: u64,
    hashes: Vec<u64>,
}

/// Hashes `image` in ranges of `range` bytes, showing progress on stderr
/// for large images.
fn hash_image(image: &Path, range: u64) -> anyhow::Result<Hashes> {
    let mut f = File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let size = f.metadata()?.len();
    let mut buf = vec![0u8; range as usize];
    let mut hashes = Vec::new();
    let (started, mut shown) = (Instant::now(), Instant::now());
    let mut done = 0u64;
    while done < size {
        let want = range.min(size - done) as usize;
        f.read_exact(&mut buf[..want])
            .with_context(|| format!("reading {} at byte {done}", image.display()))?;
        hashes.push(data_hash(&buf[..want]));
        done += want as u64;
        if shown.elapsed() >= Duration::from_secs(1) {
            shown = Instant::now();
            eprintln!(
                "tandem: {}: {} / {} MiB hashed ({:.0} MiB/s)",
                image.display(),
                done >> 20,
                size >> 20,
                done as f64 / started.elapsed().as_secs_f64() / f64::from(1u32 << 20)
            );
        }
    }
    Ok(Hashes {
        size,
        range,
        hashes,
    })
}

/// Reads a hash list written by `tandem disk hashes`.
fn read_hash_list(path: &Path, first: &str, rest: impl BufRead) -> anyhow::Result<Hashes> {
    let bad = |why: &str| anyhow::anyhow!("{}: {why}", path.display());
    let field = |key: &str| -> anyhow::Result<u64> {
        first
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(&format!("header has no {key}=")))
    };
    let (size, range) = (field("size")?, field("range")?);
    if range == 0 {
        return Err(bad("range=0"));
    }
    let mut hashes = Vec::new();
    for (i, line) in rest.lines().enumerate() {
        let line = line?;
        let hash = u64::from_str_radix(line.trim(), 16)
            .map_err(|_| bad(&format!("line {} is not a hash: {line:?}", i + 2)))?;
        hashes.push(hash);
    }
    if hashes.len() as u64 != size.div_ceil(range) {
        return Err(bad(&format!(
            "{} hashes for {size} bytes in ranges of {range}: the list is cut short",
            hashes.len()
        )));
    }
    Ok(Hashes {
        size,
        range,
        hashes,
    })
}

/// An image or a hash list, hashed in ranges of `range`.
fn load(path: &Path, range: u64) -> anyhow::Result<Hashes> {
    let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = BufReader::new(f);
    let mut head = [0u8; HASHES_MAGIC.len()];
    let is_list = reader.read_exact(&mut head).is_ok() && head == HASHES_MAGIC.as_bytes();
    if !is_list {
        return hash_image(path, range);
    }
    let mut first = String::new();
    reader.read_line(&mut first)?;
    read_hash_list(path, &first, reader)
}

/// What comparing two sides found.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Identical { size: u64, ranges: usize },
    SizesDiffer(u64, u64),
    Differ { first: usize, count: usize },
}

fn compare(a: &Hashes, b: &Hashes) -> anyhow::Result<Verdict> {
    if a.range != b.range {
        bail!(
            "the two sides are hashed in ranges of {} and {} bytes: give the same --range",
            a.range,
            b.range
        );
    }
    if a.size != b.size {
        return Ok(Verdict::SizesDiffer(a.size, b.size));
    }
    let differing: Vec<usize> = a
        .hashes
        .iter()
        .zip(&b.hashes)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    Ok(match differing.first() {
        None => Verdict::Identical {
            size: a.size,
            ranges: a.hashes.len(),
        },
        Some(&first) => Verdict::Differ {
            first,
            count: differing.len(),
        },
    })
}

/// Runs `tandem disk ...`.
pub fn run(command: DiskCommand) -> ExitCode {
    let result = match command {
        DiskCommand::Verify { a, b, range } => verify(&a, &b, range),
        DiskCommand::Hashes { image, range } => hashes(&image, range).map(|()| ExitCode::SUCCESS),
    };
    result.unwrap_or_else(|e| {
        eprintln!("tandem: {e:#}");
        ExitCode::from(2)
    })
}

fn verify(a: &Path, b: &Path, range: u64) -> anyhow::Result<ExitCode> {
    let (ha, hb) = (load(a, range)?, load(b, range)?);
    match compare(&ha, &hb)? {
        Verdict::Identical { size, ranges } => {
            println!("identical: {size} bytes in {ranges} ranges of {}", ha.range);
            Ok(ExitCode::SUCCESS)
        }
        Verdict::SizesDiffer(x, y) => {
            println!(
                "differ: {} has {x} bytes, {} has {y}",
                a.display(),
                b.display()
            );
            Ok(ExitCode::from(1))
        }
        Verdict::Differ { first, count } => {
            let start = first as u64 * ha.range;
            let end = (start + ha.range).min(ha.size);
            println!(
                "differ: first in range {first} (bytes {start}..{end}, sectors {}..{}); {count} of {} ranges differ",
                start / 512,
                end.div_ceil(512),
                ha.hashes.len()
            );
            Ok(ExitCode::from(1))
        }
    }
}

fn hashes(image: &Path, range: u64) -> anyhow::Result<()> {
    let h = hash_image(image, range)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{HASHES_MAGIC} size={} range={}", h.size, h.range)?;
    for hash in h.hashes {
        writeln!(out, "{hash:016x}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_and_hash_lists_compare_range_by_range() {
        let dir = std::env::temp_dir().join(format!("tandem-disk-verify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        let mut data = vec![7u8; 40 << 10];
        std::fs::write(&a, &data).unwrap();
        std::fs::write(&b, &data).unwrap();
        let ha = load(&a, 8 << 10).unwrap();
        assert_eq!(
            compare(&ha, &load(&b, 8 << 10).unwrap()).unwrap(),
            Verdict::Identical {
                size: 40 << 10,
                ranges: 5
            }
        );
        data[(17 << 10) + 3] = 8;
        data[(39 << 10) + 1] = 8;
        std::fs::write(&b, &data).unwrap();
        // b as a hash list, as `tandem disk hashes` prints it on the other host.
        let hb = hash_image(&b, 8 << 10).unwrap();
        let mut list = format!("{HASHES_MAGIC} size={} range={}\n", hb.size, hb.range);
        for h in &hb.hashes {
            list += &format!("{h:016x}\n");
        }
        let listed = dir.join("b.hashes");
        std::fs::write(&listed, &list).unwrap();
        assert_eq!(
            compare(&ha, &load(&listed, 8 << 10).unwrap()).unwrap(),
            Verdict::Differ { first: 2, count: 2 }
        );
        // A cut-short list, another range, another size: clear answers.
        std::fs::write(&listed, &list[..list.len() - 17]).unwrap();
        let e = load(&listed, 8 << 10).err().unwrap().to_string();
        assert!(e.contains("cut short"), "{e}");
        assert!(compare(&ha, &load(&b, 4 << 10).unwrap()).is_err());
        std::fs::write(&b, &data[..32 << 10]).unwrap();
        assert_eq!(
            compare(&ha, &load(&b, 8 << 10).unwrap()).unwrap(),
            Verdict::SizesDiffer(40 << 10, 32 << 10)
        );
        assert!(parse_range("1M").is_ok() && parse_range("100").is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
