//! `tandem log inspect FILE [--json]`: what a record/replay log holds.
//!
//! [`inspect`] reads the whole log into an [`InspectReport`]; [`render`]
//! turns it into aligned text or one JSON object. A damaged log is reported
//! up to the damage: a torn tail is a warning, corruption an error.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use tandem_replay::log::{EndOutcome, LogError, LogFile, Record, VmIdentity};
use tandem_replay::Cause;

/// Exit status for a torn tail: as for a replay that stopped at the cut.
pub const EXIT_LOG_TORN: u8 = crate::EXIT_REPLAY_TRUNCATED;
/// Exit status for a corrupt log, or one that cannot be read at all.
pub const EXIT_LOG_CORRUPT: u8 = 1;

/// Record kinds, in kind-number order (kind 1 first).
pub const KINDS: [&str; 7] = [
    "cause",
    "watermark",
    "sync_point",
    "epoch_end",
    "check",
    "end",
    "positioned",
];
/// Cause types, in declaration order.
pub const CAUSES: [&str; 4] = ["time", "serial_input", "net_rx", "block_done"];

/// Records of one kind or cause type: frames, frame bytes (the 8-byte frame
/// header included) and payload bytes (serial input, net frames, block
/// data, sync-point pages).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub count: u64,
    pub bytes: u64,
    pub payload: u64,
}

impl Tally {
    fn add(&mut self, bytes: u64, payload: usize) {
        (self.count, self.bytes) = (self.count + 1, self.bytes + bytes);
        self.payload += payload as u64;
    }
}

/// What the records hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Per record kind, indexed like [`KINDS`].
    pub kinds: [Tally; 7],
    /// Per cause type, indexed like [`CAUSES`].
    pub causes: [Tally; 4],
    pub first_stop: Option<u64>,
    pub last_stop: Option<u64>,
    /// Pages carried by the sync points.
    pub sync_pages: u64,
    /// Pages the epoch ends list as dirtied.
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
                    Cause::BlockReadHashed { .. } => (3, 0),
                };
                self.causes[i].add(bytes, payload);
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
            Record::Positioned { .. } => (6, 0),
        };
        self.kinds[kind].add(bytes, payload);
    }

    /// All records together.
    pub fn total(&self) -> Tally {
        self.kinds.iter().fold(Tally::default(), |a, t| Tally {
            count: a.count + t.count,
            bytes: a.bytes + t.bytes,
            payload: a.payload + t.payload,
        })
    }
}

/// Where and why reading stopped early.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// `torn_tail` (a warning: replay runs up to the last watermark),
    /// `corrupt` or `io` (errors).
    pub kind: &'static str,
    /// Byte offset of the damaged frame.
    pub offset: u64,
    /// Its record number (1 is the first record after the header).
    pub record: u64,
    pub message: String,
}

impl Damage {
    /// `warning` for a torn tail, `error` otherwise.
    pub fn severity(&self) -> &'static str {
        match self.kind {
            "torn_tail" => "warning",
            _ => "error",
        }
    }
}

/// Everything `tandem log inspect` says about one log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectReport {
    pub path: String,
    pub identity: VmIdentity,
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
            Some(d) if d.kind == "torn_tail" => EXIT_LOG_TORN,
            _ => EXIT_LOG_CORRUPT,
        }
    }

    /// Guest time from the first to the last `Cause::Time`, in seconds.
    pub fn guest_seconds(&self) -> Option<f64> {
        let (first, last) = (self.stats.first_time_ns?, self.stats.last_time_ns?);
        let ns = last.checked_sub(first)?;
        (ns > 0).then(|| ns as f64 / 1e9)
    }

    /// Log bytes per second of guest time.
    pub fn bytes_per_second(&self) -> Option<f64> {
        Some(self.file_bytes as f64 / self.guest_seconds()?)
    }

    /// The same in Mbit/s (10^6 bits), as VMware FT quotes logging bandwidth.
    pub fn mbit_per_second(&self) -> Option<f64> {
        Some(self.bytes_per_second()? * 8.0 / 1e6)
    }

    /// How the recording ended, or where replay of a cut-short one stops.
    pub fn ending(&self) -> String {
        let cut = "no End record (recording was cut short;";
        match (&self.stats.end, self.watermark) {
            (Some((stop, outcome)), _) => format!("{} at stop {stop}", outcome_str(outcome)),
            (None, Some(w)) => format!("{cut} replay stops at the last watermark {w})"),
            (None, None) => format!("{cut} no watermark, so nothing replays)"),
        }
    }
}

/// Reads the log at `path`. Damage after the header is part of the report;
/// a file or header that cannot be read is an error.
pub fn inspect(path: &Path) -> anyhow::Result<InspectReport> {
    let what = || format!("cannot read log {}", path.display());
    let file_bytes = std::fs::metadata(path).with_context(what)?.len();
    let (mut reader, identity) = LogFile::open(path).with_context(what)?;
    let header_bytes = reader.offset();
    let mut stats = Stats::default();
    let damage = loop {
        let before = reader.offset();
        match reader.next() {
            None => break None,
            Some(Ok(record)) => stats.add(&record, reader.offset() - before),
            Some(Err(e)) => {
                let (kind, offset, record) = match e {
                    LogError::TornTail { offset, record, .. } => ("torn_tail", offset, record),
                    LogError::Corrupt { offset, record, .. } => ("corrupt", offset, record),
                    _ => ("io", before, reader.next_record_number()),
                };
                let message = e.to_string();
                break Some(Damage {
                    kind,
                    offset,
                    record,
                    message,
                });
            }
        }
    };
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

/// `tandem log inspect`: inspects, prints the report to stdout and any
/// damage to stderr, and returns the exit status.
pub fn run(path: &Path, json: bool) -> ExitCode {
    match inspect(path) {
        Ok(report) => {
            print!("{}", render(&report, json));
            if let Some(d) = &report.damage {
                eprintln!("tandem: {}: {}", d.severity(), d.message);
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

/// The report as text, or as one JSON object; ends in a newline.
pub fn render(r: &InspectReport, json: bool) -> String {
    if json {
        render_json(r)
    } else {
        render_text(r)
    }
}

fn render_text(r: &InspectReport) -> String {
    let (id, s, mut o) = (&r.identity, &r.stats, String::new());
    let devices: Vec<String> = id
        .devices
        .iter()
        .map(|d| format!("{} ({})", d.kind, d.detail))
        .collect();
    let (size, header) = (human(r.file_bytes), human(r.header_bytes));
    let (name, hash) = (&id.image_name, hex(&id.image_hash[..6]));
    let (path, cpuid, msrs, tsc) = (&r.path, id.cpuid.len(), id.msrs.len(), id.tsc_khz);
    let model = id.device_model_version;
    let head = [
        ("log", format!("{path}  ({size}, header {header})")),
        ("image", format!("{name}  sha256 {hash}…")),
        ("cmdline", id.cmdline.clone()),
        ("memory", human(id.mem_size)),
        ("devices", devices.join(", ")),
        (
            "cpu",
            format!("{cpuid} CPUID entries, {msrs} MSRs, TSC {tsc} kHz"),
        ),
        ("models", format!("device-model version {model}")),
    ];
    rows(&mut o, &head);
    let total = s.total();
    let kinds = KINDS.iter().zip(&s.kinds).chain([(&"total", &total)]);
    table(&mut o, "records", kinds);
    table(&mut o, "causes", CAUSES.iter().zip(&s.causes));
    let (sync, pages, bytes) = (s.kinds[2].count, s.sync_pages, human(s.kinds[2].bytes));
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
        ("sync points", format!("{sync} ({pages} pages, {bytes})")),
        (
            "epochs",
            format!("{} ({} pages dirtied)", s.kinds[3].count, s.epoch_pages),
        ),
        ("checks", s.kinds[4].count.to_string()),
        ("end", r.ending()),
        ("guest time", guest),
    ];
    if let Some(d) = &r.damage {
        tail.push(("damage", format!("{}: {}", d.severity(), d.message)));
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
        let payload = (t.payload > 0).then(|| human(t.payload));
        let (payload, bytes) = (payload.unwrap_or_else(|| "-".into()), human(t.bytes));
        let name = name.replace('_', " ");
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

/// `obj! { "key": value, ... }`: a JSON object; each value displays as JSON.
macro_rules! obj {
    ($($k:literal: $v:expr),* $(,)?) => {
        format!("{{{}}}", [$(format!("\"{}\":{}", $k, $v)),*].join(","))
    };
}

fn tallies<'a>(rows: impl Iterator<Item = (&'a &'a str, &'a Tally)>) -> String {
    let tally = |t: &Tally| obj! { "count": t.count, "bytes": t.bytes, "payload": t.payload };
    let fields: Vec<String> = rows
        .map(|(k, t)| format!("{}:{}", js(k), tally(t)))
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
            "kind": js(d.kind), "severity": js(d.severity()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The replay crate's frozen sample log (one record of every kind),
    /// with the command line made hard to quote, a second `Time` cause two
    /// seconds after the first, and the End record last; returns its path
    /// and each record's frame size.
    fn write_log(name: &str) -> (PathBuf, Vec<u64>) {
        let golden = "replay/tests/golden/v1-every-kind.bin";
        let (reader, mut id) =
            LogFile::open(Path::new(env!("CARGO_MANIFEST_DIR")).join(golden)).unwrap();
        let mut records: Vec<Record> = reader.map(Result::unwrap).collect();
        let end = records.pop().unwrap();
        let time = Cause::Time(2_001_000_000);
        records.extend([
            Record::Cause {
                stop: end.stop(),
                cause: time,
            },
            end,
        ]);
        id.cmdline = "console=ttyS0 \"quoted\"\n\\".into();
        let tmp = format!("tandem-inspect-{}-{name}", std::process::id());
        let path = std::env::temp_dir().join(tmp);
        let mut log = LogFile::create(&path, &id, None).unwrap();
        let sizes = records.iter().map(|r| log.append(r).unwrap()).collect();
        log.sync().unwrap();
        (path, sizes)
    }

    fn kinds_of(path: &Path) -> Vec<u16> {
        LogFile::open(path)
            .unwrap()
            .0
            .map(|r| r.unwrap().kind())
            .collect()
    }

    fn header_len(path: &Path) -> u64 {
        LogFile::open(path).unwrap().0.offset()
    }

    fn set_len(path: &Path, len: u64) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_len(len).unwrap();
    }

    #[test]
    fn counts_and_bytes_per_kind() {
        let (path, sizes) = write_log("counts");
        let kinds = kinds_of(&path);
        let r = inspect(&path).unwrap();
        for (i, name) in KINDS.iter().enumerate() {
            let of_kind = || {
                kinds
                    .iter()
                    .zip(&sizes)
                    .filter(|(&k, _)| k as usize == i + 1)
            };
            let want = (of_kind().count() as u64, of_kind().map(|(_, s)| s).sum());
            assert_eq!(
                (r.stats.kinds[i].count, r.stats.kinds[i].bytes),
                want,
                "{name}"
            );
        }
        let causes = r.stats.causes.map(|t| (t.count, t.payload));
        assert_eq!(causes, [(2, 0), (1, 3), (1, 14), (1, 32)]);
        assert_eq!(r.stats.causes[1].bytes, sizes[1]);
        assert_eq!(r.stats.kinds[2].payload, 4096);
        assert_eq!((r.stats.sync_pages, r.stats.epoch_pages), (1, 17));
        let stops = (r.stats.first_stop, r.stats.last_stop, r.watermark);
        assert_eq!(stops, (Some(1), Some(7), Some(6)));
        assert_eq!(r.header_bytes, header_len(&path));
        assert_eq!(r.header_bytes + r.stats.total().bytes, r.file_bytes);
        assert_eq!(r.valid_bytes, r.file_bytes);
        assert_eq!(r.guest_seconds(), Some(2.0));
        let mbit = r.mbit_per_second().unwrap();
        assert!((mbit - r.file_bytes as f64 * 4e-6).abs() < 1e-9, "{mbit}");
        assert!(!r.damaged() && r.exit_code() == 0);
        let text = render(&r, false);
        assert!(text.contains("guest exit 0 at stop 7"), "{text}");
        assert!(
            text.contains(&format!("  total{:>17}", sizes.len())),
            "{text}"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_torn_tail_names_the_last_record_and_warns() {
        let (path, sizes) = write_log("torn");
        let last = std::fs::metadata(&path).unwrap().len() - sizes.last().unwrap();
        set_len(&path, last + 5);
        let r = inspect(&path).unwrap();
        let d = r.damage.clone().unwrap();
        let n = sizes.len() as u64;
        assert_eq!((d.kind, d.offset, d.record), ("torn_tail", last, n));
        assert_eq!((d.severity(), r.exit_code()), ("warning", EXIT_LOG_TORN));
        assert_eq!((r.valid_bytes, r.stats.total().count), (last, n - 1));
        assert!(r
            .ending()
            .ends_with("replay stops at the last watermark 6)"));
        let text = render(&r, false);
        assert!(text.contains(&format!("damage      warning: log ends inside record {n}")));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_flipped_byte_is_corruption() {
        let (path, sizes) = write_log("flip");
        let mut bytes = std::fs::read(&path).unwrap();
        let third = header_len(&path) + sizes[0] + sizes[1];
        bytes[third as usize + 9] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let r = inspect(&path).unwrap();
        let d = r.damage.clone().unwrap();
        assert_eq!((d.kind, d.offset, d.record), ("corrupt", third, 3));
        assert_eq!((d.severity(), r.exit_code()), ("error", EXIT_LOG_CORRUPT));
        assert_eq!(r.stats.total().count, 2);
        assert!(r.stats.end.is_none() && r.damaged());
        std::fs::remove_file(&path).unwrap();
    }

    /// The JSON is one line, its strings are closed, its brackets balanced
    /// with nothing after the outermost object, and it holds `keys`.
    fn check_json(json: &str, keys: &[&str]) {
        assert!(json.ends_with("}\n") && json.lines().count() == 1, "{json}");
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        for c in json.trim_end().chars() {
            assert!(depth > 0 || c == '{', "{json}");
            match (in_str, esc, c) {
                (true, true, _) => esc = false,
                (true, false, '\\') => esc = true,
                (_, false, '"') => in_str = !in_str,
                (false, _, '{' | '[') => depth += 1,
                (false, _, '}' | ']') => depth -= 1,
                _ => {}
            }
        }
        assert_eq!((depth, in_str), (0, false), "{json}");
        for key in keys {
            assert!(json.contains(key), "{key} missing from {json}");
        }
    }

    #[test]
    fn json_is_balanced_and_complete() {
        let (path, sizes) = write_log("json");
        let r = inspect(&path).unwrap();
        let keys = [
            r#""cmdline":"console=ttyS0 \"quoted\"\n\\""#,
            r#""records":{"cause":{"count":5,"#,
            r#""serial_input":{"count":1,"bytes":"#,
            r#""stops":{"first":1,"last":7,"watermark":6}"#,
            r#""end":{"stop":7,"outcome":"guest exit 0"}"#,
            r#""seconds":2,"#,
            r#""damage":null}"#,
        ];
        check_json(&render(&r, true), &keys);
        set_len(&path, r.file_bytes - 1);
        let r = inspect(&path).unwrap();
        let (at, n) = (r.valid_bytes, sizes.len());
        let torn = format!(
            r#""damage":{{"kind":"torn_tail","severity":"warning","offset":{at},"record":{n}"#
        );
        check_json(&render(&r, true), &[&torn, r#""end":null"#]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn unreadable_logs_are_errors_and_sizes_are_human() {
        let missing = inspect(Path::new("/nonexistent/tandem.log")).unwrap_err();
        assert!(format!("{missing:#}").contains("cannot read log /nonexistent"));
        let bad = std::env::temp_dir().join(format!("tandem-inspect-{}-bad", std::process::id()));
        std::fs::write(&bad, b"hello, world").unwrap();
        assert!(format!("{:#}", inspect(&bad).unwrap_err()).contains("not a tandem log"));
        std::fs::remove_file(&bad).unwrap();
        let sizes = [0, 1023, 1024, 1536 << 10, 3 << 30].map(human);
        assert_eq!(sizes, ["0 B", "1023 B", "1.0 KiB", "1.5 MiB", "3.0 GiB"]);
    }
}
