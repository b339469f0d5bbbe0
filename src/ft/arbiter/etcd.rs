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
//!
//! The live side also holds an etcd **lease** (`hold`): the key
//! `PREFIX/vm/NAME/live` = `"<generation> <holder>"`, attached to a lease of
//! `lease_ttl` that the live side keeps alive. It is created only while the
//! VM's key still names that generation and holder (a transaction comparing
//! the value), so a superseded side cannot take one. The pair releases
//! output only while its lease holds; one that cannot renew it stops
//! releasing anything before etcd lets the lease expire and hands the VM to
//! its secondary (see `ft::pair`).
//!
//! The client speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/txn`,
//! plain HTTP/1.1, keys and values base64) with the standard library, so
//! building tandem needs neither protoc nor a gRPC stack. The endpoints are
//! tried in order; a member that does not answer is skipped. etcd's own TLS
//! and authentication are not used: keep the client port on a private
//! network.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Value};

use super::{validate_name as check_name, Arbiter, ArbiterError, ClaimOutcome, Grant};

/// An arbiter on an etcd cluster.
pub struct EtcdArbiter {
    endpoints: Vec<SocketAddr>,
    prefix: String,
    timeout: Duration,
    /// The live side's lease length, in whole seconds.
    lease_ttl_s: u64,
    /// The lease this side holds: (etcd lease id, generation it is for).
    lease: std::sync::Mutex<Option<(String, u64)>>,
}

/// The shortest lease the pair takes: long enough to ride out an etcd
/// leader election (about 1–2 s with etcd's default timing) when a member
/// is lost; etcd's own minimum is 2 s.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(4);

/// Largest HTTP response read from etcd.
const MAX_RESPONSE: usize = 1 << 20;

impl EtcdArbiter {
    /// A client of the etcd members `endpoints`, keys under `prefix`; each
    /// request waits at most `timeout` per member.
    pub fn new(endpoints: Vec<SocketAddr>, prefix: &str, timeout: Duration) -> Self {
        Self {
            endpoints,
            prefix: prefix.trim_end_matches('/').to_string(),
            timeout,
            lease_ttl_s: DEFAULT_LEASE_TTL.as_secs(),
            lease: std::sync::Mutex::new(None),
        }
    }

    /// The live side's lease lasts `ttl` (rounded up to whole seconds).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl_s = ttl.as_secs_f64().ceil().max(1.0) as u64;
        self
    }

    fn key(&self, vm: &str) -> String {
        format!("{}/vm/{vm}", self.prefix)
    }

    fn live_key(&self, vm: &str) -> String {
        format!("{}/vm/{vm}/live", self.prefix)
    }

    fn lease(&self) -> std::sync::MutexGuard<'_, Option<(String, u64)>> {
        self.lease.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A bad reply from the first endpoint (for errors about a reply).
    fn bad_reply(&self, why: &str, reply: &Value) -> ArbiterError {
        ArbiterError::BadReply {
            addr: self
                .endpoints
                .first()
                .copied()
                .unwrap_or(([0, 0, 0, 0], 0).into()),
            reply: format!(
                "{why}: {}",
                reply.to_string().chars().take(200).collect::<String>()
            ),
        }
    }

    /// Grants a new lease and puts the live key on it, if the VM's key
    /// still names `generation` and `holder`. Returns the lease id and TTL.
    fn take_lease(
        &self,
        vm: &str,
        generation: u64,
        holder: &str,
    ) -> Result<(String, u64), ArbiterError> {
        let grant = self.post("/v3/lease/grant", &json!({ "TTL": self.lease_ttl_s }))?;
        let id = json_int(&grant, "ID").ok_or_else(|| self.bad_reply("no lease ID", &grant))?;
        let ttl = json_int(&grant, "TTL")
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or_else(|| self.bad_reply("no lease TTL", &grant))?;
        let ours = B64.encode(format!("{generation} {holder}"));
        let txn = json!({
            "compare": [{
                "key": B64.encode(self.key(vm)),
                "target": "VALUE",
                "result": "EQUAL",
                "value": ours,
            }],
            "success": [{
                "request_put": { "key": B64.encode(self.live_key(vm)), "value": ours, "lease": id }
            }],
        });
        let reply = self.post("/v3/kv/txn", &txn)?;
        if reply.get("succeeded").and_then(Value::as_bool) != Some(true) {
            let _ = self.post("/v3/lease/revoke", &json!({ "ID": id }));
            return Err(ArbiterError::LeaseRefused(format!(
                "generation {generation} of {vm} is not held by {holder} any more ({})",
                self.read(vm)
                    .map(|(g, _)| g.to_string())
                    .unwrap_or_else(|e| e.to_string())
            )));
        }
        Ok((id, ttl))
    }

    /// POSTs `body` to `path` on the first member that answers well.
    /// Any failure (unreachable, a broken reply, "leader changed") moves on
    /// to the next member: every request here is safe to repeat. Reads and
    /// lease renewals are idempotent, a repeated grant only leaves a lease to
    /// expire, and a transaction compares a revision, so a repeat of one
    /// that was applied fails its compare (and `claim` then finds the
    /// generation its own).
    fn post(&self, path: &str, body: &Value) -> Result<Value, ArbiterError> {
        let mut last = None;
        for &addr in &self.endpoints {
            match self.post_to(addr, path, body) {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ArbiterError::Remote {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            reason: "no etcd endpoint configured".into(),
        }))
    }

    fn post_to(&self, addr: SocketAddr, path: &str, body: &Value) -> Result<Value, ArbiterError> {
        let mut stream = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| {
            ArbiterError::Unreachable {
                addr,
                reason: format!("etcd: {e}"),
            }
        })?;
        let conn = |op: &'static str| {
            move |e: std::io::Error| ArbiterError::Connection {
                addr,
                op,
                reason: e.to_string(),
            }
        };
        stream
            .set_read_timeout(Some(self.timeout))
            .map_err(conn("setting a timeout"))?;
        stream
            .set_write_timeout(Some(self.timeout))
            .map_err(conn("setting a timeout"))?;
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(conn("sending the request"))?;
        let mut response = Vec::new();
        stream
            .take(MAX_RESPONSE as u64)
            .read_to_end(&mut response)
            .map_err(conn("reading the reply"))?;
        let text = String::from_utf8_lossy(&response);
        let bad = |why: &str| ArbiterError::BadReply {
            addr,
            reply: format!("{why}: {}", text.chars().take(200).collect::<String>()),
        };
        let (head, payload) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| bad("no HTTP header"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| bad("no HTTP status"))?;
        // A chunked body (etcd's gateway answers with one) is de-chunked.
        let payload = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(payload).ok_or_else(|| bad("bad chunked body"))?
        } else {
            payload.to_string()
        };
        let value: Value = serde_json::from_str(payload.trim()).map_err(|_| bad("not JSON"))?;
        if status != 200 {
            return Err(ArbiterError::Remote {
                addr,
                reason: format!(
                    "etcd answered HTTP {status}: {}",
                    value.get("message").and_then(Value::as_str).unwrap_or("")
                ),
            });
        }
        Ok(value)
    }

    /// The VM's grant and the key's modification revision (0: no key).
    fn read(&self, vm: &str) -> Result<(Grant, i64), ArbiterError> {
        let Some((value, revision)) = self.kv_get(&format!("vm/{vm}"))? else {
            return Ok((Grant::unclaimed(), 0));
        };
        let (generation, holder) = value
            .split_once(' ')
            .and_then(|(g, h)| Some((g.parse::<u64>().ok()?, h.to_string())))
            .ok_or_else(|| {
                self.bad_reply(
                    "value is not \"<generation> <holder>\"",
                    &Value::String(value.clone()),
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

/// Plain key-value use of the same etcd cluster (cluster membership of
/// `tandem node`); keys are relative to the prefix.
impl EtcdArbiter {
    fn full_key(&self, rel: &str) -> String {
        format!("{}/{rel}", self.prefix)
    }

    /// (value, modification revision) of a key, or None.
    pub fn kv_get(&self, rel: &str) -> Result<Option<(String, i64)>, ArbiterError> {
        let reply = self.post(
            "/v3/kv/range",
            &json!({ "key": B64.encode(self.full_key(rel)) }),
        )?;
        let Some(kv) = reply.get("kvs").and_then(|k| k.get(0)) else {
            return Ok(None);
        };
        let revision = json_int(kv, "mod_revision")
            .and_then(|r| r.parse().ok())
            .ok_or_else(|| self.bad_reply("no mod_revision", kv))?;
        Ok(Some((decode_value(kv).unwrap_or_default(), revision)))
    }

    /// Every (key after `rel_prefix`, value) under a prefix.
    pub fn kv_list(&self, rel_prefix: &str) -> Result<Vec<(String, String)>, ArbiterError> {
        let start = self.full_key(rel_prefix);
        let mut end = start.clone().into_bytes();
        // The range end of a prefix: its last byte plus one.
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let reply = self.post(
            "/v3/kv/range",
            &json!({ "key": B64.encode(&start), "range_end": B64.encode(&end) }),
        )?;
        let mut out = Vec::new();
        for kv in reply
            .get("kvs")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let key = kv
                .get("key")
                .and_then(Value::as_str)
                .and_then(|k| B64.decode(k).ok())
                .and_then(|k| String::from_utf8(k).ok())
                .unwrap_or_default();
            if let Some(rest) = key.strip_prefix(&start) {
                out.push((rest.to_string(), decode_value(kv).unwrap_or_default()));
            }
        }
        Ok(out)
    }

    /// Writes `value` if the key's modification revision is still
    /// `revision` (0: the key must not exist). True when written.
    pub fn kv_put_if(&self, rel: &str, revision: i64, value: &str) -> Result<bool, ArbiterError> {
        self.put_if_revision(&self.full_key(rel), revision, value)
    }

    /// The compare-and-set every write here is: put `value` at `key` (a
    /// full key) in a transaction that compares its modification revision
    /// with `revision`. True when written.
    fn put_if_revision(&self, key: &str, revision: i64, value: &str) -> Result<bool, ArbiterError> {
        let key = B64.encode(key);
        let txn = json!({
            "compare": [{
                "key": key,
                "target": "MOD",
                "result": "EQUAL",
                "mod_revision": revision.to_string(),
            }],
            "success": [{ "request_put": { "key": key, "value": B64.encode(value) } }],
        });
        let reply = self.post("/v3/kv/txn", &txn)?;
        Ok(reply.get("succeeded").and_then(Value::as_bool) == Some(true))
    }

    /// Grants a lease of `ttl_s` seconds and puts the key on it; returns
    /// the lease id.
    pub fn kv_put_leased(
        &self,
        rel: &str,
        value: &str,
        ttl_s: u64,
    ) -> Result<String, ArbiterError> {
        let grant = self.post("/v3/lease/grant", &json!({ "TTL": ttl_s }))?;
        let id = json_int(&grant, "ID").ok_or_else(|| self.bad_reply("no lease ID", &grant))?;
        self.post(
            "/v3/kv/put",
            &json!({ "key": B64.encode(self.full_key(rel)), "value": B64.encode(value), "lease": id }),
        )?;
        Ok(id)
    }

    /// Keeps lease `id` alive; an error once it has expired.
    pub fn keep_alive(&self, id: &str) -> Result<(), ArbiterError> {
        let reply = self.post("/v3/lease/keepalive", &json!({ "ID": id }))?;
        let result = reply.get("result").unwrap_or(&reply);
        match json_int(result, "TTL").and_then(|t| t.parse::<i64>().ok()) {
            Some(ttl) if ttl > 0 => Ok(()),
            _ => Err(ArbiterError::LeaseRefused(format!(
                "etcd lease {id} expired"
            ))),
        }
    }
}

/// A key-value's value as text.
fn decode_value(kv: &Value) -> Option<String> {
    kv.get("value")
        .and_then(Value::as_str)
        .and_then(|v| B64.decode(v).ok())
        .and_then(|v| String::from_utf8(v).ok())
}

/// Joins the chunks of an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
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
        if self.put_if_revision(&self.key(vm), revision, &format!("{next} {holder}"))? {
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
        let held = self.lease().clone();
        let id = match held {
            Some((id, g)) if g == generation => id,
            _ => {
                let (id, ttl) = self.take_lease(vm, generation, holder)?;
                *self.lease() = Some((id, generation));
                return Ok(Some(Duration::from_secs(ttl)));
            }
        };
        let reply = self.post("/v3/lease/keepalive", &json!({ "ID": id }))?;
        // The gateway streams one `{"result": {...}}` per request.
        let result = reply.get("result").unwrap_or(&reply);
        let ttl = json_int(result, "TTL").and_then(|t| t.parse::<i64>().ok());
        match ttl {
            Some(ttl) if ttl > 0 => Ok(Some(Duration::from_secs(ttl as u64))),
            _ => {
                *self.lease() = None;
                Err(ArbiterError::LeaseRefused(format!(
                    "etcd lease {id} of {vm} expired before it was renewed"
                )))
            }
        }
    }
}

/// An etcd integer field (the gateway writes int64 as a string).
fn json_int(v: &Value, field: &str) -> Option<String> {
    match v.get(field)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").as_deref(),
            Some("hello world")
        );
        assert_eq!(dechunk("zz\r\n"), None);
        assert_eq!(dechunk("5\r\nhel"), None);
    }

    #[test]
    fn an_unreachable_cluster_is_an_error_naming_it() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let a = EtcdArbiter::new(vec![port], "/tandem", Duration::from_millis(500));
        let e = a.query("web1").unwrap_err().to_string();
        assert!(e.contains("unreachable") && e.contains("etcd"), "{e}");
    }
}
