//! `[ft]`: timing, output commit, storage, crash policy, the witness and
//! etcd, state and key files, sockets, the brake, announcements.

use super::*;

/// `[ft]` (optional: all defaults when left out), key group by key group.
pub(crate) fn validate_ft(
    ctx: &Ctx,
    raw: Option<Spanned<RawFt>>,
    vm_name: &str,
) -> Result<FtConfig, ConfigError> {
    let (sec, raw) = match raw {
        Some(raw) => (raw.span(), raw.into_inner()),
        None => (0..0, RawFt::default()),
    };

    let (heartbeat, failover_timeout) = ft_failure_detection(ctx, &raw, &sec)?;
    let output_commit = ft_output_commit(ctx, raw.output_commit.as_ref())?;
    let storage = ft_storage(ctx, raw.storage.as_ref())?;
    let on_guest_crash = ft_on_guest_crash(ctx, &raw, &sec)?;
    let witness = ft_witness(ctx, raw.witness.as_ref())?;
    let etcd = ft_etcd(ctx, &raw, witness.as_ref())?;
    let state_dir = ft_state_dir(ctx, raw.state_dir.as_ref(), vm_name)?;
    let (fence_command, respawn) = ft_commands(ctx, &raw)?;
    let (psk_file, witness_key_file) = ft_key_files(ctx, &raw)?;
    let encrypt = raw.encrypt.as_ref().map_or(true, |e| *e.get_ref());
    let verify_peer_address = raw
        .verify_peer_address
        .as_ref()
        .map_or(true, |v| *v.get_ref());
    let socket_group = ft_socket_group(ctx, raw.socket_group.as_ref())?;
    let max_unacked_bytes = ft_max_unacked_bytes(ctx, raw.max_unacked_bytes.as_ref())?;
    let (max_lag_ms, _) = millis(
        ctx,
        &sec,
        &raw.max_lag_ms,
        "max_lag_ms",
        DEFAULT_MAX_LAG_MS,
        1,
    )?;
    let (max_replay_lag_ms, _) = millis(
        ctx,
        &sec,
        &raw.max_replay_lag_ms,
        "max_replay_lag_ms",
        DEFAULT_MAX_REPLAY_LAG_MS,
        1,
    )?;
    let announce = ft_announce(ctx, &raw, &sec)?;
    let position = ft_position(ctx, raw.position.as_ref())?;
    // At most a second: beyond that a guest's timer would stall visibly.
    let (irq_defer_us, at) = or_default(&raw.irq_defer_us, 0, &sec);
    if irq_defer_us > 1_000_000 {
        return Err(ctx.invalid(
            &at,
            FT,
            "irq_defer_us",
            irq_defer_us,
            "must be at most 1000000 (a second)".to_string(),
        ));
    }

    Ok(FtConfig {
        position,
        irq_defer: Duration::from_micros(irq_defer_us),
        heartbeat,
        failover_timeout,
        output_commit,
        storage,
        witness,
        state_dir,
        fence_command,
        respawn,
        psk_file,
        witness_key_file,
        etcd,
        encrypt,
        verify_peer_address,
        socket_group,
        on_guest_crash,
        max_unacked_bytes,
        max_lag: Duration::from_millis(max_lag_ms),
        max_replay_lag: Duration::from_millis(max_replay_lag_ms),
        announce,
    })
}

/// An `[ft]` milliseconds key: its value (or `default`) and where it is,
/// refused below `min`.
fn millis(
    ctx: &Ctx,
    sec: &Range<usize>,
    field: &Option<Spanned<u64>>,
    key: &str,
    default: u64,
    min: u64,
) -> Result<(u64, Range<usize>), ConfigError> {
    let (ms, at) = or_default(field, default, sec);
    if ms < min {
        return Err(ctx.invalid(&at, FT, key, ms, format!("must be at least {min}")));
    }
    Ok((ms, at))
}

/// `heartbeat_ms` and `failover_timeout_ms`: both at least 1, and the
/// timeout more than twice the heartbeat.
fn ft_failure_detection(
    ctx: &Ctx,
    raw: &RawFt,
    sec: &Range<usize>,
) -> Result<(Duration, Duration), ConfigError> {
    let (heartbeat_ms, hb_at) = millis(
        ctx,
        sec,
        &raw.heartbeat_ms,
        "heartbeat_ms",
        DEFAULT_HEARTBEAT_MS,
        1,
    )?;
    let (timeout_ms, _) = millis(
        ctx,
        sec,
        &raw.failover_timeout_ms,
        "failover_timeout_ms",
        DEFAULT_FAILOVER_TIMEOUT_MS,
        1,
    )?;
    if timeout_ms <= heartbeat_ms.saturating_mul(2) {
        // Point at the timeout if written, else at the heartbeat that made
        // the default too small.
        let at = raw
            .failover_timeout_ms
            .as_ref()
            .map_or(hb_at, Spanned::span);
        let value = match raw.failover_timeout_ms {
            Some(_) => timeout_ms.to_string(),
            None => format!("{timeout_ms} (the default)"),
        };
        return Err(ctx.invalid(
            &at,
            FT,
            "failover_timeout_ms",
            value,
            format!("must be more than twice heartbeat_ms ({heartbeat_ms})"),
        ));
    }
    Ok((
        Duration::from_millis(heartbeat_ms),
        Duration::from_millis(timeout_ms),
    ))
}

/// `output_commit`: `"received"` (the default) or `"replayed"`.
fn ft_output_commit(
    ctx: &Ctx,
    field: Option<&Spanned<String>>,
) -> Result<OutputCommit, ConfigError> {
    let Some(o) = field else {
        return Ok(OutputCommit::default());
    };
    match o.get_ref().as_str() {
        "received" => Ok(OutputCommit::Received),
        "replayed" => Ok(OutputCommit::Replayed),
        other => Err(ctx.invalid(
            &o.span(),
            FT,
            "output_commit",
            format!("{other:?}"),
            "must be \"received\" or \"replayed\"",
        )),
    }
}

/// `position`: `"none"` (the default), `"auto"` or `"kvm-insn-stat"`.
fn ft_position(
    ctx: &Ctx,
    field: Option<&Spanned<String>>,
) -> Result<tandem_vmm::position::PositionChoice, ConfigError> {
    use tandem_vmm::position::PositionChoice;
    let Some(s) = field else {
        return Ok(PositionChoice::None);
    };
    match s.get_ref().as_str() {
        "none" => Ok(PositionChoice::None),
        "auto" => Ok(PositionChoice::Auto),
        "kvm-insn-stat" => Ok(PositionChoice::KvmInsnStat),
        other => Err(ctx.invalid(
            &s.span(),
            FT,
            "position",
            format!("{other:?}"),
            "must be \"none\", \"auto\" or \"kvm-insn-stat\"",
        )),
    }
}

/// `storage`: `"shared"` (the default) or `"mirrored"`.
fn ft_storage(ctx: &Ctx, field: Option<&Spanned<String>>) -> Result<Storage, ConfigError> {
    let Some(s) = field else {
        return Ok(Storage::default());
    };
    match s.get_ref().as_str() {
        "shared" => Ok(Storage::Shared),
        "mirrored" => Ok(Storage::Mirrored),
        other => Err(ctx.invalid(
            &s.span(),
            FT,
            "storage",
            format!("{other:?}"),
            "must be \"shared\" or \"mirrored\"",
        )),
    }
}

/// `checkpoint_interval_ms` (1 to 10000) and `on_guest_crash` (`"reboot"`,
/// the default, `"halt"` or `"restart-checkpoint"`, which uses the interval).
fn ft_on_guest_crash(
    ctx: &Ctx,
    raw: &RawFt,
    sec: &Range<usize>,
) -> Result<tandem_vmm::CrashPolicy, ConfigError> {
    let (interval_ms, interval_at) = millis(
        ctx,
        sec,
        &raw.checkpoint_interval_ms,
        "checkpoint_interval_ms",
        u64::from(tandem_vmm::vcpu::DEFAULT_CHECKPOINT_INTERVAL_MS),
        1,
    )?;
    if interval_ms > 10_000 {
        return Err(ctx.invalid(
            &interval_at,
            FT,
            "checkpoint_interval_ms",
            interval_ms,
            "must be at most 10000 (output waits up to this long for a checkpoint)",
        ));
    }
    let Some(p) = &raw.on_guest_crash else {
        return Ok(tandem_vmm::CrashPolicy::Reboot);
    };
    match p.get_ref().as_str() {
        "reboot" => Ok(tandem_vmm::CrashPolicy::Reboot),
        "halt" => Ok(tandem_vmm::CrashPolicy::Halt),
        "restart-checkpoint" => Ok(tandem_vmm::CrashPolicy::RestartCheckpoint {
            interval_ms: interval_ms as u32,
        }),
        other => Err(ctx.invalid(
            &p.span(),
            FT,
            "on_guest_crash",
            format!("{other:?}"),
            "must be \"reboot\", \"halt\" or \"restart-checkpoint\"",
        )),
    }
}

/// `witness`: the arbiter, when one is given (see `parse_witness`).
fn ft_witness(ctx: &Ctx, field: Option<&Spanned<String>>) -> Result<Option<Witness>, ConfigError> {
    let Some(w) = field else {
        return Ok(None);
    };
    parse_witness(w.get_ref())
        .map(Some)
        .map_err(|p| ctx.invalid(&w.span(), FT, "witness", quoted(w), p))
}

/// The `etcd_*` keys: consistent among themselves (see `etcd_access`), and
/// only given with an `etcd://` witness.
fn ft_etcd(ctx: &Ctx, raw: &RawFt, witness: Option<&Witness>) -> Result<EtcdAccess, ConfigError> {
    let etcd = etcd_access(&EtcdFields {
        ca: raw.etcd_ca.as_ref(),
        cert: raw.etcd_cert.as_ref(),
        key: raw.etcd_key.as_ref(),
        user: raw.etcd_user.as_ref(),
        password_file: raw.etcd_password_file.as_ref(),
    })
    .map_err(|bad| ctx.invalid(&bad.at, FT, bad.key, bad.value, bad.problem))?;
    if etcd != EtcdAccess::default() && !matches!(witness, Some(Witness::Etcd { .. })) {
        let (key, field) = [
            ("etcd_ca", &raw.etcd_ca),
            ("etcd_cert", &raw.etcd_cert),
            ("etcd_key", &raw.etcd_key),
            ("etcd_user", &raw.etcd_user),
            ("etcd_password_file", &raw.etcd_password_file),
        ]
        .into_iter()
        .find(|(_, f)| f.is_some())
        .unwrap_or(("etcd_ca", &raw.etcd_ca));
        if let Some(f) = field {
            return Err(ctx.invalid(
                &f.span(),
                FT,
                key,
                quoted(f),
                "is for an etcd witness, and [ft] witness is not \"etcd://...\"",
            ));
        }
    }
    Ok(etcd)
}

/// `state_dir`: not empty; by default `DEFAULT_STATE_ROOT`/VM name.
fn ft_state_dir(
    ctx: &Ctx,
    field: Option<&Spanned<String>>,
    vm_name: &str,
) -> Result<PathBuf, ConfigError> {
    match field {
        None => Ok(Path::new(DEFAULT_STATE_ROOT).join(vm_name)),
        Some(d) if d.get_ref().is_empty() => {
            Err(ctx.invalid(&d.span(), FT, "state_dir", "\"\"", "is empty"))
        }
        Some(d) => Ok(PathBuf::from(d.get_ref())),
    }
}

/// An optional `[ft]` string key that must not be blank when given.
fn non_blank(
    ctx: &Ctx,
    field: &Option<Spanned<String>>,
    key: &str,
    problem: &str,
) -> Result<Option<String>, ConfigError> {
    match field {
        None => Ok(None),
        Some(f) if f.get_ref().trim().is_empty() => {
            Err(ctx.invalid(&f.span(), FT, key, quoted(f), problem))
        }
        Some(f) => Ok(Some(f.get_ref().clone())),
    }
}

/// `fence_command` and `respawn`: shell commands, not blank when given.
fn ft_commands(ctx: &Ctx, raw: &RawFt) -> Result<(Option<String>, Option<String>), ConfigError> {
    let fence_command = non_blank(
        ctx,
        &raw.fence_command,
        "fence_command",
        "is empty (leave the key out for no fencing)",
    )?;
    let respawn = non_blank(
        ctx,
        &raw.respawn,
        "respawn",
        "is empty (leave the key out to start secondaries by hand)",
    )?;
    Ok((fence_command, respawn))
}

/// `psk_file` and `witness_key_file`: key file paths, not blank when given.
fn ft_key_files(ctx: &Ctx, raw: &RawFt) -> Result<(Option<PathBuf>, Option<PathBuf>), ConfigError> {
    let psk_file = non_blank(
        ctx,
        &raw.psk_file,
        "psk_file",
        "is empty (make a key with `tandem keygen FILE`)",
    )?;
    let witness_key_file = non_blank(
        ctx,
        &raw.witness_key_file,
        "witness_key_file",
        "is empty (leave the key out to use the key derived from psk_file)",
    )?;
    Ok((
        psk_file.map(PathBuf::from),
        witness_key_file.map(PathBuf::from),
    ))
}

/// `socket_group`: a group that exists on this host, as its id.
fn ft_socket_group(ctx: &Ctx, field: Option<&Spanned<String>>) -> Result<Option<u32>, ConfigError> {
    let Some(g) = field else {
        return Ok(None);
    };
    let gid = crate::names::group_id(g.get_ref()).ok_or_else(|| {
        ctx.invalid(
            &g.span(),
            FT,
            "socket_group",
            quoted(g),
            "is no group on this host",
        )
    })?;
    Ok(Some(gid))
}

/// `max_unacked_bytes`: a size of at least `MIN_MAX_UNACKED_BYTES`
/// (default `DEFAULT_MAX_UNACKED_BYTES`).
fn ft_max_unacked_bytes(ctx: &Ctx, field: Option<&Spanned<RawSize>>) -> Result<u64, ConfigError> {
    let Some(m) = field else {
        return Ok(DEFAULT_MAX_UNACKED_BYTES);
    };
    let bad = |p: String| ctx.invalid(&m.span(), FT, "max_unacked_bytes", m.get_ref(), p);
    let n = parse_size(m.get_ref()).map_err(bad)?;
    if n < MIN_MAX_UNACKED_BYTES {
        return Err(bad(format!(
            "must be at least {}M",
            MIN_MAX_UNACKED_BYTES >> 20
        )));
    }
    Ok(n)
}

/// The `announce_*` keys: at least one round, a positive cap, and the cap
/// no smaller than the initial delay (defaults from `DEFAULT_ANNOUNCE`).
fn ft_announce(ctx: &Ctx, raw: &RawFt, sec: &Range<usize>) -> Result<Announce, ConfigError> {
    let d = DEFAULT_ANNOUNCE;
    let (rounds, rounds_at) = or_default(&raw.announce_rounds, d.rounds, sec);
    if rounds == 0 {
        return Err(ctx.invalid(&rounds_at, FT, "announce_rounds", 0, "must be at least 1"));
    }
    let ms = |x: Duration| x.as_millis() as u64;
    let (initial, initial_at) = millis(
        ctx,
        sec,
        &raw.announce_initial_ms,
        "announce_initial_ms",
        ms(d.initial),
        0,
    )?;
    let (step, _) = millis(
        ctx,
        sec,
        &raw.announce_step_ms,
        "announce_step_ms",
        ms(d.step),
        0,
    )?;
    let (max, max_at) = millis(
        ctx,
        sec,
        &raw.announce_max_ms,
        "announce_max_ms",
        ms(d.max),
        1,
    )?;
    if max < initial {
        let at = raw.announce_max_ms.as_ref().map_or(initial_at, |_| max_at);
        return Err(ctx.invalid(
            &at,
            FT,
            "announce_max_ms",
            max,
            format!("must be at least announce_initial_ms ({initial})"),
        ));
    }
    Ok(Announce {
        rounds,
        initial: Duration::from_millis(initial),
        step: Duration::from_millis(step),
        max: Duration::from_millis(max),
    })
}

/// The etcd access fields of a section, as written.
pub(crate) struct EtcdFields<'a> {
    pub ca: Option<&'a Spanned<String>>,
    pub cert: Option<&'a Spanned<String>>,
    pub key: Option<&'a Spanned<String>>,
    pub user: Option<&'a Spanned<String>>,
    pub password_file: Option<&'a Spanned<String>>,
}

/// A refused etcd access field: where, which, as written, and why.
pub(crate) struct BadField {
    pub at: Range<usize>,
    pub key: &'static str,
    pub value: String,
    pub problem: &'static str,
}

/// Checks the etcd access fields of a section: each path non-empty, a
/// certificate with its key and a CA, a user with its password file.
pub(crate) fn etcd_access(f: &EtcdFields) -> Result<EtcdAccess, BadField> {
    let bad = |key: &'static str, v: &Spanned<String>, problem: &'static str| BadField {
        at: v.span(),
        key,
        value: quoted(v),
        problem,
    };
    let path = |key: &'static str, v: Option<&Spanned<String>>| match v {
        None => Ok(None),
        Some(v) if v.get_ref().trim().is_empty() => Err(bad(key, v, "is empty")),
        Some(v) => Ok(Some(PathBuf::from(v.get_ref()))),
    };
    let ca = path("etcd_ca", f.ca)?;
    let cert = path("etcd_cert", f.cert)?;
    let key = path("etcd_key", f.key)?;
    let password_file = path("etcd_password_file", f.password_file)?;
    let identity = match (f.cert.zip(cert), f.key.zip(key)) {
        (None, None) => None,
        (Some((c, _)), None) => {
            return Err(bad(
                "etcd_cert",
                c,
                "needs etcd_key (the certificate's private key)",
            ))
        }
        (None, Some((k, _))) => {
            return Err(bad(
                "etcd_key",
                k,
                "needs etcd_cert (the client certificate it belongs to)",
            ))
        }
        (Some((c, cert)), Some((_, key))) => {
            if ca.is_none() {
                return Err(bad(
                    "etcd_cert",
                    c,
                    "needs etcd_ca (the CA of etcd's server certificates: client certificates go over TLS)",
                ));
            }
            Some((cert, key))
        }
    };
    let user = match (f.user, f.password_file.zip(password_file)) {
        (None, None) => None,
        (Some(u), None) => {
            return Err(bad(
                "etcd_user",
                u,
                "needs etcd_password_file (a file, mode 0600, that holds its password)",
            ))
        }
        (None, Some((p, _))) => {
            return Err(bad(
                "etcd_password_file",
                p,
                "needs etcd_user (the etcd user the password is for)",
            ))
        }
        (Some(u), Some((_, p))) => {
            let name = u.get_ref();
            if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(bad(
                    "etcd_user",
                    u,
                    "must be a non-empty name without spaces",
                ));
            }
            if ca.is_none() {
                return Err(bad(
                    "etcd_user",
                    u,
                    "needs etcd_ca (TLS): without it the password crosses the network in the clear",
                ));
            }
            Some((name.clone(), p))
        }
    };
    Ok(EtcdAccess { ca, identity, user })
}

/// `tcp://IP:PORT`, `file:/ABSOLUTE/PATH` or
/// `etcd://IP:PORT[,IP:PORT...]/PREFIX`.
pub(crate) fn parse_witness(s: &str) -> Result<Witness, &'static str> {
    if let Some(addr) = s.strip_prefix("tcp://") {
        return parse_address(addr).map(Witness::Tcp);
    }
    if let Some(rest) = s.strip_prefix("etcd://") {
        let (members, prefix) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => return Err("needs a key prefix: \"etcd://IP:PORT[,IP:PORT...]/PREFIX\""),
        };
        if prefix.len() < 2 || prefix.contains(char::is_whitespace) {
            return Err("needs a key prefix: \"etcd://IP:PORT[,IP:PORT...]/PREFIX\"");
        }
        let endpoints = members
            .split(',')
            .map(parse_address)
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(Witness::Etcd {
            endpoints,
            prefix: prefix.to_string(),
        });
    }
    if let Some(path) = s.strip_prefix("file:") {
        return match Path::new(path) {
            p if p.is_absolute() => Ok(Witness::File(p.to_owned())),
            _ => Err("needs an absolute path on storage both hosts reach (\"file:/PATH\")"),
        };
    }
    Err("must be \"tcp://IP:PORT\", \"file:/PATH\" or \"etcd://IP:PORT[,IP:PORT...]/PREFIX\"")
}
