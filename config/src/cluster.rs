//! The cluster file of `tandem node`: its VMs (each a pair file and the
//! host it prefers) and, optionally, membership on etcd with the hosts that
//! fill each VM's slots. Read and checked here, once, for `tandem node`,
//! the spare hosts and `tandem status --cluster`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use super::validate::{etcd_access, EtcdFields};
use super::{EtcdAccess, HostId, PairConfig, Witness};

/// The cluster file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusterFile {
    #[serde(default)]
    vm: Vec<RawClusterVm>,
    /// Membership on etcd and the hosts.
    cluster: Option<RawClusterSection>,
    #[serde(default)]
    host: Vec<RawHost>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusterVm {
    config: String,
    prefer: String,
}

/// One protected VM of a cluster.
#[derive(Clone, Debug)]
pub struct ClusterVm {
    /// Its pair file.
    pub path: PathBuf,
    /// The pair file, read.
    pub pair: PairConfig,
    /// The host it runs on when both are up.
    pub prefer: HostId,
}

/// A cluster file, read and checked.
pub struct Cluster {
    /// Its VMs.
    pub vms: Vec<ClusterVm>,
    /// Membership on etcd and the hosts (None: two hosts, a and b).
    pub membership: Option<Membership>,
}

/// Reads and checks a cluster file: every pair file readable, VM names
/// distinct, `prefer` naming a host, and any `[cluster]` section.
pub fn load_cluster(path: &Path) -> anyhow::Result<Cluster> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let raw: RawClusterFile = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.message()))?;
    if raw.vm.is_empty() {
        bail!("{}: no [[vm]] entries", path.display());
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let mut out: Vec<ClusterVm> = Vec::new();
    for (i, vm) in raw.vm.iter().enumerate() {
        let prefer = match vm.prefer.as_str() {
            "a" => HostId::A,
            "b" => HostId::B,
            other => bail!(
                "{}: vm[{i}] prefer = {other:?} must be \"a\" or \"b\"",
                path.display()
            ),
        };
        let pair_path = base.join(&vm.config);
        let pair = super::load(&pair_path)
            .map_err(|e| anyhow::anyhow!("{}: vm[{i}]: {e}", path.display()))?;
        if let Some(dup) = out.iter().find(|o| o.pair.vm.name == pair.vm.name) {
            bail!(
                "{}: vm[{i}] ({}) names the VM {:?} again (also in {}): every VM needs its own name",
                path.display(),
                pair_path.display(),
                pair.vm.name,
                dup.path.display()
            );
        }
        out.push(ClusterVm {
            path: pair_path,
            pair,
            prefer,
        });
    }
    Ok(Cluster {
        vms: out,
        membership: membership(path, raw.cluster, raw.host)?,
    })
}

/// `[cluster]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClusterSection {
    etcd: String,
    etcd_ca: Option<toml::Spanned<String>>,
    etcd_cert: Option<toml::Spanned<String>>,
    etcd_key: Option<toml::Spanned<String>>,
    etcd_user: Option<toml::Spanned<String>>,
    etcd_password_file: Option<toml::Spanned<String>>,
}

/// One `[[host]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHost {
    name: String,
    address: String,
}

/// The `[cluster]` section and the hosts of a cluster file.
#[derive(Clone, Debug)]
pub struct Membership {
    /// The etcd endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// The key prefix.
    pub prefix: String,
    /// TLS and authentication towards etcd.
    pub access: EtcdAccess,
    /// (name, replication address), in file order.
    pub hosts: Vec<(String, IpAddr)>,
}

/// Checks the `[cluster]` section and `[[host]]` entries of the cluster
/// file `path` (None: there is no `[cluster]`, so there are two hosts, a
/// and b).
fn membership(
    path: &Path,
    cluster: Option<RawClusterSection>,
    raw_hosts: Vec<RawHost>,
) -> anyhow::Result<Option<Membership>> {
    let Some(cluster) = cluster else {
        if !raw_hosts.is_empty() {
            bail!(
                "{}: [[host]] entries need a [cluster] section with etcd = \"etcd://...\"",
                path.display()
            );
        }
        return Ok(None);
    };
    let (endpoints, prefix) = match super::parse_witness(&cluster.etcd) {
        Ok(Witness::Etcd { endpoints, prefix }) => (endpoints, prefix),
        Ok(_) => bail!(
            "{}: [cluster] etcd = {:?} must be \"etcd://IP:PORT[,IP:PORT...]/PREFIX\"",
            path.display(),
            cluster.etcd
        ),
        Err(why) => bail!(
            "{}: [cluster] etcd = {:?} {why}",
            path.display(),
            cluster.etcd
        ),
    };
    let access = etcd_access(&EtcdFields {
        ca: cluster.etcd_ca.as_ref(),
        cert: cluster.etcd_cert.as_ref(),
        key: cluster.etcd_key.as_ref(),
        user: cluster.etcd_user.as_ref(),
        password_file: cluster.etcd_password_file.as_ref(),
    })
    .map_err(|bad| {
        anyhow::anyhow!(
            "{}: [cluster] {} = {} {}",
            path.display(),
            bad.key,
            bad.value,
            bad.problem
        )
    })?;
    let mut hosts: Vec<(String, IpAddr)> = Vec::new();
    for h in raw_hosts {
        if !crate::names::is_valid_name(&h.name) {
            bail!(
                "{}: [[host]] invalid host name {:?}: 1 to {} characters of [A-Za-z0-9._-], starting with a letter or digit",
                path.display(),
                h.name.chars().take(2 * crate::names::MAX_NAME_LEN).collect::<String>(),
                crate::names::MAX_NAME_LEN
            );
        }
        let ip: IpAddr = h.address.parse().map_err(|_| {
            anyhow::anyhow!(
                "{}: [[host]] {} address = {:?} must be an IP address (each VM's pair file gives the port)",
                path.display(),
                h.name,
                h.address
            )
        })?;
        if hosts.iter().any(|(n, _)| *n == h.name) {
            bail!("{}: [[host]] {} is listed twice", path.display(), h.name);
        }
        hosts.push((h.name, ip));
    }
    for slot in ["a", "b"] {
        if !hosts.iter().any(|(n, _)| n == slot) {
            bail!(
                "{}: [cluster] needs a [[host]] named {slot:?} (it fills slot {slot} of every VM at first)",
                path.display()
            );
        }
    }
    Ok(Some(Membership {
        endpoints,
        prefix,
        access,
        hosts,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_sections_are_checked() {
        let file = Path::new("cluster.toml");
        #[derive(Deserialize)]
        struct File {
            cluster: Option<RawClusterSection>,
            #[serde(default)]
            host: Vec<RawHost>,
        }
        let load = |text: &str| {
            let raw: File = toml::from_str(text).unwrap();
            membership(file, raw.cluster, raw.host).map_err(|e| e.to_string())
        };
        assert!(load("[[vm]]\nconfig = \"x\"\nprefer = \"a\"\n")
            .unwrap()
            .is_none());
        let ok = "[cluster]\netcd = \"etcd://10.0.0.1:2379/t\"\n[[host]]\nname = \"a\"\naddress = \"10.0.1.1\"\n[[host]]\nname = \"b\"\naddress = \"10.0.1.2\"\n";
        let m = load(ok).unwrap().unwrap();
        assert_eq!(m.hosts.len(), 2);
        let e = load("[cluster]\netcd = \"tcp://10.0.0.1:1\"\n").unwrap_err();
        assert!(e.contains("must be \"etcd://"), "{e}");
        let e = load(&ok.replace("10.0.1.2", "host-b")).unwrap_err();
        assert!(e.contains("must be an IP address"), "{e}");
        let e = load(&ok.replace("name = \"b\"", "name = \"a\"")).unwrap_err();
        assert!(e.contains("listed twice"), "{e}");
        let e = load("[[host]]\nname = \"a\"\naddress = \"10.0.1.1\"\n").unwrap_err();
        assert!(e.contains("need a [cluster] section"), "{e}");
    }
}
