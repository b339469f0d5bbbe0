//! `validate()`: from the spanned raw file to typed runtime values, with
//! defaults applied and every refusal pointing at its line.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tandem_vmm::layout::{MAX_MEM_SIZE, MIN_MEM_SIZE};
use tandem_vmm::DiskConfig;
use toml::Spanned;

use super::error::{ConfigError, Ctx};
use super::mac::parse_mac;
use super::raw::{RawFt, RawHost, RawHosts, RawNic, RawSize, RawTaps, RawVm};
use super::size::SizeError;
mod ft;
pub(crate) use ft::{etcd_access, parse_witness, validate_ft, EtcdFields};

use super::{
    Announce, EtcdAccess, FtConfig, HostEntry, HostId, Nic, OutputCommit, Storage, VmConfigSection,
    Witness, DEFAULT_ANNOUNCE, DEFAULT_FAILOVER_TIMEOUT_MS, DEFAULT_HEARTBEAT_MS, DEFAULT_MAC,
    DEFAULT_MAX_LAG_MS, DEFAULT_MAX_REPLAY_LAG_MS, DEFAULT_MAX_UNACKED_BYTES, DEFAULT_MEM,
    DEFAULT_STATE_ROOT, MAX_TAP_NAME, MIN_MAX_UNACKED_BYTES,
};

/// A field's value (or `default`) and where to point at it (its own span, or
/// `fallback` for a defaulted one).
fn or_default<T: Clone>(
    field: &Option<Spanned<T>>,
    default: T,
    fallback: &Range<usize>,
) -> (T, Range<usize>) {
    match field {
        Some(v) => (v.get_ref().clone(), v.span()),
        None => (default, fallback.clone()),
    }
}

/// A string value as written in TOML, for error messages.
fn quoted(value: &Spanned<String>) -> String {
    format!("{:?}", value.get_ref())
}

/// A `"unix:PATH"` field (a unix socket) as its path.
fn unix_socket(
    ctx: &Ctx,
    field: &Option<Spanned<String>>,
    section: &'static str,
    key: String,
    problem: &str,
) -> Result<Option<PathBuf>, ConfigError> {
    let Some(value) = field else {
        return Ok(None);
    };
    match value.get_ref().strip_prefix("unix:") {
        Some(path) if !path.is_empty() => Ok(Some(path.into())),
        _ => Err(ctx.invalid(&value.span(), section, key, quoted(value), problem)),
    }
}

/// `64M`, `1G`, `65536K` or plain bytes: the syntax of `tandem run --mem`.
fn parse_size(size: &RawSize) -> Result<u64, String> {
    let text = match size {
        RawSize::Bytes(n) => return Ok(*n),
        RawSize::Text(s) => s,
    };
    crate::size::parse_size(text).map_err(|e| match e {
        SizeError::NotASize => "is not a size (examples: \"64M\", \"1G\", 67108864)".to_owned(),
        SizeError::TooLarge => "is too large".to_owned(),
    })
}

/// `IP:PORT` that a peer can connect to.
fn parse_address(s: &str) -> Result<SocketAddr, &'static str> {
    let addr: SocketAddr = s
        .parse()
        .map_err(|_| "is not IP:PORT (like \"10.10.0.1:7400\"; host names are not accepted)")?;
    if addr.port() == 0 {
        return Err("needs a port other than 0");
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err("is not an address a peer can connect to");
    }
    Ok(addr)
}

// The section names, as errors show them.
const VM: &str = "vm";
const HOSTS: &str = "hosts";
const FT: &str = "ft";

/// `[vm]`: the guest, field by field, with defaults applied.
pub(super) fn validate_vm(ctx: &Ctx, raw: Spanned<RawVm>) -> Result<VmConfigSection, ConfigError> {
    let sec = raw.span();
    let raw = raw.into_inner();

    let name = vm_name(ctx, raw.name.as_ref(), &sec)?;
    let (kernel, initrd) = vm_boot_files(ctx, raw.kernel, raw.initrd, &sec)?;
    let cmdline = raw.cmdline.map(Spanned::into_inner).unwrap_or_default();
    let mem = vm_mem(ctx, raw.mem.as_ref())?;
    let disks = vm_disks(ctx, &raw.disk)?;
    let nics = vm_nics(ctx, &raw.net)?;
    let console = unix_socket(
        ctx,
        &raw.console,
        VM,
        "console".into(),
        "must be \"unix:PATH\" (a socket the live side serves)",
    )?;
    let device_model = vm_device_model(ctx, raw.device_model.as_ref())?;

    Ok(VmConfigSection {
        name,
        kernel,
        initrd,
        cmdline,
        mem,
        disks,
        nics,
        console,
        device_model,
    })
}

/// `[vm] name`, or the file's stem when left out: 1 to 64 letters, digits,
/// '.', '_' or '-', starting with a letter or digit.
fn vm_name(
    ctx: &Ctx,
    field: Option<&Spanned<String>>,
    sec: &Range<usize>,
) -> Result<String, ConfigError> {
    let (name, name_at, defaulted) = match field {
        Some(n) => (n.get_ref().clone(), n.span(), false),
        None => {
            let stem = Path::new(ctx.file).file_stem().unwrap_or_default();
            (stem.to_string_lossy().into_owned(), sec.clone(), true)
        }
    };
    let name_ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name.chars().all(name_ok)
        || name.len() > 64
    {
        let from = if defaulted {
            " (from the file name)"
        } else {
            ""
        };
        return Err(ctx.invalid(
            &name_at,
            VM,
            "name",
            format!("{name:?}{from}"),
            "must be 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        ));
    }
    Ok(name)
}

/// `[vm] kernel` (required) and `initrd` (optional): neither empty.
fn vm_boot_files(
    ctx: &Ctx,
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    sec: &Range<usize>,
) -> Result<(PathBuf, Option<PathBuf>), ConfigError> {
    let kernel =
        kernel.ok_or_else(|| ctx.missing(sec, VM, "kernel", "the guest kernel image to boot"))?;
    if kernel.get_ref().is_empty() {
        return Err(ctx.invalid(&kernel.span(), VM, "kernel", "\"\"", "is empty"));
    }
    let initrd = match initrd {
        Some(i) if i.get_ref().is_empty() => {
            return Err(ctx.invalid(&i.span(), VM, "initrd", "\"\"", "is empty"))
        }
        i => i.map(|i| PathBuf::from(i.into_inner())),
    };
    Ok((kernel.into_inner().into(), initrd))
}

/// `[vm] mem`: a size within what the VMM supports (default `DEFAULT_MEM`).
fn vm_mem(ctx: &Ctx, field: Option<&Spanned<RawSize>>) -> Result<u64, ConfigError> {
    let Some(m) = field else {
        return Ok(DEFAULT_MEM);
    };
    let bad = |problem: String| ctx.invalid(&m.span(), VM, "mem", m.get_ref(), problem);
    let mem = parse_size(m.get_ref()).map_err(bad)?;
    if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem) {
        return Err(bad(format!(
            "is out of range ({}M to {}G)",
            MIN_MEM_SIZE >> 20,
            MAX_MEM_SIZE >> 30
        )));
    }
    Ok(mem)
}

/// `[vm] disk`: each entry `"PATH"` or `"PATH,ro"`, with a non-empty path.
fn vm_disks(ctx: &Ctx, raw: &[Spanned<String>]) -> Result<Vec<DiskConfig>, ConfigError> {
    let mut disks = Vec::with_capacity(raw.len());
    for (i, d) in raw.iter().enumerate() {
        let (path, read_only) = match d.get_ref().strip_suffix(",ro") {
            Some(path) => (path, true),
            None => (d.get_ref().as_str(), false),
        };
        if path.is_empty() {
            let key = format!("disk[{i}]");
            return Err(ctx.invalid(
                &d.span(),
                VM,
                key,
                quoted(d),
                "is not \"PATH\" or \"PATH,ro\"",
            ));
        }
        disks.push(DiskConfig {
            path: path.into(),
            read_only,
        });
    }
    Ok(disks)
}

/// `[vm] net`: each NIC's MAC well-formed (default `DEFAULT_MAC` plus its
/// index), then no two NICs with the same MAC.
fn vm_nics(ctx: &Ctx, raw: &[Spanned<RawNic>]) -> Result<Vec<Nic>, ConfigError> {
    let mut nics = Vec::with_capacity(raw.len());
    for (i, n) in raw.iter().enumerate() {
        let mac = match &n.get_ref().mac {
            None => {
                let mut mac = DEFAULT_MAC;
                mac[5] = mac[5].wrapping_add(i as u8);
                mac
            }
            Some(m) => parse_mac(m.get_ref()).map_err(|problem| {
                let key = format!("net[{i}].mac");
                ctx.invalid(&m.span(), VM, key, quoted(m), problem.to_string())
            })?,
        };
        nics.push(Nic { mac });
    }
    check_distinct_macs(ctx, raw, &nics)?;
    Ok(nics)
}

/// That no NIC of `[vm] net` repeats the MAC of an earlier one.
fn check_distinct_macs(
    ctx: &Ctx,
    raw: &[Spanned<RawNic>],
    nics: &[Nic],
) -> Result<(), ConfigError> {
    for (i, nic) in nics.iter().enumerate() {
        if let Some(j) = nics[..i].iter().position(|other| other.mac == nic.mac) {
            let at = raw[i].span();
            let key = format!("net[{i}]");
            let mac = nic.mac.map(|b| format!("{b:02x}")).join(":");
            return Err(ctx.invalid(
                &at,
                VM,
                key,
                format!("{{ mac = {mac:?} }}"),
                format!("has the same MAC as net[{j}]"),
            ));
        }
    }
    Ok(())
}

/// `[vm] device_model`: a device-model version this build can run.
fn vm_device_model(ctx: &Ctx, field: Option<&Spanned<u32>>) -> Result<Option<u32>, ConfigError> {
    let Some(v) = field else {
        return Ok(None);
    };
    let range = tandem_vmm::vm::OLDEST_DEVICE_MODEL_VERSION..=tandem_vmm::vm::DEVICE_MODEL_VERSION;
    if !range.contains(v.get_ref()) {
        return Err(ctx.invalid(
            &v.span(),
            VM,
            "device_model",
            v.get_ref(),
            format!(
                "is not a device-model version this build runs ({} to {})",
                range.start(),
                range.end()
            ),
        ));
    }
    Ok(Some(*v.get_ref()))
}

pub(super) fn validate_hosts(
    ctx: &Ctx,
    raw: Spanned<RawHosts>,
    vm: &VmConfigSection,
    storage: Storage,
) -> Result<[HostEntry; 2], ConfigError> {
    let sec = raw.span();
    let raw = raw.into_inner();
    let a = validate_host(ctx, HostId::A, raw.a.as_ref(), &sec, vm, storage)?;
    let b = validate_host(ctx, HostId::B, raw.b.as_ref(), &sec, vm, storage)?;
    if a.address == b.address {
        let at = raw
            .b
            .as_ref()
            .and_then(|b| b.get_ref().address.as_ref())
            .map_or(sec, Spanned::span);
        return Err(ctx.invalid(
            &at,
            "hosts",
            "b.address",
            format!("\"{}\"", b.address),
            "is also a.address; the two hosts need distinct addresses",
        ));
    }
    Ok([a, b])
}

/// The key `k` of host `id`, as errors name it (`a.address`).
fn host_key(id: HostId, k: &str) -> String {
    format!("{id}.{k}")
}

/// One host's entry of `[hosts]` (required): address, taps, control
/// socket and disk replicas.
fn validate_host(
    ctx: &Ctx,
    id: HostId,
    raw: Option<&Spanned<RawHost>>,
    sec: &Range<usize>,
    vm: &VmConfigSection,
    storage: Storage,
) -> Result<HostEntry, ConfigError> {
    let raw = raw.ok_or_else(|| {
        ctx.missing(
            sec,
            HOSTS,
            id.name(),
            "each host needs an entry like { address = \"IP:PORT\" }",
        )
    })?;
    let at = raw.span();
    let raw = raw.get_ref();

    let address = host_address(ctx, id, raw.address.as_ref(), &at)?;
    let taps = host_taps(ctx, id, raw.tap.as_ref(), &at, vm.nics.len())?;
    let control = unix_socket(
        ctx,
        &raw.control,
        HOSTS,
        host_key(id, "control"),
        "must be \"unix:PATH\"",
    )?;
    let disks = host_disks(ctx, id, raw.disk.as_ref(), vm, storage)?;

    Ok(HostEntry {
        address,
        taps,
        control,
        disks,
    })
}

/// A host's `address` (required): an `IP:PORT` its peer can connect to.
fn host_address(
    ctx: &Ctx,
    id: HostId,
    field: Option<&Spanned<String>>,
    at: &Range<usize>,
) -> Result<SocketAddr, ConfigError> {
    let addr = field.ok_or_else(|| {
        ctx.missing(
            at,
            HOSTS,
            host_key(id, "address"),
            "where the peer reaches this host, IP:PORT",
        )
    })?;
    parse_address(addr.get_ref()).map_err(|p| {
        ctx.invalid(
            &addr.span(),
            HOSTS,
            host_key(id, "address"),
            quoted(addr),
            p,
        )
    })
}

/// A host's `tap`: interface names, one per NIC of `[vm] net` (required
/// when there are NICs).
fn host_taps(
    ctx: &Ctx,
    id: HostId,
    field: Option<&Spanned<RawTaps>>,
    at: &Range<usize>,
    nic_count: usize,
) -> Result<Vec<String>, ConfigError> {
    let t = match field {
        None if nic_count > 0 => {
            return Err(ctx.missing(
                at,
                HOSTS,
                host_key(id, "tap"),
                "[vm] net needs a tap on each host",
            ))
        }
        None => return Ok(Vec::new()),
        Some(t) => t,
    };
    let bad = |p: String| ctx.invalid(&t.span(), HOSTS, host_key(id, "tap"), t.get_ref(), p);
    let names = &t.get_ref().names;
    for name in names {
        if name.is_empty() {
            return Err(bad("names an empty tap".into()));
        }
        if name.len() > MAX_TAP_NAME || name.contains(|c: char| c == '/' || c.is_whitespace()) {
            return Err(bad(format!(
                "{name:?} is not an interface name \
                 (at most {MAX_TAP_NAME} bytes, no '/' or spaces)"
            )));
        }
    }
    if names.len() != nic_count {
        return Err(bad(format!(
            "names {} tap(s) but [vm] net has {nic_count} NIC(s); give one tap per NIC",
            names.len()
        )));
    }
    Ok(names.clone())
}

/// A host's `disk`: its replicas of `[vm] disk`, only with mirrored storage,
/// one plain path per disk.
fn host_disks(
    ctx: &Ctx,
    id: HostId,
    field: Option<&Spanned<Vec<String>>>,
    vm: &VmConfigSection,
    storage: Storage,
) -> Result<Option<Vec<PathBuf>>, ConfigError> {
    let Some(d) = field else {
        return Ok(None);
    };
    let bad = |p: String| {
        let value = format!("{:?}", d.get_ref());
        ctx.invalid(&d.span(), HOSTS, host_key(id, "disk"), value, p)
    };
    if storage != Storage::Mirrored {
        return Err(bad(
            "is only for storage = \"mirrored\" (with shared storage both hosts use [vm] disk)"
                .into(),
        ));
    }
    let paths = d.get_ref();
    if paths.len() != vm.disks.len() {
        return Err(bad(format!(
            "names {} replica(s) but [vm] disk has {} disk(s); give one per disk, same order",
            paths.len(),
            vm.disks.len()
        )));
    }
    if let Some(empty) = paths
        .iter()
        .position(|p| p.is_empty() || p.ends_with(",ro"))
    {
        return Err(bad(format!(
            "entry {empty} is not a plain path (read-only is said once, in [vm] disk)"
        )));
    }
    Ok(Some(paths.iter().map(PathBuf::from).collect()))
}
