//! `tandem log inspect FILE [--json]`: what a record/replay log holds.
//!
//! [`inspect`] reads the whole log and computes an [`InspectReport`];
//! [`render`] turns it into text (aligned columns) or one JSON object.
//! A damaged log is reported up to the damage: a torn tail (the recorder
//! was killed mid-write) is a warning, corruption is an error.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use tandem_replay::log::{EndOutcome, LogError, LogFile, Record, VmIdentity};
use tandem_replay::Cause;

/// Exit status for a log with a torn tail (readable up to its last watermark).
pub const EXIT_LOG_TORN: u8 = 4;
/// Exit status for a corrupt log, or one that cannot be read.
pub const EXIT_LOG_CORRUPT: u8 = 5;

/// Record kinds, in kind-number order (kind 1 first).
pub const KINDS: [&str; 6] = [
    "cause",
    "watermark",
    "sync_point",
    "epoch_end",
    "check",
    "end",
];
/// Cause types, in declaration order.
pub const CAUSES: [&str; 4] = ["time", "serial_input", "net_rx", "block_done"];

/// Records of one kind or cause type: frames, frame bytes (8-byte frame
/// header included) and payload bytes (serial input, net frame, block data,
/// sync-point pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
    pub payload: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64, payload: u64) {
        self.count += 1;
        self.bytes += bytes;
        self.payload += payload;
    }
}

/// What the records hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Per record kind, indexed like [`KINDS`].
    pub kinds: [Tally; 6],
    /// Per cause type, indexed like [`CAUSES`].
    pub causes: [Tally; 4],
    pub first_stop: Option<u64>,
    pub last_stop: Option<u64>,
    /// Pages carried by all sync points.
    pub sync_pages: u64,
    /// Pages listed as dirtied by all epoch ends.
    pub epoch_pages: u64,
    pub end: Option<(u64, EndOutcome)>,
    pub first_time_ns: Option<u64>,
    pub last_time_ns: Option<u64>,
}

impl Stats {
    fn add(&mut self, record: &Record, bytes: u64) {
        let stop = record.stop();
        self.first_stop.get_or_insert(stop);
        self.last_stop = Some(self.last_stop.map_or(stop, |s| s.max(stop)));
        let (kind, payload) = match record {
            Record::Cause { cause, .. } => {
                let (i, payload) = match cause {
                    Cause::Time(ns) => {
                        self.first_time_ns.get_or_insert(*ns);
                        self.last_time_ns = Some(*ns);
                        (0, 0)
                    }
                    Cause::SerialInput(b) => (1, b.len()),
                    Cause::NetRx { frame, .. } => (2, frame.len()),
                    Cause::BlockDone { data, .. } => (3, data.len()),
                };
                self.causes[i].add(bytes, payload as u64);
                (0, payload)
            }
            Record::Watermark { .. } => (1, 0),
            Record::SyncPoint { pages, .. } => {
                self.sync_pages += pages.len() as u64;
                (2, pages.iter().map(|p| p.data.len()).sum())
            }
            Record::EpochEnd { pages, .. } => {
                self.epoch_pages += pages.iter().map(|&(_, n)| u64::from(n)).sum::<u64>();
                (3, 0)
            }
            Record::Check { .. } => (4, 0),
            Record::End { stop, outcome } => {
                self.end = Some((*stop, outcome.clone()));
                (5, 0)
            }
        };
        self.kinds[kind].add(bytes, payload as u64);
    }

    /// All records together.
    pub fn total(&self) -> Tally {
        let mut total = Tally::default();
        for t in &self.kinds {
            (total.count, total.bytes) = (total.count + t.count, total.bytes + t.bytes);
            total.payload += t.payload;
        }
        total
    }
}

/// How the log is damaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// The log ends inside a frame: a warning.
    TornTail,
    /// A whole frame is wrong: an error.
    Corrupt,
    /// Reading failed: an error.
    Io,
}

impl DamageKind {
    /// `torn_tail`, `corrupt` or `io`.
    pub fn name(self) -> &'static str {
        match self {
            DamageKind::TornTail => "torn_tail",
            DamageKind::Corrupt => "corrupt",
            DamageKind::Io => "io",
        }
    }

    /// A torn tail is a warning (the log replays up to its last watermark);
    /// the rest are errors.
    pub fn severity(self) -> &'static str {
        match self {
            DamageKind::TornTail => "warning",
            _ => "error",
        }
    }
}

/// Where and why reading stopped early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub kind: DamageKind,
    /// Byte offset of the damaged frame.
    pub offset: u64,
    /// Its record number (1 is the first record after the header).
    pub record: u64,
    pub message: String,
}

/// Everything `tandem log inspect` says about one log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectReport {
    pub path: String,
    pub identity: VmIdentity,
    /// The file's length.
    pub file_bytes: u64,
    /// Magic, protocol version and the identity frame.
    pub header_bytes: u64,
    /// Bytes up to the end of the last good record.
    pub valid_bytes: u64,
    /// The highest watermark: replay may run up to and including it.
    pub watermark: Option<u64>,
    pub stats: Stats,
    pub damage: Option<Damage>,
}

impl InspectReport {
    /// True when reading stopped at a torn tail or corruption.
    pub fn damaged(&self) -> bool {
        self.damage.is_some()
    }

    /// 0, [`EXIT_LOG_TORN`] or [`EXIT_LOG_CORRUPT`].
    pub fn exit_code(&self) -> u8 {
        match &self.damage {
            _ if !self.damaged() => 0,
            Some(d) if d.kind == DamageKind::TornTail => EXIT_LOG_TORN,
            _ => EXIT_LOG_CORRUPT,
        }
    }

    /// Guest time from the first to the last `Cause::Time`, in seconds.
    pub fn guest_seconds(&self) -> Option<f64> {
        let ns = self
            .stats
            .last_time_ns?
            .checked_sub(self.stats.first_time_ns?)?;
        (ns > 0).then(|| ns as f64 / 1e9)
    }

    /// Log bytes per second of guest time.
    pub fn bytes_per_second(&self) -> Option<f64> {
        Some(self.file_bytes as f64 / self.guest_seconds()?)
    }

    /// The same, in Mbit/s (10^6 bits), as VMware FT quotes logging bandwidth.
    pub fn mbit_per_second(&self) -> Option<f64> {
        Some(self.bytes_per_second()? * 8.0 / 1e6)
    }

    fn ending(&self) -> String {
        match (&self.stats.end, self.watermark) {
            (Some((stop, outcome)), _) => format!("{} at stop {stop}", outcome_str(outcome)),
            (None, Some(w)) => format!(
                "no End record (recording was cut short; replay stops at the last watermark {w})"
            ),
            (None, None) => {
                "no End record (recording was cut short; no watermark: nothing replays)".into()
            }
        }
    }
}

/// Reads the log at `path`. Damage after the header is part of the report;
/// an unreadable file or header is an error.
pub fn inspect(path: &Path) -> anyhow::Result<InspectReport> {
    let file_bytes = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    let (mut reader, identity) =
        LogFile::open(path).with_context(|| format!("cannot read log {}", path.display()))?;
    let header_bytes = reader.offset();
    let mut stats = Stats::default();
    let mut damage = None;
    loop {
        let before = reader.offset();
        match reader.next() {
            None => break,
            Some(Ok(record)) => stats.add(&record, reader.offset() - before),
            Some(Err(e)) => {
                let (kind, offset, record) = match e {
                    LogError::TornTail { offset, record, .. } => {
                        (DamageKind::TornTail, offset, record)
                    }
                    LogError::Corrupt { offset, record, .. } => {
                        (DamageKind::Corrupt, offset, record)
                    }
                    _ => (DamageKind::Io, before, reader.next_record_number()),
                };
                let message = e.to_string();
                damage = Some(Damage {
                    kind,
                    offset,
                    record,
                    message,
                });
                break;
            }
        }
    }
    Ok(InspectReport {
        path: path.display().to_string(),
        identity,
        file_bytes,
        header_bytes,
        valid_bytes: reader.offset(),
        watermark: reader.watermark(),
        stats,
        damage,
    })
}

/// Inspects, prints, and maps the result to the process exit status.
pub fn run(path: &Path, json: bool) -> ExitCode {
    match inspect(path) {
        Ok(report) => {
            print!("{}", render(&report, json));
            if let Some(d) = &report.damage {
                eprintln!("tandem: {}: {}", d.kind.severity(), d.message);
            }
            ExitCode::from(report.exit_code())
        }
        Err(e) => {
            eprintln!("tandem: {e:#}");
            ExitCode::from(EXIT_LOG_CORRUPT)
        }
    }
}

fn outcome_str(o: &EndOutcome) -> String {
    match o {
        EndOutcome::GuestExit(code) => format!("guest exit {code}"),
        EndOutcome::Reset => "reset".into(),
        EndOutcome::Crashed(why) => format!("crashed: {why}"),
        EndOutcome::Stopped => "stopped".into(),
    }
}

/// `1023 B`, `1.5 KiB`, `3.0 MiB`, `2.0 GiB`.
pub fn human(bytes: u64) -> String {
    let (mut v, mut unit) = (bytes as f64, "B");
    for u in ["KiB", "MiB", "GiB", "TiB"] {
        if v < 1024.0 {
            break;
        }
        (v, unit) = (v / 1024.0, u);
    }
    match unit {
        "B" => format!("{bytes} B"),
        _ => format!("{v:.1} {unit}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The report as text (`json` false) or as one JSON object; ends in a newline.
pub fn render(r: &InspectReport, json: bool) -> String {
    if json {
        render_json(r)
    } else {
        render_text(r)
    }
}

fn render_text(r: &InspectReport) -> String {
    let (id, s) = (&r.identity, &r.stats);
    let devices: Vec<String> = id
        .devices
        .iter()
        .map(|d| format!("{} ({})", d.kind, d.detail))
        .collect();
    let (n, v) = (id.cpuid.len(), id.device_model_version);
    let mut o = String::new();
    let header = [
        (
            "log",
            format!(
                "{}  ({}, header {})",
                r.path,
                human(r.file_bytes),
                human(r.header_bytes)
            ),
        ),
        (
            "image",
            format!("{}  sha256 {}…", id.image_name, hex(&id.image_hash[..6])),
        ),
        ("cmdline", id.cmdline.clone()),
        ("memory", human(id.mem_size)),
        ("devices", devices.join(", ")),
        (
            "cpu",
            format!(
                "{n} CPUID entries, {} MSRs, TSC {} kHz",
                id.msrs.len(),
                id.tsc_khz
            ),
        ),
        ("devices v", format!("device model version {v}")),
    ];
    rows(&mut o, &header);
    let total = s.total();
    let kinds = KINDS.iter().zip(&s.kinds).chain([(&"total", &total)]);
    table(&mut o, "records", kinds);
    table(&mut o, "causes", CAUSES.iter().zip(&s.causes));
    let sync = &s.kinds[2];
    let guest = match (r.guest_seconds(), r.bytes_per_second(), r.mbit_per_second()) {
        (Some(secs), Some(bps), Some(mbit)) => {
            format!("{secs:.3} s; {}/s = {mbit:.3} Mbit/s", human(bps as u64))
        }
        _ => "unknown (fewer than two distinct Time causes)".into(),
    };
    let stops = match (s.first_stop, s.last_stop) {
        (Some(a), Some(b)) => format!("{a} .. {b}, last watermark {}", opt(r.watermark)),
        _ => "none".into(),
    };
    o.push('\n');
    let mut tail = vec![
        ("stops", stops),
        (
            "sync points",
            format!(
                "{} ({} pages, {})",
                sync.count,
                s.sync_pages,
                human(sync.bytes)
            ),
        ),
        (
            "epochs",
            format!("{} ({} pages dirtied)", s.kinds[3].count, s.epoch_pages),
        ),
        ("checks", s.kinds[4].count.to_string()),
        ("end", r.ending()),
        ("guest time", guest),
    ];
    if let Some(d) = &r.damage {
        tail.push(("damage", format!("{}: {}", d.kind.severity(), d.message)));
    }
    rows(&mut o, &tail);
    o
}

fn rows(o: &mut String, rows: &[(&str, String)]) {
    for (label, value) in rows {
        let _ = writeln!(o, "{label:<12}{value}");
    }
}

fn table<'a>(o: &mut String, title: &str, rows: impl Iterator<Item = (&'a &'a str, &'a Tally)>) {
    let _ = writeln!(
        o,
        "\n{title:<14}{:>10}{:>12}{:>12}",
        "count", "bytes", "payload"
    );
    for (name, t) in rows {
        let payload = if t.payload > 0 {
            human(t.payload)
        } else {
            "-".into()
        };
        let (name, bytes) = (name.replace('_', " "), human(t.bytes));
        let _ = writeln!(o, "  {name:<12}{:>10}{bytes:>12}{payload:>12}", t.count);
    }
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("none".into(), |v| v.to_string())
}

/// A JSON value: `null` for None.
fn optj<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("null".into(), |v| v.to_string())
}

/// A JSON string literal.
fn js(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out + "\""
}

/// `obj! { "key": json, ... }`: a JSON object from values that display as JSON.
macro_rules! obj {
    ($($k:literal: $v:expr),* $(,)?) => {
        format!("{{{}}}", [$(format!("\"{}\":{}", $k, $v)),*].join(","))
    };
}

fn tallies<'a>(rows: impl Iterator<Item = (&'a &'a str, &'a Tally)>) -> String {
    let fields: Vec<String> = rows
        .map(|(k, t)| {
            format!(
                "{}:{}",
                js(k),
                obj! { "count": t.count, "bytes": t.bytes, "payload": t.payload }
            )
        })
        .collect();
    format!("{{{}}}", fields.join(","))
}

fn render_json(r: &InspectReport) -> String {
    let (id, s) = (&r.identity, &r.stats);
    let devices: Vec<String> = id
        .devices
        .iter()
        .map(|d| obj! { "kind": js(&d.kind), "detail": js(&d.detail) })
        .collect();
    let end = s
        .end
        .as_ref()
        .map(|(stop, o)| obj! { "stop": stop, "outcome": js(&outcome_str(o)) });
    let damage = r.damage.as_ref().map(|d| {
        obj! {
            "kind": js(d.kind.name()), "severity": js(d.kind.severity()),
            "offset": d.offset, "record": d.record, "message": js(&d.message),
        }
    });
    let total = s.total();
    let report = obj! {
        "file": js(&r.path), "file_bytes": r.file_bytes, "header_bytes": r.header_bytes,
        "valid_bytes": r.valid_bytes,
        "identity": obj! {
            "image_name": js(&id.image_name), "image_hash": js(&hex(&id.image_hash)),
            "cmdline": js(&id.cmdline), "mem_size": id.mem_size,
            "devices": format!("[{}]", devices.join(",")), "cpuid_entries": id.cpuid.len(),
            "msrs": id.msrs.len(), "device_model_version": id.device_model_version,
            "tsc_khz": id.tsc_khz,
        },
        "records": tallies(KINDS.iter().zip(&s.kinds).chain([(&"total", &total)])),
        "causes": tallies(CAUSES.iter().zip(&s.causes)),
        "stops": obj! {
            "first": optj(s.first_stop), "last": optj(s.last_stop), "watermark": optj(r.watermark),
        },
        "sync_points": obj! {
            "count": s.kinds[2].count, "pages": s.sync_pages, "bytes": s.kinds[2].bytes,
        },
        "epochs": obj! { "count": s.kinds[3].count, "pages": s.epoch_pages },
        "checks": s.kinds[4].count, "end": optj(end), "ending": js(&r.ending()),
        "guest_time": obj! {
            "first_ns": optj(s.first_time_ns), "last_ns": optj(s.last_time_ns),
            "seconds": optj(r.guest_seconds()), "bytes_per_second": optj(r.bytes_per_second()),
            "mbit_per_second": optj(r.mbit_per_second()),
        },
        "damage": optj(damage),
    };
    report + "\n"
}
