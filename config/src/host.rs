//! Which of the pair file's two hosts this process is: `--host a|b`, or the
//! host whose address this machine has.

use std::ffi::c_int;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use super::{ConfigError, PairConfig};

/// One of the two hosts of `[hosts]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HostId {
    /// `[hosts] a`.
    A,
    /// `[hosts] b`.
    B,
}

impl HostId {
    /// Both hosts, in file order.
    pub const BOTH: [HostId; 2] = [HostId::A, HostId::B];

    /// The other host.
    pub fn peer(self) -> HostId {
        match self {
            HostId::A => HostId::B,
            HostId::B => HostId::A,
        }
    }

    /// `"a"` or `"b"`, as in the file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            HostId::A => "a",
            HostId::B => "b",
        }
    }

    /// Position in `PairConfig::hosts`.
    pub fn index(self) -> usize {
        match self {
            HostId::A => 0,
            HostId::B => 1,
        }
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for HostId {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<HostId, ConfigError> {
        match s {
            "a" | "A" => Ok(HostId::A),
            "b" | "B" => Ok(HostId::B),
            _ => Err(ConfigError::BadHostFlag(s.to_owned())),
        }
    }
}

/// Which host this process is. `--host` (`flag`) wins; otherwise the host
/// whose address IP is one of `local_addrs` (see [`local_addresses`]).
/// Neither or both matching is an error that asks for `--host`.
pub fn which_host(
    cfg: &PairConfig,
    flag: Option<&str>,
    local_addrs: &[IpAddr],
) -> Result<HostId, ConfigError> {
    if let Some(flag) = flag {
        return flag.parse();
    }
    let ip = |id: HostId| cfg.host(id).address.ip().to_canonical();
    let is_local = |id: HostId| local_addrs.iter().any(|l| l.to_canonical() == ip(id));
    match (is_local(HostId::A), is_local(HostId::B)) {
        (true, false) => Ok(HostId::A),
        (false, true) => Ok(HostId::B),
        (false, false) => Err(ConfigError::NoLocalHost {
            a: ip(HostId::A),
            b: ip(HostId::B),
        }),
        (true, true) => Err(ConfigError::BothLocal {
            a: ip(HostId::A),
            b: ip(HostId::B),
        }),
    }
}

/// Every IPv4 and IPv6 address of this machine's interfaces, loopback
/// included, without duplicates. Empty (with a warning) if the kernel will
/// not say: [`which_host`] then asks for `--host`.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: `head` is a valid place for getifaddrs to store its list; on
    // success we own the list and free it below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!(
            "cannot list this machine's addresses: {}",
            std::io::Error::last_os_error()
        );
        return Vec::new();
    }
    let mut addrs = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a non-null node of the list getifaddrs returned,
        // which stays valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        // SAFETY: `ifa_addr` is null or points to a sockaddr of the family it
        // names, valid as long as the list.
        if let Some(ip) = unsafe { sockaddr_ip(ifa.ifa_addr) } {
            if !addrs.contains(&ip) {
                addrs.push(ip);
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once;
    // no reference into the list outlives this call.
    unsafe { libc::freeifaddrs(head) };
    addrs
}

/// The IP of an AF_INET or AF_INET6 sockaddr; None for other families.
///
/// # Safety
/// `sa` is null or points to a valid sockaddr whose storage is as large as
/// its family requires.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null and valid per the caller; every sockaddr starts with
    // its family.
    let family = c_int::from(unsafe { (*sa).sa_family });
    match family {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in; read_unaligned
            // because a sockaddr pointer promises less alignment.
            let sin = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>()) };
            Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                sin.sin_addr.s_addr,
            ))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6; see above.
            let sin6 = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>()) };
            Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
        }
        _ => None,
    }
}
