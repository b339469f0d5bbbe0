//! The etcd connection: etcd's gRPC API through the `etcd-client` crate,
//! with TLS (a CA, optionally a client certificate) and etcd's own
//! authentication, on a tokio runtime of its own.
//!
//! Callers are plain threads (the pair's lease and claim code, a node's
//! supervisors): every call blocks on that runtime for at most the
//! client's timeout. The runtime's one worker thread drives the
//! connections, keep-alive streams and watches; the vCPU and replication
//! threads never touch it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp,
};

use crate::arbiter::ArbiterError;
use crate::auth::read_private_file;
use tandem_config::EtcdAccess;

/// A connection to an etcd cluster, keys under one prefix.
pub struct EtcdClient {
    runtime: tokio::runtime::Runtime,
    members: Arc<Members>,
    /// `https://IP:PORT,...` for messages.
    shown: String,
    prefix: String,
    timeout: Duration,
}

/// One client per member, made when first needed. A request goes to the
/// member that last answered and moves on to the next one when that one
/// does not answer: every request here is safe to repeat (reads and
/// renewals are idempotent, a repeated grant only leaves a lease to
/// expire, and a transaction compares a revision, so a repeat of one that
/// was applied fails its compare). One client over all members would keep
/// sending to a lost member: its channel does not drop an endpoint that
/// refuses connections.
pub struct Members {
    urls: Vec<String>,
    options: ConnectOptions,
    clients: Mutex<Vec<Option<Client>>>,
    /// The member that last answered.
    preferred: AtomicUsize,
    /// How long one member may take.
    timeout: Duration,
    /// How the client is set up (for hints in errors).
    setup: Setup,
}

/// What an error hint needs to know of the client's set-up.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// It speaks TLS.
    pub tls: bool,
    /// It shows a client certificate.
    pub identity: bool,
}

impl Members {
    /// The client of member `i`, connecting (and authenticating) first.
    async fn client(&self, i: usize) -> Result<Client, etcd_client::Error> {
        if let Some(c) = self.clients.lock().unwrap_or_else(|p| p.into_inner())[i].clone() {
            return Ok(c);
        }
        let c = Client::connect([&self.urls[i]], Some(self.options.clone())).await?;
        self.clients.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(c.clone());
        Ok(c)
    }

    /// Runs `op` on the preferred member, then on each other one while
    /// they fail to answer; the last failure if none answers.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, String>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.run_on_any(op).await.map(|(v, _)| v)
    }

    /// [`Self::run`], also saying which member answered.
    async fn run_on_any<T, F, Fut>(&self, op: F) -> Result<(T, usize), String>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let first = self.preferred.load(Ordering::Relaxed);
        // What each member that failed said; the most telling goes back.
        let mut failures: Vec<String> = Vec::new();
        for k in 0..self.urls.len() {
            let i = (first + k) % self.urls.len();
            let tried = tokio::time::timeout(self.timeout, async {
                let c = self.client(i).await?;
                op(c).await
            })
            .await;
            match tried {
                Ok(Ok(v)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((v, i));
                }
                Ok(Err(e)) if !member_failed(&e) => return Err(describe(&e, self.setup)),
                Ok(Err(e)) => {
                    // A fresh connection next time (this one may be dead).
                    self.clients.lock().unwrap_or_else(|p| p.into_inner())[i] = None;
                    failures.push(describe(&e, self.setup));
                }
                Err(_) => {
                    self.clients.lock().unwrap_or_else(|p| p.into_inner())[i] = None;
                    failures.push(format!(
                        "unreachable: {} did not answer within {} ms",
                        self.urls[i],
                        self.timeout.as_millis()
                    ));
                }
            }
        }
        // A refused certificate shows on some connections only (others
        // see the connection close): say that one.
        let telling = failures
            .iter()
            .position(|f| f.starts_with("TLS failed"))
            .unwrap_or(0);
        Err(failures
            .into_iter()
            .nth(telling)
            .unwrap_or_else(|| "no etcd endpoint configured".into()))
    }
}

impl Members {
    /// Member `i` failed outside [`Self::run`] (a lease's stream): start
    /// the next request elsewhere, on a fresh connection.
    fn avoid(&self, i: usize) {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())[i] = None;
        let _ = self.preferred.compare_exchange(
            i,
            (i + 1) % self.urls.len().max(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// Whether an error says the member could not serve (so another may),
/// rather than that etcd refused the request.
fn member_failed(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
            ) && !s.message().contains("invalid user ID or password")
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        _ => false,
    }
}

impl EtcdClient {
    /// Connects to the members `endpoints` with `access` (TLS, user) and
    /// checks that etcd answers a read under `prefix`: an unreachable
    /// cluster, a TLS mismatch, a refused certificate or a wrong password
    /// is one clear error here, at start.
    pub fn connect(
        endpoints: &[SocketAddr],
        prefix: &str,
        access: &EtcdAccess,
        timeout: Duration,
    ) -> Result<Self, ArbiterError> {
        let scheme = if access.tls() { "https" } else { "http" };
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect();
        let shown = urls.join(",");
        let setup = |reason: String| ArbiterError::Etcd {
            endpoints: shown.clone(),
            reason,
        };
        let options = connect_options(access, timeout).map_err(setup)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tandem-etcd")
            .enable_all()
            .build()
            .map_err(|e| setup(format!("cannot start its client runtime: {e}")))?;
        let members = Arc::new(Members {
            clients: Mutex::new(vec![None; urls.len()]),
            urls,
            options,
            preferred: AtomicUsize::new(0),
            timeout,
            setup: Setup {
                tls: access.tls(),
                identity: access.identity.is_some(),
            },
        });
        let me = Self {
            runtime,
            members,
            shown,
            prefix: prefix.trim_end_matches('/').to_string(),
            timeout,
        };
        // Under `PREFIX/`, as every key tandem uses: a role scoped to that
        // is enough.
        me.call("a first read", |mut c, prefix| async move {
            c.get(
                format!("{prefix}/"),
                Some(GetOptions::new().with_prefix().with_count_only()),
            )
            .await
        })?;
        Ok(me)
    }

    /// The endpoints, as `https://IP:PORT,...`.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// The full key of `rel` (a key relative to the prefix).
    pub fn key(&self, rel: &str) -> String {
        format!("{}/{rel}", self.prefix)
    }

    /// Runs `op` (given a member's client and the prefix) on the runtime,
    /// on the members in turn until one answers; an error names the
    /// endpoints and `what`.
    pub fn call<T, F, Fut>(&self, what: &str, op: F) -> Result<T, ArbiterError>
    where
        F: Fn(Client, String) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let prefix = &self.prefix;
        self.runtime
            .block_on(self.members.run(|c| op(c, prefix.clone())))
            .map_err(|reason| self.error(what, &reason))
    }

    /// Runs `fut` (on one stream: no other member to try) for at most the
    /// timeout.
    fn block<T, Fut>(&self, what: &str, fut: Fut) -> Result<T, ArbiterError>
    where
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        match self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, fut).await })
        {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(what, &describe(&e, self.members.setup))),
            Err(_) => Err(self.error(
                what,
                &format!(
                    "unreachable: no answer within {} ms",
                    self.timeout.as_millis()
                ),
            )),
        }
    }

    /// Spawns `task` on the client's runtime (watches).
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.runtime.spawn(task);
    }

    /// The members, for tasks on the runtime.
    pub fn members(&self) -> Arc<Members> {
        self.members.clone()
    }

    /// An error about `what`.
    pub fn error(&self, what: &str, reason: &str) -> ArbiterError {
        ArbiterError::Etcd {
            endpoints: self.shown.clone(),
            reason: format!("{what}: {reason}"),
        }
    }

    /// (value, modification revision) of the key `rel`, or None.
    pub fn get(&self, rel: &str) -> Result<Option<(String, i64)>, ArbiterError> {
        let key = self.key(rel);
        let reply = self.call("reading a key", |mut c, _| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(reply.kvs().first().map(|kv| {
            (
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.mod_revision(),
            )
        }))
    }

    /// Every (key after `rel_prefix`, value) under a prefix.
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<(String, String)>, ArbiterError> {
        let start = self.key(rel_prefix);
        let reply = self.call("listing keys", |mut c, _| {
            let key = start.clone();
            async move { c.get(key, Some(GetOptions::new().with_prefix())).await }
        })?;
        Ok(reply
            .kvs()
            .iter()
            .filter_map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let rest = key.strip_prefix(&start)?;
                Some((
                    rest.to_string(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                ))
            })
            .collect())
    }

    /// The compare-and-set every write here is: puts `value` at `rel` in a
    /// transaction that succeeds only if the key's modification revision
    /// is still `revision` (0: the key must not exist). True when written.
    pub fn put_if_revision(
        &self,
        rel: &str,
        revision: i64,
        value: &str,
    ) -> Result<bool, ArbiterError> {
        let key = self.key(rel);
        let value = value.to_string();
        let reply = self.call("a compare-and-set", |mut c, _| {
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
            async move { c.txn(txn).await }
        })?;
        Ok(reply.succeeded())
    }

    /// Grants a lease of `ttl_s` seconds: (its id, the TTL etcd gave).
    pub fn grant(&self, ttl_s: i64) -> Result<(i64, i64), ArbiterError> {
        let reply = self.call("granting a lease", |mut c, _| async move {
            c.lease_grant(ttl_s, None).await
        })?;
        Ok((reply.id(), reply.ttl()))
    }

    /// Revokes a lease (its keys go at once).
    pub fn revoke(&self, id: i64) -> Result<(), ArbiterError> {
        self.call("revoking a lease", |mut c, _| async move {
            c.lease_revoke(id).await
        })
        .map(drop)
    }

    /// Puts `value` at `rel` on lease `id`, if `guard` (full key, value)
    /// holds. True when written.
    pub fn put_leased_if(
        &self,
        rel: &str,
        value: &str,
        id: i64,
        guard: Option<(String, String)>,
    ) -> Result<bool, ArbiterError> {
        let key = self.key(rel);
        let value = value.to_string();
        let reply = self.call("writing a leased key", |mut c, _| {
            let put = TxnOp::put(
                key.clone(),
                value.clone(),
                Some(PutOptions::new().with_lease(id)),
            );
            let txn = match &guard {
                Some((k, v)) => Txn::new()
                    .when([Compare::value(k.clone(), CompareOp::Equal, v.clone())])
                    .and_then([put]),
                None => Txn::new().and_then([put]),
            };
            async move { c.txn(txn).await }
        })?;
        Ok(reply.succeeded())
    }

    /// Opens a keep-alive stream for lease `id`. etcd-client answers "lease
    /// not found" for a lease that has expired: that is
    /// [`ArbiterError::LeaseRefused`].
    pub fn keep_alive_stream(&self, id: i64) -> Result<KeepAlive, ArbiterError> {
        let opened = self.runtime.block_on(
            self.members
                .run_on_any(|mut c| async move { c.lease_keep_alive(id).await }),
        );
        match opened {
            Ok(((keeper, stream), member)) => Ok(KeepAlive {
                id,
                member,
                keeper,
                stream,
                poisoned: false,
            }),
            Err(reason) if reason.contains("lease not found") => Err(ArbiterError::LeaseRefused(
                format!("etcd lease {id:x} has expired"),
            )),
            Err(reason) => Err(self.error("opening a lease keep-alive stream", &reason)),
        }
    }

    /// Renews a lease on its stream: the TTL etcd gave back (≤ 0: the
    /// lease has expired). A stream whose last renewal did not complete
    /// may still deliver that renewal's late answer, which would pass for
    /// this one's: it is replaced first, on another member if that one
    /// failed.
    pub fn renew(&self, lease: &mut KeepAlive) -> Result<i64, ArbiterError> {
        if lease.poisoned {
            *lease = self.keep_alive_stream(lease.id)?;
        }
        let KeepAlive { keeper, stream, .. } = &mut *lease;
        let reply = self.block("renewing a lease", async move {
            keeper.keep_alive().await?;
            stream.message().await
        });
        match reply {
            Ok(Some(r)) => Ok(r.ttl()),
            Ok(None) => {
                lease.poisoned = true;
                self.members.avoid(lease.member);
                Err(self.error("renewing a lease", "etcd closed the keep-alive stream"))
            }
            Err(e) => {
                lease.poisoned = true;
                self.members.avoid(lease.member);
                Err(e)
            }
        }
    }
}

/// An etcd lease kept alive over a stream (one request and one answer per
/// renewal, on one HTTP/2 stream, instead of a request per renewal).
pub struct KeepAlive {
    /// The lease.
    pub id: i64,
    /// The member the stream goes to.
    member: usize,
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// A renewal on it did not complete: do not use it again.
    poisoned: bool,
}

/// The client's options: timeouts, TLS from the access files, the user.
fn connect_options(access: &EtcdAccess, timeout: Duration) -> Result<ConnectOptions, String> {
    // No per-request timeout here: each try on a member has its own (in
    // `Members::run`), which moves on to the next member; gRPC's would
    // end the request as Cancelled instead.
    let mut options = ConnectOptions::new()
        .with_connect_timeout(timeout)
        // A request during a leader election fails at once instead of
        // waiting: the caller tries again (its patience is its own).
        .with_require_leader(true)
        .with_keep_alive(Duration::from_secs(1), timeout)
        .with_auto_token_refresh(true);
    if let Some(ca) = &access.ca {
        let pem = std::fs::read(ca).map_err(|e| format!("etcd_ca {}: {e}", ca.display()))?;
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(pem));
        if let Some((cert, key)) = &access.identity {
            let cert_pem =
                std::fs::read(cert).map_err(|e| format!("etcd_cert {}: {e}", cert.display()))?;
            let key_pem = read_private_file(key, "etcd_key")?;
            tls = tls.identity(Identity::from_pem(cert_pem, key_pem));
        }
        options = options.with_tls(tls);
    }
    if let Some((user, file)) = &access.user {
        let bytes = read_private_file(file, "etcd_password_file")?;
        let password = String::from_utf8(bytes)
            .map_err(|_| format!("etcd_password_file {} is not UTF-8 text", file.display()))?;
        let password = password.trim_end_matches(['\n', '\r']);
        if password.is_empty() {
            return Err(format!("etcd_password_file {} is empty", file.display()));
        }
        options = options.with_user(user.clone(), password.to_string());
    }
    Ok(options)
}

/// One line for an etcd client error: what etcd said, or why the
/// connection failed (its root cause), with a hint for the usual set-up
/// mistakes. `tls`: whether this client speaks TLS.
pub fn describe(e: &etcd_client::Error, setup: Setup) -> String {
    let cause = match e {
        etcd_client::Error::GRpcStatus(status) => {
            let message = status.message();
            match status.code() {
                // etcd answers a wrong password with InvalidArgument.
                _ if message.contains("invalid user ID or password") => {
                    return format!("authentication failed: wrong user or password ({message})")
                }
                tonic::Code::Unauthenticated => {
                    return format!("authentication failed: {message}")
                }
                tonic::Code::PermissionDenied => return format!(
                    "permission denied: {message} (the etcd user needs read and write access to the key prefix)"
                ),
                _ if message.contains("user name is empty") => {
                    return "etcd requires authentication: set etcd_user and etcd_password_file"
                        .into()
                }
                // The connection failed: why is in the causes.
                tonic::Code::Unavailable | tonic::Code::Unknown => {
                    root_cause(status).unwrap_or_else(|| message.to_string())
                }
                code => return format!("etcd answered {code:?}: {message}"),
            }
        }
        other => root_cause(other).unwrap_or_else(|| other.to_string()),
    };
    let lower = cause.to_ascii_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        let hint = match (setup.tls, setup.identity) {
            (true, true) => {
                "check etcd_ca, etcd_cert and etcd_key against the cluster's certificates"
            }
            (true, false) => {
                "the members may require a client certificate: set etcd_cert and etcd_key"
            }
            (false, _) => "the members may want TLS: set etcd_ca and a client certificate",
        };
        return format!("TLS failed: {cause} ({hint})");
    }
    if lower.contains("broken pipe") || lower.contains("reset") || lower.contains("eof") {
        let hint = match (setup.tls, setup.identity) {
            (true, true) => {
                "the members may have refused this client: check etcd_cert and etcd_key"
            }
            (true, false) => {
                "the members may require a client certificate: set etcd_cert and etcd_key"
            }
            (false, _) => "if the members speak TLS, set etcd_ca and a client certificate",
        };
        return format!("unreachable: {cause} ({hint})");
    }
    format!("unreachable: {cause}")
}

/// The innermost cause of an error (None: it has no sources).
fn root_cause(e: &dyn std::error::Error) -> Option<String> {
    let mut source = e.source()?;
    while let Some(next) = source.source() {
        source = next;
    }
    Some(source.to_string())
}
