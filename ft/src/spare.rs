//! Cluster membership on etcd and automatic re-protection from spare hosts
//! (`tandem node` with a `[cluster]` section).
//!
//! ```toml
//! [cluster]
//! etcd = "etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/tandem"
//!
//! [[host]]
//! name = "a"
//! address = "10.0.1.11"   # the VM pair files give each slot's port
//! [[host]]
//! name = "b"
//! address = "10.0.1.12"
//! [[host]]
//! name = "c"             # a spare
//! address = "10.0.1.13"
//! ```
//!
//! A pair file still has two slots, `a` and `b` (the arbiter's holders).
//! Which host fills each slot of a VM is kept in etcd, under
//! `PREFIX/cluster/assign/VM` = `"a=HOST b=HOST"` (at first the hosts named
//! `a` and `b`). Every node registers `PREFIX/cluster/nodes/HOST` under a
//! lease of [`NODE_TTL_S`] it keeps alive over a keep-alive stream, so a
//! host that dies (or loses etcd) drops out of the member list when its
//! lease expires. Each node follows `PREFIX/cluster/` with a watch
//! ([`PrefixView`]): it learns of a lost member or a new assignment when
//! etcd does, not at its next poll.
//!
//! For each VM a node runs `tandem pair --host SLOT` for the slot assigned
//! to it, with a pair file derived for the assignment (each slot's address
//! on its host, the port from the pair file). A node with no slot in a VM
//! is a spare for it: when a slot's host has dropped out and that slot is
//! not the VM's live side (the live side's own secondary takes over
//! first), the least-loaded live spare (fewest slots across all VMs, then
//! by name) takes the slot with a compare-and-set on the assignment and
//! starts its side there, which joins the live side as secondary:
//! re-protection without an operator. A node whose slot was given away
//! stops its side.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::arbiter::{Arbiter, EtcdClient, KeepAlive, PrefixView};
use super::side::{pause_after, run_side, wait_until_live};
use tandem_config as config;
use tandem_config::cluster::{ClusterVm, Membership};

/// Lease of a node's member key, in seconds: how soon a dead host drops out.
pub const NODE_TTL_S: i64 = 2;

/// The longest a node waits for a change of the cluster's keys before it
/// looks again anyway (a slot it could not take, a failed start).
const RECHECK: Duration = Duration::from_millis(300);

/// How long a request to etcd may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(1);

/// Which host fills each slot of one VM, and the key's revision (0: not
/// stored yet).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Assignment {
    a: String,
    b: String,
    revision: i64,
}

impl Assignment {
    fn slot_of(&self, host: &str) -> Option<&'static str> {
        if self.a == host {
            Some("a")
        } else if self.b == host {
            Some("b")
        } else {
            None
        }
    }

    fn host(&self, slot: &str) -> &str {
        if slot == "a" {
            &self.a
        } else {
            &self.b
        }
    }

    fn text(&self) -> String {
        format!("a={} b={}", self.a, self.b)
    }

    fn parse(text: &str, revision: i64) -> Option<Self> {
        let mut a = None;
        let mut b = None;
        for part in text.split_whitespace() {
            match part.split_once('=')? {
                ("a", h) => a = Some(h.to_string()),
                ("b", h) => b = Some(h.to_string()),
                _ => return None,
            }
        }
        Some(Self {
            a: a?,
            b: b?,
            revision,
        })
    }
}

/// For `tandem status --cluster`: which host fills each slot of each VM
/// (`"a=HOST b=HOST"` by VM name), when the cluster has membership on etcd
/// and etcd answers.
pub fn slot_hosts(membership: Option<&Membership>) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let Some(m) = membership else {
        return out;
    };
    let Ok(kv) = EtcdClient::connect(&m.endpoints, &m.prefix, &m.access, ETCD_TIMEOUT) else {
        return out;
    };
    for (vm, text) in kv.list("cluster/assign/").unwrap_or_default() {
        out.insert(vm, text);
    }
    out
}

/// What every VM thread of a member node shares.
struct Node {
    me: String,
    exe: PathBuf,
    flags: Vec<String>,
    kv: EtcdClient,
    /// `PREFIX/cluster/`, as the watch last saw it.
    view: PrefixView,
    membership: Membership,
    stop: &'static std::sync::atomic::AtomicBool,
}

/// Runs `tandem node` as a member of an etcd-backed cluster.
pub fn run(
    me: &str,
    vms: Vec<ClusterVm>,
    membership: Membership,
    exe: PathBuf,
    flags: Vec<String>,
    stop: &'static std::sync::atomic::AtomicBool,
) -> anyhow::Result<()> {
    if !membership.hosts.iter().any(|(n, _)| n == me) {
        bail!(
            "--host {me:?} is not a [[host]] of the cluster file (it has {})",
            membership
                .hosts
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // Connect and register now: an unreachable etcd, a TLS mismatch or a
    // refused password is a clear error at start.
    let kv = EtcdClient::connect(
        &membership.endpoints,
        &membership.prefix,
        &membership.access,
        ETCD_TIMEOUT,
    )
    .context("cannot reach the cluster's etcd")?;
    let lease = register(&kv, me).context("cannot register this node in etcd")?;
    // TANDEM_CLUSTER_POLL_MS=N: list every N ms instead of watching (how
    // nodes followed the cluster before; `make bench` compares the two).
    let poll = std::env::var("TANDEM_CLUSTER_POLL_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    let view = match poll {
        Some(ms) => PrefixView::poll(&kv, "cluster/", Duration::from_millis(ms), ETCD_TIMEOUT),
        None => PrefixView::follow(&kv, "cluster/", ETCD_TIMEOUT),
    };
    eprintln!(
        "tandem: node {me}: member of the cluster at {} ({} hosts, {} VMs)",
        membership
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join(","),
        membership.hosts.len(),
        vms.len()
    );
    let node = Arc::new(Node {
        me: me.to_string(),
        exe,
        flags,
        kv,
        view,
        membership,
        stop,
    });
    let keeper = {
        let node = node.clone();
        std::thread::Builder::new()
            .name("node-member".into())
            .spawn(move || node.keep_membership(lease))?
    };
    let mut threads = vec![keeper];
    for vm in vms {
        let node = node.clone();
        let (_, arbiter) = super::arbiter::open(
            &vm.pair,
            &vm.path,
            node.flags.iter().any(|f| f == "--insecure"),
            node.flags.iter().any(|f| f == "--i-accept-split-brain"),
        )?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("node-{}", vm.pair.vm.name))
                .spawn(move || node.supervise(&vm, arbiter.as_deref()))?,
        );
    }
    for t in threads {
        let _ = t.join();
    }
    eprintln!("tandem: node {me}: stopped");
    Ok(())
}

impl Node {
    fn stopping(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Keeps this node's member key alive over its keep-alive stream
    /// (reopening a broken stream, re-registering after a lapse).
    fn keep_membership(&self, mut lease: KeepAlive) {
        while !self.stopping() {
            std::thread::sleep(Duration::from_millis(500));
            // A failed renewal poisons the stream: the second try opens a
            // new one.
            let renewed = self
                .kv
                .renew(&mut lease)
                .or_else(|_| self.kv.renew(&mut lease));
            match renewed {
                Ok(ttl) if ttl > 0 => {}
                outcome => {
                    if let Err(e) = outcome {
                        eprintln!("tandem: node {}: membership lease: {e}", self.me);
                    }
                    match register(&self.kv, &self.me) {
                        Ok(fresh) => lease = fresh,
                        Err(e) => eprintln!("tandem: node {}: cannot register again: {e}", self.me),
                    }
                }
            }
        }
    }

    /// The hosts of `vm`'s slots, as the watch last saw them.
    fn assignment(&self, vm: &str) -> anyhow::Result<Assignment> {
        let seen = self
            .view
            .get(&format!("assign/{vm}"))
            .map_err(|why| anyhow::anyhow!(why))?;
        match seen {
            Some((text, revision)) => Assignment::parse(&text, revision)
                .ok_or_else(|| anyhow::anyhow!("etcd: assignment of {vm} is {text:?}")),
            None => Ok(Assignment {
                a: "a".into(),
                b: "b".into(),
                revision: 0,
            }),
        }
    }

    /// The pair file of `vm` for `assign`: each slot's address on its host.
    fn derived_config(&self, vm: &ClusterVm, assign: &Assignment) -> anyhow::Result<PathBuf> {
        let text = std::fs::read_to_string(&vm.path)
            .with_context(|| format!("cannot read {}", vm.path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: {}", vm.path.display(), e.message()))?;
        for (slot, id) in [("a", config::HostId::A), ("b", config::HostId::B)] {
            let host = assign.host(slot);
            let ip = self
                .membership
                .hosts
                .iter()
                .find(|(n, _)| n == host)
                .map(|(_, ip)| *ip)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "host {host} of {} is not in the cluster file",
                        vm.pair.vm.name
                    )
                })?;
            let port = vm.pair.host(id).address.port();
            if let Some(toml::Value::Table(h)) = table
                .get_mut("hosts")
                .and_then(|h| h.as_table_mut())
                .and_then(|h| h.get_mut(slot))
            {
                h.insert(
                    "address".into(),
                    toml::Value::String(SocketAddr::new(ip, port).to_string()),
                );
            }
        }
        // With spares, a slot's host changes while the live side runs on
        // the file it started with: it cannot know the new host's address,
        // so the peer is checked by its key (derived for this VM) and the
        // slot it claims, not by address.
        if self.membership.hosts.len() > 2 {
            if let Some(toml::Value::Table(ft)) = table.get_mut("ft") {
                ft.insert("verify_peer_address".into(), toml::Value::Boolean(false));
            }
        }
        let dir = &vm.pair.ft.state_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("assigned-{}.toml", self.me));
        std::fs::write(&path, toml::to_string(&table)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }

    /// Runs this host's side of one VM for as long as it holds a slot, and
    /// stands in for a lost host when it is the spare to do so.
    fn supervise(&self, vm: &ClusterVm, arbiter: Option<&dyn Arbiter>) {
        let name = vm.pair.vm.name.as_str();
        let who = format!("node {}: {name}", self.me);
        let mut first = true;
        // The last complaint and when: the same one at most every 10 s.
        let mut said: Option<(String, Instant)> = None;
        while !self.stopping() {
            let seen = self.view.version();
            let assign = match self.assignment(name) {
                Ok(a) => a,
                Err(e) => {
                    let text = format!("{e:#}");
                    let repeat = said.as_ref().is_some_and(|(t, at)| {
                        *t == text && at.elapsed() < Duration::from_secs(10)
                    });
                    if !repeat {
                        eprintln!("tandem: {who}: {text}");
                        said = Some((text, Instant::now()));
                    }
                    self.view.wait_change(seen, RECHECK);
                    continue;
                }
            };
            let Some(slot) = assign.slot_of(&self.me) else {
                first = false;
                self.maybe_stand_in(vm, arbiter, &assign);
                self.view.wait_change(seen, RECHECK);
                continue;
            };
            if std::mem::take(&mut first) && slot != vm.prefer.name() {
                wait_until_live(vm, arbiter, &|| self.stopping());
            }
            let config = match self.derived_config(vm, &assign) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("tandem: {who}: {e:#}");
                    std::thread::sleep(Duration::from_secs(2));
                    continue;
                }
            };
            let started = Instant::now();
            let replaced = std::cell::Cell::new(false);
            let status = run_side(&self.exe, &config, slot, &self.flags, &who, &|| {
                if self.stopping() {
                    return true;
                }
                // Given away (this host dropped out for a while): stop.
                let gone = self
                    .assignment(name)
                    .is_ok_and(|a| a.slot_of(&self.me) != Some(slot));
                replaced.set(gone);
                gone
            });
            if replaced.get() {
                eprintln!("tandem: {who}: slot {slot} went to another host; stopped this side");
                continue;
            }
            if let Some(status) = status {
                pause_after(&who, status, started);
            }
        }
    }

    /// If a slot of `vm` lost its host (not the live side's slot) and this
    /// host is the least-loaded live spare, takes the slot.
    fn maybe_stand_in(&self, vm: &ClusterVm, arbiter: Option<&dyn Arbiter>, assign: &Assignment) {
        let name = vm.pair.vm.name.as_str();
        let Ok(members) = self.view.list("nodes/") else {
            return;
        };
        let live: Vec<&str> = members.iter().map(|(h, _)| h.as_str()).collect();
        for slot in ["a", "b"] {
            let lost = assign.host(slot);
            let other = assign.host(if slot == "a" { "b" } else { "a" });
            if live.contains(&lost) || !live.contains(&other) {
                continue;
            }
            // The live side's slot is its secondary's to take over first.
            let holder = arbiter
                .and_then(|a| a.query(name).ok())
                .and_then(|g| g.holder);
            if holder.as_deref() != Some(if slot == "a" { "b" } else { "a" }) {
                continue;
            }
            if self.chosen_spare(&live, assign).as_deref() != Some(self.me.as_str()) {
                continue;
            }
            let mut next = assign.clone();
            if slot == "a" {
                next.a = self.me.clone();
            } else {
                next.b = self.me.clone();
            }
            match self.kv.put_if_revision(
                &format!("cluster/assign/{name}"),
                assign.revision,
                &next.text(),
            )
            {
                Ok(true) => eprintln!(
                    "tandem: node {}: {name}: host {lost} is gone; standing in for it in slot {slot} (re-protecting the VM live on host {other})",
                    self.me
                ),
                Ok(false) => {}
                Err(e) => eprintln!("tandem: node {}: {name}: cannot take slot {slot}: {e}", self.me),
            }
            return;
        }
    }

    /// The live host not in `assign` with the fewest slots over all VMs
    /// (then by name).
    fn chosen_spare(&self, live: &[&str], assign: &Assignment) -> Option<String> {
        let all = self.view.list("assign/").ok()?;
        let load = |host: &str| {
            all.iter()
                .filter_map(|(_, text)| Assignment::parse(text, 0))
                .filter(|a| a.slot_of(host).is_some())
                .count()
        };
        live.iter()
            .filter(|h| assign.slot_of(h).is_none())
            .map(|h| (load(h), h.to_string()))
            .min()
            .map(|(_, h)| h)
    }
}

/// Registers `me` as a member: its key on a fresh lease, kept alive.
fn register(kv: &EtcdClient, me: &str) -> Result<KeepAlive, super::arbiter::ArbiterError> {
    let (id, _) = kv.grant(NODE_TTL_S)?;
    kv.put_leased_if(&format!("cluster/nodes/{me}"), "up", id, None)?;
    kv.keep_alive_stream(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_round_trip_and_name_slots() {
        let a = Assignment::parse("a=x b=y", 7).unwrap();
        assert_eq!(a.slot_of("y"), Some("b"));
        assert_eq!(a.slot_of("z"), None);
        assert_eq!(a.host("a"), "x");
        assert_eq!(Assignment::parse(&a.text(), 7), Some(a));
        assert_eq!(Assignment::parse("a=x", 1), None);
        assert_eq!(Assignment::parse("a=x c=y", 1), None);
    }
}
