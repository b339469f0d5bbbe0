//! `tandem log inspect` end to end: exit statuses, stderr, and `--json`
//! output that a real JSON parser accepts. The counting itself is unit
//! tested in `src/log_inspect.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A torn tail: the log replays up to its last watermark (as `tandem
/// replay`'s EXIT_REPLAY_TRUNCATED).
const EXIT_LOG_TORN: i32 = 122;
/// Corrupt or unreadable.
const EXIT_LOG_CORRUPT: i32 = 1;

/// The replay crate's frozen sample log: 12 records, one of every kind.
fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("replay/tests/golden/v1-every-kind.bin")
}

/// A copy of the sample log, changed by `damage`.
fn damaged(name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(golden()).unwrap();
    damage(&mut bytes);
    let path = std::env::temp_dir().join(format!("tandem-inspect-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Runs `tandem log inspect ARGS PATH`: status, stdout, stderr.
fn inspect(args: &[&str], path: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["log", "inspect"])
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    let err = text(out.stderr.clone());
    assert!(
        !err.contains("unrecognized subcommand 'log'"),
        "`tandem log inspect` is not wired into src/main.rs yet (log_inspect::run)"
    );
    (
        out.status.code().unwrap(),
        text(out.stdout),
        text(out.stderr),
    )
}

#[test]
fn a_good_log_exits_zero_with_a_table() {
    let (status, out, err) = inspect(&[], &golden());
    assert_eq!((status, err.as_str()), (0, ""), "{out}");
    for needle in [
        "image       tiny.elf",
        "  total",
        "12",
        "guest exit 0 at stop 7",
    ] {
        assert!(out.contains(needle), "{needle} missing from\n{out}");
    }
}

#[test]
fn a_torn_tail_warns_with_its_own_status() {
    let path = damaged("torn-cli", |b| b.truncate(b.len() - 3));
    let (status, out, err) = inspect(&[], &path);
    assert_eq!(status, EXIT_LOG_TORN, "{out}{err}");
    assert!(
        err.starts_with("tandem: warning: log ends inside record 12"),
        "{err}"
    );
    assert!(
        out.contains("replay stops at the last watermark 6"),
        "{out}"
    );
    std::fs::remove_file(path).unwrap();
}

#[test]
fn corruption_is_an_error() {
    let path = damaged("flip-cli", |b| b[300] ^= 1);
    let (status, _, err) = inspect(&[], &path);
    assert_eq!(status, EXIT_LOG_CORRUPT, "{err}");
    assert!(
        err.starts_with("tandem: error: corrupt log at byte"),
        "{err}"
    );
    let not_a_log = damaged("not-a-log", |b| b[0] = b'X');
    let (status, out, err) = inspect(&["--json"], &not_a_log);
    assert_eq!((status, out.as_str()), (EXIT_LOG_CORRUPT, ""));
    assert!(err.contains("not a tandem log"), "{err}");
    std::fs::remove_file(path).unwrap();
    std::fs::remove_file(not_a_log).unwrap();
}

#[test]
fn json_parses_and_says_the_same() {
    let (status, out, _) = inspect(&["--json"], &golden());
    assert_eq!(status, 0);
    let v = parse(&out);
    assert_eq!(v.get("records").get("total").get("count"), &Json::Num(12.0));
    assert_eq!(
        v.get("causes").get("net_rx").get("payload"),
        &Json::Num(14.0)
    );
    assert_eq!(
        v.get("identity").get("image_name"),
        &Json::Str("tiny.elf".into())
    );
    assert_eq!(v.get("stops").get("watermark"), &Json::Num(6.0));
    assert_eq!(v.get("damage"), &Json::Null);
    let path = damaged("torn-json", |b| b.truncate(b.len() - 3));
    let (status, out, _) = inspect(&["--json"], &path);
    assert_eq!(status, EXIT_LOG_TORN);
    let damage = parse(&out).get("damage").clone();
    assert_eq!(damage.get("kind"), &Json::Str("torn_tail".into()));
    assert_eq!(damage.get("record"), &Json::Num(12.0));
    std::fs::remove_file(path).unwrap();
}

/// Just enough JSON to check the output: strict about syntax.
#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(fields) => &fields.iter().find(|(k, _)| k == key).expect(key).1,
            _ => panic!("{self:?} is not an object"),
        }
    }
}

fn parse(text: &str) -> Json {
    let mut p = Parser(text.trim_end().as_bytes(), 0);
    let v = p.value();
    assert_eq!(p.1, p.0.len(), "trailing text in {text}");
    v
}

struct Parser<'a>(&'a [u8], usize);

impl Parser<'_> {
    fn peek(&mut self) -> u8 {
        while self.0.get(self.1).is_some_and(u8::is_ascii_whitespace) {
            self.1 += 1;
        }
        *self.0.get(self.1).expect("unexpected end of JSON")
    }

    fn eat(&mut self, s: &str) {
        self.peek();
        assert!(
            self.0[self.1..].starts_with(s.as_bytes()),
            "expected {s} at {}",
            self.1
        );
        self.1 += s.len();
    }

    fn list<T>(&mut self, close: u8, mut item: impl FnMut(&mut Self) -> T) -> Vec<T> {
        let mut items = vec![];
        self.1 += 1;
        while self.peek() != close {
            if !items.is_empty() {
                self.eat(",");
            }
            items.push(item(self));
        }
        self.1 += 1;
        items
    }

    fn value(&mut self) -> Json {
        match self.peek() {
            b'n' => (self.eat("null"), Json::Null).1,
            b't' => (self.eat("true"), Json::Bool(true)).1,
            b'f' => (self.eat("false"), Json::Bool(false)).1,
            b'"' => Json::Str(self.string()),
            b'[' => Json::Arr(self.list(b']', Self::value)),
            b'{' => Json::Obj(self.list(b'}', |p| (p.string(), (p.eat(":"), p.value()).1))),
            _ => {
                let start = self.1;
                let num = |c: &u8| c.is_ascii_digit() || b"+-.eE".contains(c);
                while self.0.get(self.1).is_some_and(num) {
                    self.1 += 1;
                }
                let s = std::str::from_utf8(&self.0[start..self.1]).unwrap();
                Json::Num(
                    s.parse()
                        .unwrap_or_else(|_| panic!("bad number {s:?} at {start}")),
                )
            }
        }
    }

    fn string(&mut self) -> String {
        self.eat("\"");
        let mut out = vec![];
        loop {
            let c = self.0[self.1];
            self.1 += 1;
            match c {
                b'"' => return String::from_utf8(out).unwrap(),
                b'\\' => {
                    let e = self.0[self.1];
                    self.1 += 1;
                    let c = match e {
                        b'n' => '\n',
                        b't' => '\t',
                        b'r' => '\r',
                        b'u' => {
                            let hex = std::str::from_utf8(&self.0[self.1..self.1 + 4]).unwrap();
                            self.1 += 4;
                            char::from_u32(u32::from_str_radix(hex, 16).unwrap()).unwrap()
                        }
                        b'"' | b'\\' | b'/' => e as char,
                        _ => panic!("bad escape \\{}", e as char),
                    };
                    out.extend(c.to_string().as_bytes());
                }
                c if c < 0x20 => panic!("raw control character in a JSON string"),
                c => out.push(c),
            }
        }
    }
}
