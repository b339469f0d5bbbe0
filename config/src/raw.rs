//! The pair file as serde reads it: every field optional and spanned, so that
//! `validate()` can apply defaults and point at the line of a bad value.
//! Nothing here is checked beyond TOML types; `super::validate` does the rest.

use std::fmt;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

/// The whole file. `[vm]` and `[hosts]` are required, `[ft]` is not.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub vm: Option<Spanned<RawVm>>,
    pub hosts: Option<Spanned<RawHosts>>,
    pub ft: Option<Spanned<RawFt>>,
}

/// `[vm]`: the guest, identical on both hosts.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawVm {
    pub name: Option<Spanned<String>>,
    pub kernel: Option<Spanned<String>>,
    pub initrd: Option<Spanned<String>>,
    pub cmdline: Option<Spanned<String>>,
    pub mem: Option<Spanned<RawSize>>,
    pub disk: Vec<Spanned<String>>,
    pub net: Vec<Spanned<RawNic>>,
    pub console: Option<Spanned<String>>,
    pub device_model: Option<Spanned<u32>>,
}

/// One entry of `[vm] net`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawNic {
    pub mac: Option<Spanned<String>>,
}

/// `[hosts]`: exactly `a` and `b`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawHosts {
    pub a: Option<Spanned<RawHost>>,
    pub b: Option<Spanned<RawHost>>,
}

/// `[hosts] a = { ... }`: what differs between the two hosts.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawHost {
    pub address: Option<Spanned<String>>,
    pub tap: Option<Spanned<RawTaps>>,
    pub control: Option<Spanned<String>>,
    pub disk: Option<Spanned<Vec<String>>>,
}

/// `[ft]`: failure detection, output commit, arbitration, pacing, announce.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(super) struct RawFt {
    pub heartbeat_ms: Option<Spanned<u64>>,
    pub failover_timeout_ms: Option<Spanned<u64>>,
    pub output_commit: Option<Spanned<String>>,
    pub storage: Option<Spanned<String>>,
    pub witness: Option<Spanned<String>>,
    pub state_dir: Option<Spanned<String>>,
    pub fence_command: Option<Spanned<String>>,
    pub respawn: Option<Spanned<String>>,
    pub psk_file: Option<Spanned<String>>,
    pub socket_group: Option<Spanned<String>>,
    pub witness_key_file: Option<Spanned<String>>,
    pub encrypt: Option<Spanned<bool>>,
    pub verify_peer_address: Option<Spanned<bool>>,
    pub max_unacked_bytes: Option<Spanned<RawSize>>,
    pub max_lag_ms: Option<Spanned<u64>>,
    pub max_replay_lag_ms: Option<Spanned<u64>>,
    pub announce_rounds: Option<Spanned<u32>>,
    pub announce_initial_ms: Option<Spanned<u64>>,
    pub announce_step_ms: Option<Spanned<u64>>,
    pub announce_max_ms: Option<Spanned<u64>>,
    pub on_guest_crash: Option<Spanned<String>>,
    pub checkpoint_interval_ms: Option<Spanned<u64>>,
    pub etcd_ca: Option<Spanned<String>>,
    pub etcd_cert: Option<Spanned<String>>,
    pub etcd_key: Option<Spanned<String>>,
    pub etcd_user: Option<Spanned<String>>,
    pub etcd_password_file: Option<Spanned<String>>,
    pub position: Option<Spanned<String>>,
    pub irq_defer_us: Option<Spanned<u64>>,
}

/// A size as written: `"64M"` or a plain number of bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum RawSize {
    Text(String),
    Bytes(u64),
}

impl fmt::Display for RawSize {
    /// As it would be written in TOML, for error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RawSize::Text(s) => write!(f, "{s:?}"),
            RawSize::Bytes(n) => write!(f, "{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size like \"64M\" or a number of bytes")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                u64::try_from(v)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
        }
        d.deserialize_any(SizeVisitor)
    }
}

/// `tap = "tap0"` or, one per NIC, `tap = ["tap0", "tap1"]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct RawTaps {
    pub names: Vec<String>,
    /// Written as a single string rather than a list.
    pub single: bool,
}

impl fmt::Display for RawTaps {
    /// As it would be written in TOML, for error messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.single, self.names.as_slice()) {
            (true, [name]) => write!(f, "{name:?}"),
            _ => write!(f, "{:?}", self.names),
        }
    }
}

impl<'de> Deserialize<'de> for RawTaps {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TapsVisitor;
        impl<'de> Visitor<'de> for TapsVisitor {
            type Value = RawTaps;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a tap name or a list of tap names")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTaps, E> {
                Ok(RawTaps {
                    names: vec![v.to_owned()],
                    single: true,
                })
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RawTaps, A::Error> {
                let mut names = Vec::new();
                while let Some(name) = seq.next_element::<String>()? {
                    names.push(name);
                }
                Ok(RawTaps {
                    names,
                    single: false,
                })
            }
        }
        d.deserialize_any(TapsVisitor)
    }
}
