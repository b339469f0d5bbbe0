//! `etcd://HOST:PORT[,HOST:PORT...]/PREFIX`: generations kept in etcd.
//!
//! Operators who run many protected VMs already run a coordination service
//! and trust it with "who is live" (as Kubernetes and Patroni do). The VM's
//! key `PREFIX/vm/NAME` holds `"<generation> <holder>"`. A claim reads the
//! key and its modification revision, and then writes generation + 1 in an
//! etcd transaction that succeeds only if the key's revision is still the
//! one read (compare-and-set on the revision: two claimants of the same
//! generation cannot both win, whichever etcd member each talks to, since a
//! transaction commits through etcd's Raft log). The generation is the
//! fencing token the pair already carries in every frame.
//!
//! The live side also holds an etcd **lease** (`hold`): the key
//! `PREFIX/vm/NAME/live` = `"<generation> <holder>"`, attached to a lease of
//! `lease_ttl` that the live side keeps alive over a keep-alive stream. It
//! is created only while the VM's key still names that generation and
//! holder (a transaction comparing the value), so a superseded side cannot
//! take one. The pair releases output only while its lease holds; one that
//! cannot renew it stops releasing anything before etcd lets the lease
//! expire and hands the VM to its secondary (see `ft::pair`).
//!
//! The client is the `etcd-client` crate (etcd's gRPC API) with TLS and
//! etcd's own authentication when configured (`[ft] etcd_ca`, `etcd_cert`,
//! `etcd_key`, `etcd_user`, `etcd_password_file`); see [`client`].

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use super::{validate_name as check_name, Arbiter, ArbiterError, ClaimOutcome, Grant};
use tandem_config::EtcdAccess;

pub mod client;
pub mod watch;

pub use client::{EtcdClient, KeepAlive};

/// An arbiter on an etcd cluster.
pub struct EtcdArbiter {
    client: EtcdClient,
    /// The live side's lease length, in whole seconds.
    lease_ttl_s: i64,
    /// The lease this side holds, and the generation it is for.
    lease: Mutex<Option<(KeepAlive, u64)>>,
}

/// The shortest lease the pair takes: long enough to ride out an etcd
/// leader election (about 1–2 s with etcd's default timing) when a member
/// is lost; etcd's own minimum is 2 s.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(4);

impl EtcdArbiter {
    /// A client of the etcd members `endpoints` (reached with `access`),
    /// keys under `prefix`; each request waits at most `timeout`. Fails
    /// when etcd does not answer a first read.
    pub fn connect(
        endpoints: &[SocketAddr],
        prefix: &str,
        access: &EtcdAccess,
        timeout: Duration,
    ) -> Result<Self, ArbiterError> {
        Ok(Self {
            client: EtcdClient::connect(endpoints, prefix, access, timeout)?,
            lease_ttl_s: DEFAULT_LEASE_TTL.as_secs() as i64,
            lease: Mutex::new(None),
        })
    }

    /// The live side's lease lasts `ttl` (rounded up to whole seconds).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl_s = ttl.as_secs_f64().ceil().max(1.0) as i64;
        self
    }

    /// The connection, for plain key-value use (cluster membership).
    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Option<(KeepAlive, u64)>> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Grants a new lease and puts the live key on it, if the VM's key
    /// still names `generation` and `holder`. Returns the kept lease and
    /// its TTL.
    fn take_lease(
        &self,
        vm: &str,
        generation: u64,
        holder: &str,
    ) -> Result<(KeepAlive, i64), ArbiterError> {
        let (id, ttl) = self.client.grant(self.lease_ttl_s)?;
        let ours = format!("{generation} {holder}");
        let guard = Some((self.client.key(&format!("vm/{vm}")), ours.clone()));
        if !self
            .client
            .put_leased_if(&format!("vm/{vm}/live"), &ours, id, guard)?
        {
            let _ = self.client.revoke(id);
            return Err(ArbiterError::LeaseRefused(format!(
                "generation {generation} of {vm} is not held by {holder} any more ({})",
                self.read(vm)
                    .map(|(g, _)| g.to_string())
                    .unwrap_or_else(|e| e.to_string())
            )));
        }
        Ok((self.client.keep_alive_stream(id)?, ttl))
    }

    /// The VM's grant and the key's modification revision (0: no key).
    fn read(&self, vm: &str) -> Result<(Grant, i64), ArbiterError> {
        let Some((value, revision)) = self.client.get(&format!("vm/{vm}"))? else {
            return Ok((Grant::unclaimed(), 0));
        };
        let (generation, holder) = value
            .split_once(' ')
            .and_then(|(g, h)| Some((g.parse::<u64>().ok()?, h.to_string())))
            .ok_or_else(|| {
                self.client.error(
                    &format!("the key of {vm}"),
                    &format!("holds {value:?}, not \"<generation> <holder>\""),
                )
            })?;
        Ok((
            Grant {
                generation,
                holder: Some(holder),
            },
            revision,
        ))
    }
}

impl Arbiter for EtcdArbiter {
    fn query(&self, vm: &str) -> Result<Grant, ArbiterError> {
        check_name("vm", vm)?;
        Ok(self.read(vm)?.0)
    }

    fn claim(&self, vm: &str, expected: u64, holder: &str) -> Result<ClaimOutcome, ArbiterError> {
        check_name("vm", vm)?;
        check_name("holder", holder)?;
        let next = expected
            .checked_add(1)
            .ok_or(ArbiterError::GenerationExhausted(expected))?;
        let (current, revision) = self.read(vm)?;
        if current.generation != expected {
            return Ok(ClaimOutcome::Refused(current));
        }
        if self.client.put_if_revision(
            &format!("vm/{vm}"),
            revision,
            &format!("{next} {holder}"),
        )? {
            return Ok(ClaimOutcome::Granted(next));
        }
        // Someone else moved the key between the read and the transaction,
        // or an earlier try of this very claim was applied.
        let (now, _) = self.read(vm)?;
        if now.generation == next && now.holder.as_deref() == Some(holder) {
            return Ok(ClaimOutcome::Granted(next));
        }
        Ok(ClaimOutcome::Refused(now))
    }

    fn hold(
        &self,
        vm: &str,
        generation: u64,
        holder: &str,
    ) -> Result<Option<Duration>, ArbiterError> {
        check_name("vm", vm)?;
        check_name("holder", holder)?;
        let mut held = self.lease();
        let kept = match held.as_mut() {
            Some((lease, g)) if *g == generation => lease,
            _ => {
                *held = None;
                let (lease, ttl) = self.take_lease(vm, generation, holder)?;
                *held = Some((lease, generation));
                return Ok(Some(Duration::from_secs(ttl.max(0) as u64)));
            }
        };
        // A failed renewal poisons the stream; the second try opens a new
        // one (on another member when that one failed).
        let ttl = match self.client.renew(kept).or_else(|_| self.client.renew(kept)) {
            Ok(ttl) => ttl,
            // Expired while the stream was down: the next hold takes a
            // new lease, if the generation is still this side's.
            Err(ArbiterError::LeaseRefused(why)) => {
                *held = None;
                return Err(ArbiterError::LeaseRefused(format!("{why} ({vm})")));
            }
            // Kept: the next renewal tries this lease again.
            Err(e) => return Err(e),
        };
        if ttl <= 0 {
            let id = kept.id;
            *held = None;
            return Err(ArbiterError::LeaseRefused(format!(
                "etcd lease {id:x} of {vm} expired before it was renewed"
            )));
        }
        Ok(Some(Duration::from_secs(ttl as u64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_cluster_is_an_error_naming_it() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let e = EtcdArbiter::connect(
            &[port],
            "/tandem",
            &EtcdAccess::default(),
            Duration::from_millis(500),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("unreachable") && e.contains("etcd") && e.contains(&port.to_string()),
            "{e}"
        );
    }
}
