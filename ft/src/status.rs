//! Where a pair host stands, as its control socket answers it
//! (fencing itself is `fence.rs`).
//!
//! Each side serves a unix control socket (`[hosts] x.control`, default
//! `state_dir/<host>.ctl`): a client connects and reads one JSON line, a
//! [`Status`]: the side's [`Role`], generation, peer state and figures. A
//! client that writes a [`ControlRequest`] line first (`switchover`) gets
//! that request's one-line answer instead; a status client shuts its
//! writing side at once (one that does not is answered after 200 ms). A
//! fenced side stops its VM (taps and disks closed) but keeps answering
//! `role=fenced` with its reason until it is terminated; it then exits with
//! status 124.
//!
//! Size: over 800 lines because the control socket's server, its client
//! commands (`query`, `switch_over`) and its typed `Status` share this file;
//! about a third is tests.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::local_socket::Access;

/// What a side is doing, as its control socket reports it (`"role"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not yet published a role (its control socket is not served yet).
    #[default]
    Starting,
    /// Runs the guest (live), with or without a secondary following.
    Primary,
    /// Follows a primary's log, ready to take over.
    Secondary,
    /// Handed the VM to its peer (`tandem switchover`) and stopped.
    #[serde(rename = "stepped down")]
    SteppedDown,
    /// Stopped itself to avoid a split brain; the status says why.
    Fenced,
}

impl Role {
    /// The name on the wire (`"primary"`, `"stepped down"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::SteppedDown => "stepped down",
            Role::Fenced => "fenced",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A side's live figures (`"lag_ms":12`, ...), in the order they were
/// added; on the wire they follow the fixed fields of [`Status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Figures(Vec<(String, u64)>);

impl Figures {
    /// The figure called `name`, if the side publishes it.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0.iter().find(|(n, _)| n == name).map(|&(_, v)| v)
    }

    /// Adds a figure (after the others).
    pub fn push(&mut self, name: impl Into<String>, value: u64) {
        self.0.push((name.into(), value));
    }

    /// The figures, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(n, v)| (n.as_str(), *v))
    }
}

impl Serialize for Figures {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (name, value) in &self.0 {
            map.serialize_entry(name, value)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Figures {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Figures;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("figures: names with unsigned integer values")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Figures, A::Error> {
                let mut figures = Figures::default();
                while let Some((name, value)) = map.next_entry::<String, u64>()? {
                    figures.push(name, value);
                }
                Ok(figures)
            }
        }
        deserializer.deserialize_map(Visit)
    }
}

/// One answer of a control socket: where a side stands. On the wire, one
/// compact JSON object: `{"role":"primary","generation":1,"peer":"attached",
/// "held_outputs":0,...}` (`"reason"` after `"peer"` only when fenced).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// What the side is doing.
    pub role: Role,
    /// The generation it runs or follows.
    pub generation: u64,
    /// How it sees its peer (`"attached"`, `"none (alone)"`, ...).
    pub peer: String,
    /// Why it fenced itself (fenced sides only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its live figures.
    #[serde(flatten)]
    pub figures: Figures,
}

/// Why a side's status could not be had.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusError {
    /// Nobody answered on the control socket (or the answer broke off).
    NoAnswer(String),
    /// The side answered with an error (this user may not ask, say).
    Refused(String),
    /// Something answered, but not with a status this version reads.
    Garbled {
        /// The answer (shortened).
        text: String,
        /// What is wrong with it.
        problem: String,
    },
}

impl fmt::Display for StatusError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StatusError::NoAnswer(e) | StatusError::Refused(e) => f.write_str(e),
            StatusError::Garbled { text, problem } => {
                write!(f, "garbled status {text:?}: {problem}")
            }
        }
    }
}

impl std::error::Error for StatusError {}

/// Longest piece of a garbled answer (and of what is wrong with it) quoted
/// in an error.
const QUOTED_MAX: usize = 120;

/// `text`, cut to [`QUOTED_MAX`] characters (marked `...` when cut).
fn shortened(text: &str) -> String {
    let mut shown: String = text.chars().take(QUOTED_MAX).collect();
    if shown.len() < text.len() {
        shown.push_str("...");
    }
    shown
}

impl Status {
    /// Reads one control-socket answer (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Status, StatusError> {
        let text = text.trim();
        let garbled = |problem: &str| StatusError::Garbled {
            text: shortened(text),
            problem: shortened(problem),
        };
        if text.is_empty() {
            return Err(garbled("empty answer"));
        }
        serde_json::from_str(text).map_err(|e| garbled(&e.to_string()))
    }

    /// One compact JSON line, as the control socket sends it.
    pub fn to_json(&self) -> String {
        // Keys are strings and values plain numbers or strings: this cannot
        // fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// `role=primary generation=1 peer=attached name=value ...`: the
    /// status as `tandem status` prints it without `--json`.
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "role={} generation={} peer={}",
            self.role, self.generation, self.peer
        );
        if let Some(reason) = &self.reason {
            out.push_str(&format!(" reason={reason}"));
        }
        for (name, value) in self.figures.iter() {
            out.push_str(&format!(" {name}={value}"));
        }
        out
    }
}

/// What a client may ask on a control socket: one line, the request's
/// name; nothing written (or `status`) asks for the [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ControlRequest {
    /// The side's status, one JSON line.
    Status,
    /// The live side hands the VM to its secondary (`tandem switchover`).
    Switchover,
}

impl ControlRequest {
    /// Every request.
    pub const ALL: [ControlRequest; 2] = [ControlRequest::Status, ControlRequest::Switchover];

    /// The request's line on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ControlRequest::Status => "status",
            ControlRequest::Switchover => "switchover",
        }
    }

    /// Reads a request line (white space around it ignored; empty is
    /// [`ControlRequest::Status`]).
    pub fn parse(line: &str) -> Result<ControlRequest, String> {
        let name = line.trim();
        if name.is_empty() {
            return Ok(ControlRequest::Status);
        }
        ControlRequest::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| format!("unknown command {name:?}"))
    }
}

impl fmt::Display for ControlRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ControlRequest {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ControlRequest::parse(s)
    }
}

/// What a side publishes besides its figures.
#[derive(Default)]
struct Board {
    role: Role,
    generation: u64,
    peer: String,
    fenced: Option<String>,
}

type Probe = Arc<dyn Fn() -> u64 + Send + Sync>;

/// A control request's handler: its one-line answer.
pub type Command = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// A side's status, shared by its threads.
#[derive(Default)]
pub struct StatusBoard {
    board: Mutex<Board>,
    probes: Mutex<Vec<(&'static str, Probe)>>,
    commands: Mutex<Vec<(ControlRequest, Command)>>,
}

impl StatusBoard {
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets role, generation and peer state.
    pub fn set(&self, role: Role, generation: u64, peer: &str) {
        let mut b = self.board();
        if b.fenced.is_none() {
            b.role = role;
        }
        b.generation = generation;
        b.peer = peer.to_string();
    }

    /// Adds a live figure (read when someone asks).
    pub fn probe(&self, name: &'static str, f: Probe) {
        self.probes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((name, f));
    }

    /// Serves `request` on the control socket with `f`.
    pub fn command(&self, request: ControlRequest, f: Command) {
        self.commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((request, f));
    }

    /// The requests this side serves now (`status, switchover`).
    fn known(&self) -> String {
        let commands = self.commands.lock().unwrap_or_else(|p| p.into_inner());
        std::iter::once(ControlRequest::Status.name())
            .chain(commands.iter().map(|(r, _)| r.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One client: a request line, or (nothing written) the status.
    fn answer(&self, mut client: UnixStream) {
        use std::io::BufRead;
        let _ = client.set_read_timeout(Some(Duration::from_millis(200)));
        let mut line = String::new();
        if let Ok(reader) = client.try_clone() {
            let _ = std::io::BufReader::new(reader).read_line(&mut line);
        }
        let request = match ControlRequest::parse(&line) {
            Ok(ControlRequest::Status) => {
                let _ = writeln!(client, "{}", self.render());
                return;
            }
            Ok(request) => request,
            Err(e) => {
                let _ = writeln!(client, "error: {e} (this side knows: {})", self.known());
                return;
            }
        };
        let handler = self
            .commands
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(r, _)| *r == request)
            .map(|(_, f)| f.clone());
        let reply = match handler {
            Some(f) => match f() {
                Ok(text) => format!("ok: {text}"),
                Err(text) => format!("error: {text}"),
            },
            None => format!(
                "error: unknown command {:?} (this side knows: {})",
                request.name(),
                self.known()
            ),
        };
        let _ = writeln!(client, "{reply}");
    }

    /// This side fenced itself.
    pub fn fenced(&self, reason: &str) {
        let mut b = self.board();
        b.role = Role::Fenced;
        b.fenced = Some(reason.to_string());
    }

    /// Has this side fenced itself?
    pub fn is_fenced(&self) -> bool {
        self.board().fenced.is_some()
    }

    /// Where this side stands now (its figures read now).
    pub fn status(&self) -> Status {
        let b = self.board();
        let mut status = Status {
            role: b.role,
            generation: b.generation,
            peer: b.peer.clone(),
            reason: b.fenced.clone(),
            figures: Figures::default(),
        };
        drop(b);
        for (name, f) in self.probes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            status.figures.push(*name, f());
        }
        status
    }

    /// The status as one JSON object (one line).
    pub fn render(&self) -> String {
        self.status().to_json()
    }

    /// Serves `path` in the background, to the clients `access` lets in:
    /// each gets one JSON line (or its command's answer).
    pub fn serve(self: &Arc<Self>, path: &Path, access: Access) -> std::io::Result<()> {
        let listener = access.bind(path)?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("tandem-control".into())
            .spawn(move || {
                for mut client in listener.incoming().flatten() {
                    if let Err(why) = access.check(&client) {
                        tracing::warn!("control socket: {why}");
                        let _ = writeln!(client, "error: {why}");
                        continue;
                    }
                    let me = me.clone();
                    let _ = std::thread::Builder::new()
                        .name("tandem-control-client".into())
                        .spawn(move || me.answer(client));
                }
            })?;
        Ok(())
    }
}

/// A probe for "milliseconds since `last` (ms since `base`)".
pub fn age_probe(base: Instant, last: Arc<AtomicU64>) -> Probe {
    Arc::new(move || {
        u64::try_from(base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_sub(last.load(Ordering::Acquire))
    })
}

/// Reads a side's status answer (its text) from its control socket.
pub fn query(path: &Path) -> Result<String, StatusError> {
    let no_answer = |e: std::io::Error| StatusError::NoAnswer(e.to_string());
    let mut s = UnixStream::connect(path)
        .map_err(|e| StatusError::NoAnswer(format!("no answer on {}: {e}", path.display())))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(no_answer)?;
    // Nothing to ask beyond the status: say so at once.
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(no_answer)?;
    if let Some(why) = text.trim().strip_prefix("error: ") {
        return Err(StatusError::Refused(format!("{}: {why}", path.display())));
    }
    Ok(text.trim().to_string())
}

/// Reads a side's status from its control socket.
pub fn query_status(path: &Path) -> Result<Status, StatusError> {
    Status::parse(&query(path)?)
}

/// Sends `request` on a side's control socket and returns its answer
/// (waiting up to `limit`).
pub fn send_command(
    path: &Path,
    request: ControlRequest,
    limit: Duration,
) -> Result<String, String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("no answer on {}: {e}", path.display()))?;
    s.set_read_timeout(Some(limit)).map_err(|e| e.to_string())?;
    writeln!(s, "{request}").map_err(|e| e.to_string())?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text.trim().to_string())
}

/// The control socket of a host.
pub fn control_path(explicit: Option<&Path>, state_dir: &Path, host: &str) -> PathBuf {
    explicit.map_or_else(|| state_dir.join(format!("{host}.ctl")), Path::to_path_buf)
}

/// Asks the live side of the pair `cfg` to hand the VM to its secondary.
/// With `to`, only if the VM is not already live on that host (then says
/// so). Returns the live side's answer, prefixed with its host.
pub fn switch_over(
    cfg: &tandem_config::PairConfig,
    to: Option<tandem_config::HostId>,
) -> Result<String, String> {
    use tandem_config::HostId;
    let control = |host: HostId| {
        control_path(
            cfg.host(host).control.as_deref(),
            &cfg.ft.state_dir,
            host.name(),
        )
    };
    let mut garbled = Vec::new();
    let live = [HostId::A, HostId::B].into_iter().find(|&host| {
        match query(&control(host)).and_then(|text| is_primary(&text)) {
            Ok(primary) => primary,
            Err(e @ (StatusError::Garbled { .. } | StatusError::Refused(_))) => {
                garbled.push(format!("host {}: {e}", host.name()));
                false
            }
            Err(StatusError::NoAnswer(_)) => false,
        }
    });
    let Some(host) = live else {
        let mut text = format!(
            "{}: neither host's control socket reports a live primary",
            cfg.vm.name
        );
        if !garbled.is_empty() {
            text.push_str(&format!(" ({})", garbled.join("; ")));
        }
        return Err(text);
    };
    if to == Some(host) {
        return Ok(format!(
            "{} is already live on host {}",
            cfg.vm.name,
            host.name()
        ));
    }
    let limit = cfg.ft.failover_timeout * 4 + Duration::from_secs(5);
    match send_command(&control(host), ControlRequest::Switchover, limit) {
        Ok(answer) if answer.starts_with("ok: ") => {
            Ok(format!("host {}: {}", host.name(), &answer[4..]))
        }
        Ok(answer) => Err(format!("host {}: {answer}", host.name())),
        Err(e) => Err(format!("host {}: {e}", host.name())),
    }
}

/// Whether one control-socket answer shows its side as the live primary
/// (an error for an answer that is not a status).
pub fn is_primary(answer: &str) -> Result<bool, StatusError> {
    Ok(Status::parse(answer)?.role == Role::Primary)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: [Role; 5] = [
        Role::Starting,
        Role::Primary,
        Role::Secondary,
        Role::SteppedDown,
        Role::Fenced,
    ];

    fn primary() -> Status {
        let mut figures = Figures::default();
        figures.push("held_outputs", 0);
        figures.push("inputs_dropped", 7);
        figures.push("lag_ms", u64::MAX);
        Status {
            role: Role::Primary,
            generation: 3,
            peer: "none (alone)".into(),
            reason: None,
            figures,
        }
    }

    #[test]
    fn roles_are_their_lowercase_names_on_the_wire() {
        for role in ROLES {
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.name()));
            assert_eq!(role.to_string(), role.name());
            assert_eq!(serde_json::from_str::<Role>(&json).unwrap(), role);
        }
        assert_eq!(
            serde_json::to_string(&Role::Primary).unwrap(),
            "\"primary\""
        );
        assert_eq!(
            serde_json::to_string(&Role::Secondary).unwrap(),
            "\"secondary\""
        );
        assert_eq!(serde_json::to_string(&Role::Fenced).unwrap(), "\"fenced\"");
        assert_eq!(
            serde_json::to_string(&Role::SteppedDown).unwrap(),
            "\"stepped down\""
        );
        for bad in ["\"Primary\"", "\"boss\"", "\"\"", "1", "null"] {
            assert!(serde_json::from_str::<Role>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_status_is_one_compact_line_in_a_fixed_order() {
        let s = primary();
        let json = s.to_json();
        assert_eq!(
            json,
            format!(
                "{{\"role\":\"primary\",\"generation\":3,\"peer\":\"none (alone)\",\"held_outputs\":0,\"inputs_dropped\":7,\"lag_ms\":{}}}",
                u64::MAX
            )
        );
        assert!(json.contains("\"role\":\"primary\""));
        assert!(json.contains("\"peer\":\"none (alone)\""));
        assert!(json.contains("\"inputs_dropped\":7"));
        let back = Status::parse(&json).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.figures.get("inputs_dropped"), Some(7));
        assert_eq!(back.figures.get("nothing"), None);
        let names: Vec<&str> = back.figures.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["held_outputs", "inputs_dropped", "lag_ms"]);
    }

    #[test]
    fn a_fenced_status_carries_its_reason_after_the_peer() {
        let s = Status {
            role: Role::Fenced,
            generation: 2,
            peer: "connected".into(),
            reason: Some("lost the \"lease\": peer a\nlive".into()),
            figures: Figures::default(),
        };
        let json = s.to_json();
        assert!(
            json.starts_with(
                "{\"role\":\"fenced\",\"generation\":2,\"peer\":\"connected\",\"reason\":\"lost the \\\"lease\\\": peer a\\nlive\""
            ),
            "{json}"
        );
        assert!(!json.contains('\n'), "{json}");
        assert_eq!(Status::parse(&json).unwrap(), s);
        assert_eq!(
            s.to_text(),
            "role=fenced generation=2 peer=connected reason=lost the \"lease\": peer a\nlive"
        );
    }

    #[test]
    fn status_text_for_tandem_status() {
        assert_eq!(
            primary().to_text(),
            format!(
                "role=primary generation=3 peer=none (alone) held_outputs=0 inputs_dropped=7 lag_ms={}",
                u64::MAX
            )
        );
    }

    #[test]
    fn garbled_answers_are_errors_not_panics() {
        for bad in [
            "",
            "   \n",
            "nonsense",
            "{",
            "[1,2]",
            "{\"generation\":1,\"peer\":\"x\"}",
            "{\"role\":\"boss\",\"generation\":1,\"peer\":\"x\"}",
            "{\"role\":\"primary\",\"generation\":-1,\"peer\":\"x\"}",
            "{\"role\":\"primary\",\"generation\":1,\"peer\":\"x\",\"lag_ms\":-5}",
            "{\"role\":\"primary\",\"generation\":1,\"peer\":\"x\",\"lag_ms\":\"many\"}",
            "{\"role\":\"primary\",\"generation\":1,\"peer\":\"x\"}{}",
            "error: unknown command \"status\" (this side knows: status)",
        ] {
            match Status::parse(bad) {
                Err(e @ StatusError::Garbled { .. }) => {
                    assert!(e.to_string().starts_with("garbled status "), "{e}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let e = Status::parse("{\"role\":\"boss\",\"generation\":1,\"peer\":\"x\"}").unwrap_err();
        assert!(e.to_string().contains("unknown variant `boss`"), "{e}");
        let long = format!("{{\"role\":\"{}\"}}", "x".repeat(1000));
        let e = Status::parse(&long).unwrap_err().to_string();
        assert!(e.len() < 400, "{e}");
        assert!(e.contains("..."), "{e}");
        // Multi-byte text is cut on a character boundary.
        let e = Status::parse(&"é".repeat(500)).unwrap_err().to_string();
        assert!(e.contains("..."), "{e}");
    }

    #[test]
    fn a_status_with_no_figures_reads_back() {
        let s = Status::parse("{\"role\":\"secondary\",\"generation\":0,\"peer\":\"connected\"}")
            .unwrap();
        assert_eq!(s.role, Role::Secondary);
        assert_eq!(s.figures, Figures::default());
        assert_eq!(s.reason, None);
    }

    #[test]
    fn control_requests_round_trip() {
        for request in ControlRequest::ALL {
            assert_eq!(ControlRequest::parse(request.name()), Ok(request));
            assert_eq!(request.to_string().parse::<ControlRequest>(), Ok(request));
            assert_eq!(
                ControlRequest::parse(&format!("  {request}\n")),
                Ok(request)
            );
        }
        assert_eq!(ControlRequest::parse(""), Ok(ControlRequest::Status));
        assert_eq!(ControlRequest::parse("\n"), Ok(ControlRequest::Status));
        assert_eq!(ControlRequest::Switchover.name(), "switchover");
        assert_eq!(
            ControlRequest::parse("reboot"),
            Err("unknown command \"reboot\"".to_string())
        );
        assert!(ControlRequest::parse("Switchover").is_err());
    }

    #[test]
    fn the_board_renders_what_was_set_and_stays_fenced() {
        let board = StatusBoard::default();
        board.set(Role::Primary, 1, "attached");
        board.probe("held_outputs", Arc::new(|| 4));
        assert_eq!(
            board.render(),
            "{\"role\":\"primary\",\"generation\":1,\"peer\":\"attached\",\"held_outputs\":4}"
        );
        board.fenced("peer is live");
        board.set(Role::Primary, 2, "none (took over)");
        let s = Status::parse(&board.render()).unwrap();
        assert_eq!(s.role, Role::Fenced);
        assert_eq!(s.reason.as_deref(), Some("peer is live"));
        assert_eq!(s.generation, 2);
        assert!(board.is_fenced());
    }

    #[test]
    fn the_control_socket_answers_status_and_requests() {
        let dir = std::env::temp_dir().join(format!("tandem-status-test-{}", std::process::id()));
        let path = dir.join("a.ctl");
        let board = Arc::new(StatusBoard::default());
        board.set(Role::Secondary, 5, "connected");
        board.probe("last_heartbeat_ms", Arc::new(|| 12));
        board.serve(&path, Access::new(None)).unwrap();

        let s = query_status(&path).unwrap();
        assert_eq!(s.role, Role::Secondary);
        assert_eq!(s.figures.get("last_heartbeat_ms"), Some(12));
        let limit = Duration::from_secs(2);
        assert_eq!(
            Status::parse(&send_command(&path, ControlRequest::Status, limit).unwrap()).unwrap(),
            s
        );
        assert_eq!(
            send_command(&path, ControlRequest::Switchover, limit).unwrap(),
            "error: unknown command \"switchover\" (this side knows: status)"
        );
        board.command(
            ControlRequest::Switchover,
            Arc::new(|| Ok("handed over".into())),
        );
        assert_eq!(
            send_command(&path, ControlRequest::Switchover, limit).unwrap(),
            "ok: handed over"
        );
        let mut raw = UnixStream::connect(&path).unwrap();
        writeln!(raw, "reboot").unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = String::new();
        raw.read_to_string(&mut text).unwrap();
        assert_eq!(
            text.trim(),
            "error: unknown command \"reboot\" (this side knows: status, switchover)"
        );
        assert!(matches!(
            query_status(&dir.join("nobody.ctl")),
            Err(StatusError::NoAnswer(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
