//! `tandem witness`: the arbiter as a small TCP service, and its client.
//!
//! The protocol is line-based text, one request line and one reply line
//! (requests may be repeated on one connection; the client connects anew for
//! each):
//!
//! ```text
//! CLAIM <vm> <expected> <holder>  ->  GRANTED <expected+1>
//!                                  |  REFUSED <generation> <holder|->
//! QUERY <vm>                      ->  STATE <generation> <holder|->
//! anything else                   ->  ERROR <reason>
//! ```
//!
//! Lines are at most [`MAX_LINE_LEN`] bytes; names follow
//! [`validate_name`]. `-` stands for "no holder".
//!
//! A witness with keys (`--psk-file`, once per key: one per pair, or one
//! of its own that its pairs share) first authenticates each connection
//! with the scheme of the replication channel ([`crate::auth`]) under
//! the key the client names by its id, in lines:
//!
//! ```text
//! AUTH <nonce_c hex> <key id hex>   ->  CHALLENGE <nonce_s hex> <server proof hex>
//! PROOF <client proof hex>          (then every line in both directions ends
//!                                    with " <HMAC hex>" under the session key)
//! ```
//!
//! A request without a valid MAC is answered `ERROR` and the connection
//! closed; a keyless witness answers `AUTH` with `ERROR`.
//!
//! The state file is rewritten whole for every grant: `FILE.tmp` is written
//! and fsynced, renamed over `FILE`, and the directory fsynced, all before the
//! reply is sent, so a witness restarted on the same file never grants a
//! generation twice. A trailing checksum makes a damaged file an error at
//! start rather than a silent reset. A `FILE.lock` (flock) keeps a second
//! witness process off the same file.
//!
//! Size: over 800 lines because it holds the witness's state file, its server
//! and its client, which share the line protocol; about a third is tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::admission::{self, Admission, DeadlineReader, Ticket};
use crate::auth::{
    self, from_hex, to_hex, FrameMac, Psk, CLIENT_TO_SERVER, MAC_LEN, NONCE_LEN, SERVER_TO_CLIENT,
};

use super::{
    describe_io, is_valid_name, validate_name, Arbiter, ArbiterError, ClaimOutcome, Grant,
    MAX_LINE_LEN,
};

/// First line of a state file.
const STATE_HEADER: &str = "tandem-witness-state 1";

/// A connection that sends nothing for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the witness waits to send a reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many connections are served at once; more are answered
/// `ERROR busy` and closed.
const MAX_CONNECTIONS: usize = 256;

// ---------------------------------------------------------------------------
// State and its file.

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    generation: u64,
    holder: String,
}

type VmMap = BTreeMap<String, Entry>;

/// FNV-1a, 64 bits: enough to tell a damaged file from a whole one.
fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn encode(vms: &VmMap) -> String {
    let mut s = format!("{STATE_HEADER}\n");
    for (vm, e) in vms {
        // Writing to a String cannot fail.
        let _ = writeln!(s, "vm {vm} {} {}", e.generation, e.holder);
    }
    let sum = fnv64(s.as_bytes());
    let _ = writeln!(s, "end {} {sum:016x}", vms.len());
    s
}

fn decode(bytes: &[u8]) -> Result<VmMap, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    if text.is_empty() {
        return Err("the file is empty".into());
    }
    let body_and_end = text
        .strip_suffix('\n')
        .ok_or("the last line is cut short (no newline)")?;
    let (body, end) = match body_and_end.rfind('\n') {
        Some(i) => (&text[..=i], &body_and_end[i + 1..]),
        None => return Err("no end line".into()),
    };
    let mut end_fields = end.split(' ');
    let (count, sum) = match (
        end_fields.next(),
        end_fields.next(),
        end_fields.next(),
        end_fields.next(),
    ) {
        (Some("end"), Some(c), Some(s), None) => (c, s),
        _ => return Err(format!("bad end line {:?}", truncate(end))),
    };
    let count: usize = parse_decimal(count)
        .and_then(|c| usize::try_from(c).ok())
        .ok_or_else(|| format!("bad count in end line {:?}", truncate(end)))?;
    let sum = u64::from_str_radix(sum, 16)
        .ok()
        .filter(|_| sum.len() == 16)
        .ok_or_else(|| format!("bad checksum in end line {:?}", truncate(end)))?;
    if fnv64(body.as_bytes()) != sum {
        return Err("checksum mismatch (the file was damaged or edited)".into());
    }
    let mut lines = body.lines();
    if lines.next() != Some(STATE_HEADER) {
        return Err(format!("the first line is not {STATE_HEADER:?}"));
    }
    let mut vms = VmMap::new();
    for (i, line) in lines.enumerate() {
        let bad = || format!("bad line {}: {:?}", i + 2, truncate(line));
        let f: Vec<&str> = line.split(' ').collect();
        let [tag, vm, generation, holder] = f[..] else {
            return Err(bad());
        };
        if tag != "vm" || !is_valid_name(vm) || !is_valid_name(holder) {
            return Err(bad());
        }
        let generation = parse_decimal(generation)
            .filter(|&g| g > 0)
            .ok_or_else(bad)?;
        let entry = Entry {
            generation,
            holder: holder.to_string(),
        };
        if vms.insert(vm.to_string(), entry).is_some() {
            return Err(format!("VM {vm} appears twice"));
        }
    }
    if vms.len() != count {
        return Err(format!(
            "the end line counts {count} VMs, the file has {}",
            vms.len()
        ));
    }
    Ok(vms)
}

/// A decimal number without sign or spaces.
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

/// `FILE` + `suffix`, e.g. `state.json` -> `state.json.tmp`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Fsyncs a directory, so that entries created or renamed in it are durable.
pub(super) fn sync_dir(dir: &Path) -> Result<(), ArbiterError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| ArbiterError::io("cannot fsync directory", dir, e))
}

/// Replaces `path` with `content` atomically and durably: write `path.tmp`,
/// fsync it, rename it over `path`, fsync the directory. A crash at any
/// point leaves either the old or the new file whole.
fn write_state(path: &Path, content: &str) -> Result<(), ArbiterError> {
    let tmp = sibling(path, ".tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| ArbiterError::io("cannot create", &tmp, e))?;
    f.write_all(content.as_bytes())
        .map_err(|e| ArbiterError::io("cannot write", &tmp, e))?;
    f.sync_all()
        .map_err(|e| ArbiterError::io("cannot fsync", &tmp, e))?;
    drop(f);
    fs::rename(&tmp, path).map_err(|e| ArbiterError::io("cannot rename into place", &tmp, e))?;
    sync_dir(parent_dir(path))
}

fn load_state(path: &Path) -> Result<VmMap, ArbiterError> {
    match fs::read(path) {
        Ok(bytes) => decode(&bytes).map_err(|reason| ArbiterError::CorruptState {
            path: path.to_path_buf(),
            reason,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            info!("witness: no state file {}, starting empty", path.display());
            Ok(VmMap::new())
        }
        Err(e) => Err(ArbiterError::io("cannot read witness state", path, e)),
    }
}

/// Takes `FILE.lock` exclusively (released when the file is closed, also
/// when the process dies).
fn lock_state(path: &Path) -> Result<File, ArbiterError> {
    let lock = sibling(path, ".lock");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock)
        .map_err(|e| ArbiterError::io("cannot open lock file", &lock, e))?;
    // SAFETY: flock only reads the flags; the descriptor is valid and owned
    // by `f` for the duration of the call.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(ArbiterError::StateLocked {
                path: path.to_path_buf(),
                lock,
            });
        }
        return Err(ArbiterError::io("cannot lock", &lock, e));
    }
    Ok(f)
}

// ---------------------------------------------------------------------------
// Server.

struct Inner {
    vms: VmMap,
    /// Set when a grant could not be persisted: what is on disk is then
    /// unknown, so nothing more is answered until a restart reloads it.
    broken: Option<String>,
    stopped: bool,
}

struct Shared {
    path: PathBuf,
    inner: Mutex<Inner>,
    stopping: AtomicBool,
    connections: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing panics while holding the lock; if something did, the map
        // is still consistent (it is replaced only after a successful write).
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn unavailable(inner: &Inner) -> Option<String> {
        if inner.stopped {
            return Some(error_line("witness is shutting down"));
        }
        inner.broken.as_ref().map(|b| {
            error_line(&format!(
                "witness cannot persist grants ({b}); restart it after fixing the cause"
            ))
        })
    }

    fn query(&self, vm: &str) -> String {
        let inner = self.lock();
        if let Some(reply) = Self::unavailable(&inner) {
            return reply;
        }
        match inner.vms.get(vm) {
            Some(e) => format!("STATE {} {}\n", e.generation, e.holder),
            None => "STATE 0 -\n".to_string(),
        }
    }

    fn claim(&self, vm: &str, expected: u64, holder: &str) -> String {
        let mut inner = self.lock();
        if let Some(reply) = Self::unavailable(&inner) {
            return reply;
        }
        let current = inner.vms.get(vm);
        let generation = current.map_or(0, |e| e.generation);
        if generation != expected {
            let h = current.map_or("-", |e| e.holder.as_str());
            return format!("REFUSED {generation} {h}\n");
        }
        let Some(next_gen) = expected.checked_add(1) else {
            return error_line(&format!("generation {expected} is the last one"));
        };
        let mut next = inner.vms.clone();
        next.insert(
            vm.to_string(),
            Entry {
                generation: next_gen,
                holder: holder.to_string(),
            },
        );
        // Persisted while holding the lock: grants are written in the order
        // they are decided, and none is answered before it is on disk.
        match write_state(&self.path, &encode(&next)) {
            Ok(()) => {
                inner.vms = next;
                info!("witness: {vm} generation {next_gen} granted to {holder}");
                format!("GRANTED {next_gen}\n")
            }
            Err(e) => {
                error!("witness: cannot persist {vm} generation {next_gen}: {e}");
                let reply = error_line(&format!("cannot persist the grant: {e}"));
                inner.broken = Some(e.to_string());
                reply
            }
        }
    }

    /// Answers one request line (without its newline).
    fn handle_line(&self, line: &[u8]) -> String {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Ok(line) = std::str::from_utf8(line) else {
            return error_line("request is not UTF-8");
        };
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        match f[..] {
            [] => error_line("empty request"),
            ["QUERY", vm] => {
                if !is_valid_name(vm) {
                    return error_line("invalid vm name");
                }
                self.query(vm)
            }
            ["QUERY", ..] => error_line("usage: QUERY <vm>"),
            ["CLAIM", vm, expected, holder] => {
                if !is_valid_name(vm) {
                    return error_line("invalid vm name");
                }
                if !is_valid_name(holder) {
                    return error_line("invalid holder name");
                }
                let Some(expected) = parse_decimal(expected) else {
                    return error_line("invalid expected generation");
                };
                self.claim(vm, expected, holder)
            }
            ["CLAIM", ..] => error_line("usage: CLAIM <vm> <expected> <holder>"),
            [cmd, ..] => error_line(&format!("unknown command {:?}", truncate(cmd))),
        }
    }
}

/// `ERROR <reason>\n`, the reason kept on one line.
fn error_line(reason: &str) -> String {
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_LINE_LEN - 16)
        .collect();
    format!("ERROR {reason}\n")
}

/// Reads one line of at most [`MAX_LINE_LEN`] bytes. `Ok(None)` at a clean
/// end of stream; `Ok(Some((line, complete)))` otherwise, `complete` false
/// if the line had no newline (too long, or cut by the end of stream).
fn read_line(r: &mut impl BufRead) -> io::Result<Option<(Vec<u8>, bool)>> {
    let mut buf = Vec::new();
    r.take(MAX_LINE_LEN as u64).read_until(b'\n', &mut buf)?;
    if buf.is_empty() {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        Ok(Some((buf, true)))
    } else {
        Ok(Some((buf, false)))
    }
}

/// One authenticated witness connection, on either end: each line carries
/// the MAC of its direction.
struct LineSession {
    incoming: FrameMac,
    outgoing: FrameMac,
}

impl LineSession {
    /// Both directions under `key`; `client` picks which one is ours.
    fn new(key: [u8; 32], client: bool) -> Self {
        let (incoming, outgoing) = if client {
            (SERVER_TO_CLIENT, CLIENT_TO_SERVER)
        } else {
            (CLIENT_TO_SERVER, SERVER_TO_CLIENT)
        };
        Self {
            incoming: FrameMac::new(key, incoming),
            outgoing: FrameMac::new(key, outgoing),
        }
    }

    /// The body of a received `line` if its MAC holds.
    fn open<'a>(&mut self, line: &'a [u8]) -> Option<&'a [u8]> {
        let at = line.iter().rposition(|&b| b == b' ')?;
        let mac = from_hex::<MAC_LEN>(std::str::from_utf8(&line[at + 1..]).ok()?)?;
        let body = &line[..at];
        self.incoming.open(&[body], &mac).then_some(body)
    }

    /// `line` (with or without its newline) with its MAC, newline-ended.
    fn seal(&mut self, line: &str) -> String {
        let body = line.trim_end_matches('\n');
        let mac = self.outgoing.seal(&[body.as_bytes()]);
        format!("{body} {}\n", to_hex(&mac))
    }
}

/// The witness side of the handshake; Err is the reason to answer.
fn authenticate(
    reader: &mut impl BufRead,
    writer: &mut impl Write,
    keys: &[Arc<Psk>],
) -> Result<LineSession, String> {
    let mut line = || match read_line(reader) {
        Ok(Some((l, true))) => String::from_utf8(l).map_err(|_| "not text".to_string()),
        Ok(_) => Err("connection closed during authentication".to_string()),
        Err(e) => Err(e.to_string()),
    };
    let hello = line()?;
    let mut words = hello.strip_prefix("AUTH ").unwrap_or_default().split(' ');
    let Some(client) = words.next().and_then(from_hex::<NONCE_LEN>) else {
        return Err(
            "authentication required: give the client its witness key ([ft] witness_key_file, or `tandem keygen --witness-key-for`)".into(),
        );
    };
    // Which of its keys: named by the key's id (a client of an older
    // version names none: then only a witness with one key can answer).
    let psk = match words.next().map(from_hex::<8>) {
        Some(Some(id)) => keys.iter().find(|k| k.key_id() == id),
        Some(None) => None,
        None if keys.len() == 1 => keys.first(),
        None => None,
    }
    .ok_or("authentication failed: this witness does not hold the client's key")?;
    let server = auth::nonce().map_err(|e| format!("no random bytes: {e}"))?;
    let challenge = format!(
        "CHALLENGE {} {}\n",
        to_hex(&server),
        to_hex(&psk.server_proof(&client, &server))
    );
    writer
        .write_all(challenge.as_bytes())
        .map_err(|e| e.to_string())?;
    let proof = line()?;
    match proof.strip_prefix("PROOF ").and_then(from_hex::<MAC_LEN>) {
        Some(p) if psk.check_client_proof(&client, &server, &p) => {}
        _ => return Err("authentication failed: the keys differ".into()),
    }
    Ok(LineSession::new(psk.session_key(&client, &server), false))
}

/// Serves one connection. With a key, `ticket` holds its place among the
/// unauthenticated until it authenticates (within the handshake deadline);
/// then it takes one of the places kept for authenticated sessions.
fn serve_connection(
    stream: TcpStream,
    shared: &Arc<Shared>,
    keys: &[Arc<Psk>],
    ticket: Option<Ticket>,
) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let deadline = Instant::now() + admission::HANDSHAKE_DEADLINE;
    let mut reader = BufReader::new(DeadlineReader::new(&stream, deadline));
    let mut writer = &stream;
    let secured = !keys.is_empty();
    let mut session = match secured.then(|| authenticate(&mut reader, &mut writer, keys)) {
        None => None,
        Some(Ok(s)) => Some(s),
        Some(Err(reason)) => {
            warn!("witness: {peer} refused: {reason}");
            let _ = writer.write_all(error_line(&reason).as_bytes());
            return;
        }
    };
    drop(ticket);
    if reader.get_mut().lift(IDLE_TIMEOUT).is_err() {
        return;
    }
    let Some(_slot) = ConnectionSlot::take(shared) else {
        warn!("witness: {peer}: {MAX_CONNECTIONS} sessions are open already: refused");
        let _ = writer.write_all(b"ERROR busy\n");
        return;
    };
    loop {
        let (line, complete) = match read_line(&mut reader) {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                info!("witness: connection from {peer}: {e}");
                return;
            }
        };
        if !complete && line.len() >= MAX_LINE_LEN {
            warn!("witness: {peer} sent a line over {MAX_LINE_LEN} bytes");
            let msg = error_line(&format!("line too long (max {MAX_LINE_LEN} bytes)"));
            let _ = writer.write_all(msg.as_bytes());
            return; // cannot find the next line boundary reliably
        }
        let reply = match &mut session {
            None if line.starts_with(b"AUTH ") => {
                let reason = "this witness has no key (started with --insecure)";
                warn!("witness: {peer} authenticates: refused, {reason}");
                let _ = writer.write_all(error_line(reason).as_bytes());
                return;
            }
            None => shared.handle_line(&line),
            Some(session) => {
                match session.open(&line) {
                    Some(request) => session.seal(&shared.handle_line(request)),
                    None => {
                        warn!("witness: a request from {peer} failed authentication: connection closed");
                        let _ = writer
                            .write_all(error_line("request failed authentication").as_bytes());
                        return;
                    }
                }
            }
        };
        if reply.starts_with("ERROR") {
            warn!("witness: {peer}: {}", reply.trim_end());
        }
        if writer.write_all(reply.as_bytes()).is_err() || !complete {
            return;
        }
    }
}

/// One of the [`MAX_CONNECTIONS`] places for sessions past their
/// handshake; given back when the connection ends.
struct ConnectionSlot(Arc<Shared>);

impl ConnectionSlot {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        if shared.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            shared.connections.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(Self(shared.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    lock: File,
    keys: Vec<Arc<Psk>>,
) -> Result<(), ArbiterError> {
    let keys: Arc<[Arc<Psk>]> = keys.into();
    // Connections that have not authenticated have their own, smaller
    // budget (and a short deadline): idle ones cannot use up the places
    // the pairs need for their claims.
    let admission = Admission::new(admission::DEFAULT_LIMITS);
    let refusals = admission::RefusalLog::default();
    for conn in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // EMFILE, ENOBUFS, ECONNABORTED...: keep serving.
                warn!("witness: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let ticket = match (keys.is_empty(), stream.peer_addr()) {
            (true, _) => None,
            (false, Ok(from)) => match admission.admit(from.ip()) {
                Ok(t) => Some(t),
                Err(refused) => {
                    if let Some(n) = refusals.note() {
                        warn!("witness: {from} not admitted: {refused} ({n} refused since the last such line)");
                    }
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = stream.write_all(b"ERROR busy\n");
                    continue;
                }
            },
            (false, Err(_)) => continue,
        };
        let shared = shared.clone();
        let keys = keys.clone();
        let spawned = std::thread::Builder::new()
            .name("witness-conn".into())
            .spawn(move || serve_connection(stream, &shared, &keys, ticket));
        if let Err(e) = spawned {
            // The closure (and so the ticket and the stream) is dropped.
            warn!("witness: cannot start a connection thread: {e}");
        }
    }
    drop(lock);
    Ok(())
}

/// A witness bound to its address with its state loaded: serve it with
/// [`run`](Self::run) (blocking) or [`spawn`](Self::spawn).
pub struct WitnessServer {
    listener: TcpListener,
    shared: Arc<Shared>,
    lock: File,
    keys: Vec<Arc<Psk>>,
}

impl WitnessServer {
    /// Locks `state` (against a second witness), loads it (missing: empty;
    /// damaged: [`ArbiterError::CorruptState`]), rewrites it to prove it can
    /// be written, and listens on `listen`.
    pub fn bind(listen: SocketAddr, state: &Path) -> Result<Self, ArbiterError> {
        let lock = lock_state(state)?;
        let vms = load_state(state)?;
        write_state(state, &encode(&vms))?;
        let listener = TcpListener::bind(listen).map_err(|source| ArbiterError::Bind {
            addr: listen,
            source,
        })?;
        info!(
            "witness: {} VMs from {}, listening on {listen}",
            vms.len(),
            state.display()
        );
        Ok(WitnessServer {
            listener,
            shared: Arc::new(Shared {
                path: state.to_path_buf(),
                inner: Mutex::new(Inner {
                    vms,
                    broken: None,
                    stopped: false,
                }),
                stopping: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
            }),
            lock,
            keys: Vec::new(),
        })
    }

    /// Authenticates every client with `psk` (None: serves anyone).
    pub fn with_psk(self, psk: Option<Arc<Psk>>) -> Self {
        self.with_keys(psk.into_iter().collect())
    }

    /// Authenticates every client with one of `keys` (one per pair, or
    /// the witness's own; empty: serves anyone).
    pub fn with_keys(mut self, keys: Vec<Arc<Psk>>) -> Self {
        self.keys = keys;
        self
    }

    /// The address it listens on (with the port picked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0))
    }

    /// Serves on this thread, each connection on its own thread. Returns
    /// only when a [`WitnessHandle`] of it stops it (never, via `run`).
    pub fn run(self) -> Result<(), ArbiterError> {
        accept_loop(self.listener, self.shared, self.lock, self.keys)
    }

    /// Serves on a background thread until the handle is shut down or
    /// dropped; fails if the thread cannot be started.
    pub fn spawn(self) -> std::io::Result<WitnessHandle> {
        let addr = self.local_addr();
        let shared = self.shared.clone();
        let thread = std::thread::Builder::new()
            .name("witness".into())
            .spawn(move || self.run())?;
        Ok(WitnessHandle {
            addr,
            shared,
            thread: Some(thread),
        })
    }
}

/// A witness serving in the background; dropping it stops it.
pub struct WitnessHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Result<(), ArbiterError>>>,
}

impl WitnessHandle {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and answering (open connections get `ERROR`), closes
    /// the listener and releases the state lock.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.shared.lock().stopped = true;
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = thread.join();
    }
}

impl Drop for WitnessHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// Client.

/// The client of a `tandem witness`.
#[derive(Clone, Debug)]
pub struct TcpArbiter {
    addr: SocketAddr,
    timeout: Duration,
    psk: Option<Arc<Psk>>,
}

impl TcpArbiter {
    /// A client of the witness at `addr`. Each request connects anew;
    /// connecting, sending and reading each wait at most `timeout`.
    pub fn new(addr: SocketAddr, timeout: Duration) -> Self {
        TcpArbiter {
            addr,
            timeout: timeout.max(Duration::from_millis(1)),
            psk: None,
        }
    }

    /// Authenticates to the witness with `psk` (None: no authentication).
    pub fn with_psk(mut self, psk: Option<Arc<Psk>>) -> Self {
        self.psk = psk;
        self
    }

    /// The witness address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends one request line, returns the reply line (without newline);
    /// `ERROR` replies become [`ArbiterError::Remote`].
    fn request(&self, line: &str) -> Result<String, ArbiterError> {
        let addr = self.addr;
        let timeout = self.timeout;
        let conn_err = |op, e: &io::Error| ArbiterError::Connection {
            addr,
            op,
            reason: describe_io(e, timeout),
        };
        let mut stream =
            TcpStream::connect_timeout(&addr, timeout).map_err(|e| ArbiterError::Unreachable {
                addr,
                reason: describe_io(&e, timeout),
            })?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| conn_err("setting timeouts", &e))?;
        let reader_half = stream.try_clone().map_err(|e| conn_err("setting up", &e))?;
        let mut reader = BufReader::new(reader_half);
        let mut session = match &self.psk {
            Some(psk) => Some(self.authenticate(&mut reader, &mut stream, psk)?),
            None => None,
        };
        let request = match &mut session {
            Some(s) => s.seal(line),
            None => format!("{line}\n"),
        };
        stream
            .write_all(request.as_bytes())
            .map_err(|e| conn_err("sending the request", &e))?;
        let reply = match read_line(&mut reader) {
            Ok(Some((reply, true))) => reply,
            Ok(Some((reply, false))) if reply.len() >= MAX_LINE_LEN => {
                return Err(ArbiterError::BadReply {
                    addr,
                    reply: truncate(&String::from_utf8_lossy(&reply)),
                })
            }
            Ok(_) => {
                return Err(ArbiterError::Connection {
                    addr,
                    op: "reading the reply",
                    reason: "connection closed before the reply".into(),
                })
            }
            Err(e) => return Err(conn_err("reading the reply", &e)),
        };
        let reply = String::from_utf8(reply).map_err(|e| ArbiterError::BadReply {
            addr,
            reply: truncate(&String::from_utf8_lossy(e.as_bytes())),
        })?;
        let reply = reply.strip_suffix('\r').unwrap_or(&reply).to_string();
        let reply = match &mut session {
            None => reply,
            Some(s) => match s.open(reply.as_bytes()) {
                Some(body) => String::from_utf8_lossy(body).into_owned(),
                // An unsealed ERROR can only refuse, never grant.
                None if reply.starts_with("ERROR ") => reply,
                None => {
                    return Err(ArbiterError::Auth {
                        addr,
                        reason: "a reply failed authentication (tampered with?)".into(),
                    })
                }
            },
        };
        if let Some(reason) = reply.strip_prefix("ERROR ") {
            return Err(ArbiterError::Remote {
                addr,
                reason: reason.to_string(),
            });
        }
        Ok(reply)
    }

    /// The client side of the handshake.
    fn authenticate(
        &self,
        reader: &mut impl BufRead,
        writer: &mut impl Write,
        psk: &Psk,
    ) -> Result<LineSession, ArbiterError> {
        let addr = self.addr;
        let fail = |reason: String| ArbiterError::Auth { addr, reason };
        let io_fail = |e: io::Error| fail(describe_io(&e, self.timeout));
        let client = auth::nonce().map_err(io_fail)?;
        writer
            .write_all(format!("AUTH {} {}\n", to_hex(&client), to_hex(&psk.key_id())).as_bytes())
            .map_err(io_fail)?;
        let reply = match read_line(reader).map_err(io_fail)? {
            Some((l, true)) => String::from_utf8_lossy(&l).into_owned(),
            _ => return Err(fail("connection closed during authentication".into())),
        };
        if let Some(reason) = reply.strip_prefix("ERROR ") {
            return Err(fail(reason.to_string()));
        }
        let parts: Vec<&str> = reply.split(' ').collect();
        let (server, proof) = match parts[..] {
            ["CHALLENGE", n, p] => (from_hex::<NONCE_LEN>(n), from_hex::<MAC_LEN>(p)),
            _ => (None, None),
        };
        let (Some(server), Some(proof)) = (server, proof) else {
            return Err(self.bad_reply(&reply));
        };
        if !psk.check_server_proof(&client, &server, &proof) {
            return Err(fail(format!(
                "the witness's key differs from {}",
                psk.path().display()
            )));
        }
        let proof = psk.client_proof(&client, &server);
        writer
            .write_all(format!("PROOF {}\n", to_hex(&proof)).as_bytes())
            .map_err(io_fail)?;
        Ok(LineSession::new(psk.session_key(&client, &server), true))
    }

    fn bad_reply(&self, reply: &str) -> ArbiterError {
        ArbiterError::BadReply {
            addr: self.addr,
            reply: truncate(reply),
        }
    }

    /// Parses `<generation> <holder|->`.
    fn parse_grant(
        &self,
        reply: &str,
        generation: &str,
        holder: &str,
    ) -> Result<Grant, ArbiterError> {
        let generation = parse_decimal(generation).ok_or_else(|| self.bad_reply(reply))?;
        let holder = match holder {
            "-" => None,
            h if is_valid_name(h) => Some(h.to_string()),
            _ => return Err(self.bad_reply(reply)),
        };
        if (generation == 0) != holder.is_none() {
            return Err(self.bad_reply(reply));
        }
        Ok(Grant { generation, holder })
    }
}

impl Arbiter for TcpArbiter {
    fn query(&self, vm: &str) -> Result<Grant, ArbiterError> {
        validate_name("vm", vm)?;
        let reply = self.request(&format!("QUERY {vm}"))?;
        match reply.split(' ').collect::<Vec<_>>()[..] {
            ["STATE", g, h] => self.parse_grant(&reply, g, h),
            _ => Err(self.bad_reply(&reply)),
        }
    }

    fn claim(&self, vm: &str, expected: u64, holder: &str) -> Result<ClaimOutcome, ArbiterError> {
        validate_name("vm", vm)?;
        validate_name("holder", holder)?;
        let Some(next) = expected.checked_add(1) else {
            return Err(ArbiterError::GenerationExhausted(expected));
        };
        let reply = self.request(&format!("CLAIM {vm} {expected} {holder}"))?;
        match reply.split(' ').collect::<Vec<_>>()[..] {
            ["GRANTED", g] if parse_decimal(g) == Some(next) => Ok(ClaimOutcome::Granted(next)),
            ["REFUSED", g, h] => Ok(ClaimOutcome::Refused(self.parse_grant(&reply, g, h)?)),
            _ => Err(self.bad_reply(&reply)),
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! The witness's handshake reads lines from anyone: any bytes before
    //! authentication are refused with a reason, never a panic, never a
    //! session. `make fuzz` runs this with many more cases.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_pre_auth_lines_are_refused(
            lines in prop::collection::vec(
                prop_oneof![
                    Just("AUTH ".to_string()),
                    Just("PROOF ".to_string()),
                    "[ -~]{0,80}",
                    "[0-9a-f]{0,70}",
                ],
                0..4,
            ),
            junk in prop::collection::vec(any::<u8>(), 0..200),
        ) {
            let mut input = lines.join("\n").into_bytes();
            input.extend_from_slice(&junk);
            let key = Arc::new(Psk::from_bytes(b"0123456789abcdef0123456789abcdef"));
            let mut reader = std::io::BufReader::new(&input[..]);
            let mut out = Vec::new();
            prop_assert!(authenticate(&mut reader, &mut out, &[key]).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::TempDir;
    use super::*;
    use std::sync::Barrier;

    const T: Duration = Duration::from_secs(5);

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn start(state: &Path) -> (WitnessHandle, TcpArbiter) {
        let server = bind_witness(state);
        let addr = server.local_addr();
        (server.spawn().unwrap(), TcpArbiter::new(addr, T))
    }

    fn bind_witness(state: &Path) -> WitnessServer {
        WitnessServer::bind(loopback(), state).unwrap()
    }

    fn granted(g: u64) -> ClaimOutcome {
        ClaimOutcome::Granted(g)
    }

    fn refused(g: u64, h: &str) -> ClaimOutcome {
        ClaimOutcome::Refused(Grant {
            generation: g,
            holder: Some(h.into()),
        })
    }

    /// Sends raw bytes on one connection, returns the reply line.
    fn raw(conn: &mut TcpStream, reader: &mut BufReader<TcpStream>, bytes: &[u8]) -> String {
        conn.write_all(bytes).unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line
    }

    #[test]
    fn state_file_round_trip() {
        let mut vms = VmMap::new();
        assert_eq!(decode(encode(&vms).as_bytes()).unwrap(), vms);
        vms.insert(
            "vm1".into(),
            Entry {
                generation: 3,
                holder: "host-a".into(),
            },
        );
        vms.insert(
            "db.2".into(),
            Entry {
                generation: u64::MAX,
                holder: "b".into(),
            },
        );
        let text = encode(&vms);
        assert_eq!(decode(text.as_bytes()).unwrap(), vms);
        // Every strict prefix is rejected (a torn write is never accepted).
        for cut in 0..text.len() {
            assert!(decode(&text.as_bytes()[..cut]).is_err(), "prefix {cut}");
        }
        // A changed digit is caught by the checksum.
        let edited = text.replacen("vm vm1 3", "vm vm1 2", 1);
        let e = decode(edited.as_bytes()).unwrap_err();
        assert!(e.contains("checksum"), "{e}");
    }

    #[test]
    fn an_authenticated_witness_serves_only_clients_with_its_key() {
        let dir = TempDir::new("witness-auth");
        let key = |k: &str| Some(Arc::new(Psk::from_bytes(k.as_bytes())));
        let server =
            bind_witness(&dir.path().join("state")).with_psk(key("the witness key, long enough"));
        let addr = server.local_addr();
        let _w = server.spawn().unwrap();
        let good = TcpArbiter::new(addr, T).with_psk(key("the witness key, long enough"));
        assert_eq!(good.claim("vm1", 0, "a").unwrap(), granted(1));
        assert_eq!(good.query("vm1").unwrap().generation, 1);
        let wrong = TcpArbiter::new(addr, T).with_psk(key("another key, just as long"));
        let e = wrong.claim("vm1", 1, "b").unwrap_err();
        assert!(matches!(e, ArbiterError::Auth { .. }), "{e}");
        assert!(
            e.to_string().contains("does not hold the client's key"),
            "{e}"
        );
        let keyless = TcpArbiter::new(addr, T);
        let e = keyless.claim("vm1", 1, "b").unwrap_err();
        assert!(e.to_string().contains("authentication required"), "{e}");
        // A request line with a forged MAC after a real handshake.
        let mut conn = TcpStream::connect(addr).unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let psk = Psk::from_bytes(b"the witness key, long enough");
        let mut session = good.authenticate(&mut reader, &mut conn, &psk).unwrap();
        let sealed = session.seal("CLAIM vm1 1 b");
        let forged = sealed.replacen("CLAIM vm1 1 b", "CLAIM vm1 1 c", 1);
        conn.write_all(forged.as_bytes()).unwrap();
        let mut reply = String::new();
        reader.read_line(&mut reply).unwrap();
        assert!(reply.contains("failed authentication"), "{reply}");
        // Nothing was granted to anyone but the key holder.
        assert_eq!(good.query("vm1").unwrap().holder.as_deref(), Some("a"));
        // A keyed client meeting a keyless witness is told so.
        let open = TempDir::new("witness-open");
        let (open_witness, _) = start(&open.path().join("state"));
        let e = TcpArbiter::new(open_witness.local_addr(), T)
            .with_psk(key("the witness key, long enough"))
            .query("vm1")
            .unwrap_err();
        assert!(e.to_string().contains("no key"), "{e}");
    }

    #[test]
    fn claim_and_query() {
        let dir = TempDir::new("witness-basic");
        let (_w, c) = start(&dir.path().join("state"));
        assert_eq!(c.query("vm1").unwrap(), Grant::unclaimed());
        assert_eq!(
            c.claim("vm1", 1, "a").unwrap(),
            ClaimOutcome::Refused(Grant::unclaimed())
        );
        assert_eq!(c.claim("vm1", 0, "a").unwrap(), granted(1));
        assert_eq!(c.claim("vm1", 0, "b").unwrap(), refused(1, "a"));
        assert_eq!(c.claim("vm1", 1, "b").unwrap(), granted(2));
        assert_eq!(
            c.query("vm1").unwrap(),
            Grant {
                generation: 2,
                holder: Some("b".into())
            }
        );
        // VMs are independent.
        assert_eq!(c.claim("vm2", 0, "a").unwrap(), granted(1));
        assert_eq!(c.query("vm1").unwrap().generation, 2);
        // Client-side validation.
        assert!(matches!(
            c.claim("a/b", 0, "x"),
            Err(ArbiterError::InvalidName { what: "vm", .. })
        ));
        assert!(matches!(
            c.claim("vm1", 0, "-"),
            Err(ArbiterError::InvalidName { what: "holder", .. })
        ));
        assert!(matches!(
            c.claim("vm1", u64::MAX, "x"),
            Err(ArbiterError::GenerationExhausted(_))
        ));
    }

    #[test]
    fn concurrent_claims_one_winner() {
        let dir = TempDir::new("witness-race");
        let (_w, c) = start(&dir.path().join("state"));
        const N: usize = 8;
        for round in 0..5u64 {
            let barrier = Arc::new(Barrier::new(N));
            let threads: Vec<_> = (0..N)
                .map(|i| {
                    let c = c.clone();
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        (
                            format!("h{i}"),
                            c.claim("vm", round, &format!("h{i}")).unwrap(),
                        )
                    })
                })
                .collect();
            let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let winners: Vec<_> = results
                .iter()
                .filter(|(_, o)| *o == granted(round + 1))
                .map(|(h, _)| h.clone())
                .collect();
            assert_eq!(winners.len(), 1, "round {round}: {results:?}");
            for (_, o) in &results {
                if *o != granted(round + 1) {
                    assert_eq!(*o, refused(round + 1, &winners[0]));
                }
            }
            assert_eq!(c.query("vm").unwrap().holder.as_deref(), Some(&*winners[0]));
        }
    }

    #[test]
    fn state_survives_restart() {
        let dir = TempDir::new("witness-restart");
        let state = dir.path().join("state");
        let (w, c) = start(&state);
        for g in 0..3 {
            assert_eq!(c.claim("vm1", g, "a").unwrap(), granted(g + 1));
        }
        assert_eq!(c.claim("vm2", 0, "b").unwrap(), granted(1));
        w.shutdown();
        assert!(c.query("vm1").is_err(), "the witness is gone");
        assert!(!sibling(&state, ".tmp").exists());

        let (_w, c) = start(&state);
        assert_eq!(c.claim("vm1", 2, "b").unwrap(), refused(3, "a"));
        assert_eq!(c.claim("vm1", 3, "b").unwrap(), granted(4));
        assert_eq!(c.query("vm2").unwrap().generation, 1);
    }

    #[test]
    fn torn_tmp_file_is_ignored() {
        // A crash while writing FILE.tmp leaves FILE whole.
        let dir = TempDir::new("witness-torn");
        let state = dir.path().join("state");
        let (w, c) = start(&state);
        assert_eq!(c.claim("vm1", 0, "a").unwrap(), granted(1));
        w.shutdown();
        fs::write(
            sibling(&state, ".tmp"),
            b"tandem-witness-state 1\nvm vm1 7 x",
        )
        .unwrap();
        let (_w, c) = start(&state);
        assert_eq!(c.claim("vm1", 0, "b").unwrap(), refused(1, "a"));
        assert_eq!(c.claim("vm1", 1, "b").unwrap(), granted(2));
        assert!(!sibling(&state, ".tmp").exists());
    }

    #[test]
    fn corrupt_state_is_an_error() {
        let dir = TempDir::new("witness-corrupt");
        let state = dir.path().join("state");
        let (w, c) = start(&state);
        assert_eq!(c.claim("vm1", 0, "a").unwrap(), granted(1));
        w.shutdown();
        let good = fs::read(&state).unwrap();
        let half = good[..good.len() / 2].to_vec();
        for bad in [b"\x00garbage\xff\n".to_vec(), Vec::new(), half] {
            fs::write(&state, &bad).unwrap();
            let Err(e) = WitnessServer::bind(loopback(), &state) else {
                panic!("bound on a corrupt state file {bad:?}");
            };
            assert!(matches!(e, ArbiterError::CorruptState { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains("corrupt") && msg.contains(&*state.to_string_lossy()),
                "{msg}"
            );
            // The file is left as it was, for a human to look at.
            assert_eq!(fs::read(&state).unwrap(), bad);
        }
        // A directory where the file should be: an I/O error, not a reset.
        fs::remove_file(&state).unwrap();
        fs::create_dir(&state).unwrap();
        assert!(matches!(
            WitnessServer::bind(loopback(), &state),
            Err(ArbiterError::Io { .. })
        ));
    }

    #[test]
    fn second_witness_on_same_state_is_refused() {
        let dir = TempDir::new("witness-lock");
        let state = dir.path().join("state");
        let first = bind_witness(&state);
        let e = WitnessServer::bind(loopback(), &state).err().unwrap();
        assert!(matches!(e, ArbiterError::StateLocked { .. }), "{e}");
        drop(first);
        let _again = bind_witness(&state);
    }

    #[test]
    fn failed_persist_stops_granting() {
        let dir = TempDir::new("witness-persist");
        let state = dir.path().join("state");
        let (_w, c) = start(&state);
        assert_eq!(c.claim("vm1", 0, "a").unwrap(), granted(1));
        // FILE.tmp cannot be created when a directory is in the way (even as
        // root).
        let tmp = sibling(&state, ".tmp");
        fs::create_dir(&tmp).unwrap();
        let e = c.claim("vm1", 1, "b").unwrap_err();
        assert!(matches!(e, ArbiterError::Remote { .. }), "{e}");
        assert!(e.to_string().contains("cannot persist"), "{e}");
        fs::remove_dir(&tmp).unwrap();
        // Still refuses: what is on disk is unknown until a restart.
        assert!(matches!(
            c.claim("vm1", 1, "b"),
            Err(ArbiterError::Remote { .. })
        ));
        assert!(matches!(c.query("vm1"), Err(ArbiterError::Remote { .. })));
    }

    #[test]
    fn bad_requests_get_error_and_server_keeps_serving() {
        let dir = TempDir::new("witness-proto");
        let (w, c) = start(&dir.path().join("state"));
        let mut conn = TcpStream::connect(w.local_addr()).unwrap();
        conn.set_read_timeout(Some(T)).unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let bad: &[&[u8]] = &[
            b"\n",
            b"HELLO\n",
            b"QUERY\n",
            b"QUERY a b\n",
            b"QUERY ../x\n",
            b"CLAIM vm1 0\n",
            b"CLAIM vm1 x h\n",
            b"CLAIM vm1 -1 h\n",
            b"CLAIM vm1 +0 h\n",
            b"CLAIM vm1 99999999999999999999999 h\n",
            b"CLAIM vm1 0 -\n",
            b"CLAIM vm/1 0 h\n",
            b"claim vm1 0 h\n",
            b"\xff\xfe\n",
            b"QUERY \xc3\xa9\n",
        ];
        for req in bad {
            let reply = raw(&mut conn, &mut reader, req);
            assert!(
                reply.starts_with("ERROR ") && reply.ends_with('\n'),
                "{req:?} -> {reply:?}"
            );
            assert_eq!(reply.matches('\n').count(), 1, "{reply:?}");
        }
        // The same connection still works, CRLF accepted.
        assert_eq!(raw(&mut conn, &mut reader, b"QUERY vm1\r\n"), "STATE 0 -\n");
        assert_eq!(
            raw(&mut conn, &mut reader, b"CLAIM vm1 0 h\n"),
            "GRANTED 1\n"
        );
        assert_eq!(
            raw(&mut conn, &mut reader, b"CLAIM vm1 0 g\n"),
            "REFUSED 1 h\n"
        );
        assert_eq!(raw(&mut conn, &mut reader, b"QUERY  vm1 \n"), "STATE 1 h\n");

        // An over-long line: ERROR, then the connection is closed.
        let long = vec![b'A'; 3 * MAX_LINE_LEN];
        let _ = conn.write_all(&long);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("ERROR line too long"), "{line}");
        line.clear();
        assert_eq!(reader.read_line(&mut line).unwrap_or(0), 0);

        // A request without a newline before EOF is still answered.
        let mut conn = TcpStream::connect(w.local_addr()).unwrap();
        conn.write_all(b"QUERY vm1").unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut all = String::new();
        conn.read_to_string(&mut all).unwrap();
        assert_eq!(all, "STATE 1 h\n");

        // A client that connects and goes away.
        drop(TcpStream::connect(w.local_addr()).unwrap());
        // And the server still serves everyone else.
        assert_eq!(c.claim("vm1", 1, "z").unwrap(), granted(2));
    }

    #[test]
    fn client_errors_are_clear() {
        // Nothing listens on a port just released.
        let l = TcpListener::bind(loopback()).unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let e = TcpArbiter::new(addr, T).query("vm1").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("witness {addr} unreachable: connection refused")
        );

        // A peer that accepts but never answers.
        let l = TcpListener::bind(loopback()).unwrap();
        let addr = l.local_addr().unwrap();
        let e = TcpArbiter::new(addr, Duration::from_millis(200))
            .claim("vm1", 0, "a")
            .unwrap_err();
        assert!(matches!(e, ArbiterError::Connection { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("reading the reply failed: timed out after 200ms"),
            "{e}"
        );

        // A peer that answers nonsense (a fresh listener: the one above still
        // has the timed-out connection queued).
        let l = TcpListener::bind(loopback()).unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            for reply in [&b"STATE x -\n"[..], b"GRANTED 5\n", b"ERROR nope\n"] {
                let (mut s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                s.write_all(reply).unwrap();
            }
        });
        let c = TcpArbiter::new(addr, T);
        assert!(matches!(c.query("vm1"), Err(ArbiterError::BadReply { .. })));
        assert!(matches!(
            c.claim("vm1", 0, "a"),
            Err(ArbiterError::BadReply { .. })
        ));
        let e = c.query("vm1").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("witness {addr} refused to answer: nope")
        );
        t.join().unwrap();
    }
}
