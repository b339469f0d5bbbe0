//! A live copy of the keys under one etcd prefix, kept by a watch.
//!
//! A task on the client's runtime lists the prefix, then watches it from
//! the listed revision on; every event updates the copy and wakes whoever
//! waits for a change. When the watch breaks (a member lost, the
//! connection reset) or etcd compacted the revision it would resume from,
//! the task lists again and watches anew: nothing is missed, and a reader
//! never sees a half-applied event.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{EventType, GetOptions, WatchOptions};

use super::client::{EtcdClient, Members};

/// The keys under a prefix: (value, modification revision) by the key's
/// part after the prefix.
type Keys = BTreeMap<String, (String, i64)>;

#[derive(Default)]
struct State {
    keys: Keys,
    /// Moves on every change (and every re-list).
    version: u64,
    /// Whether the copy is current (listed, and the watch running).
    current: bool,
    /// Why it is not, last time it failed.
    failure: Option<String>,
    /// The prefix followed (for messages).
    prefix: String,
}

/// A live copy of the keys under a prefix.
#[derive(Clone)]
pub struct PrefixView {
    state: Arc<(Mutex<State>, Condvar)>,
}

/// How long a broken watch waits before it lists again.
const RETRY: Duration = Duration::from_millis(200);

impl PrefixView {
    /// Starts following `rel_prefix` (relative to the client's prefix).
    /// Returns once the first listing is in, or after the client's
    /// timeout (the view then fills as soon as etcd answers).
    pub fn follow(client: &EtcdClient, rel_prefix: &str, timeout: Duration) -> Self {
        Self::start(
            client,
            rel_prefix,
            timeout,
            |view, members, full| async move {
                loop {
                    let why = match view.list_and_watch(&members, &full).await {
                        Err(e) => e,
                        Ok(()) => "the watch ended".into(),
                    };
                    tracing::debug!("etcd watch of {full}: {why}; listing again");
                    view.fail(why);
                    tokio::time::sleep(RETRY).await;
                }
            },
        )
    }

    /// Like [`Self::follow`], but lists the prefix every `interval` instead
    /// of watching it: how nodes followed the cluster before watches, kept
    /// so `make bench` can compare the two in one run.
    pub fn poll(
        client: &EtcdClient,
        rel_prefix: &str,
        interval: Duration,
        timeout: Duration,
    ) -> Self {
        Self::start(
            client,
            rel_prefix,
            timeout,
            move |view, members, full| async move {
                loop {
                    match list(&members, &full).await {
                        Ok(keys) => view.replace_if_changed(keys),
                        Err(e) => {
                            tracing::debug!("etcd listing of {full}: {e}");
                            view.fail(e);
                        }
                    }
                    tokio::time::sleep(interval).await;
                }
            },
        )
    }

    /// A view of `rel_prefix` filled by `keep` (a task on the client's
    /// runtime, given the view, the members and the full prefix); returns
    /// once the first listing is in, or after `timeout`.
    fn start<F, Fut>(client: &EtcdClient, rel_prefix: &str, timeout: Duration, keep: F) -> Self
    where
        F: FnOnce(PrefixView, Arc<Members>, String) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let view = Self {
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
        };
        let full = client.key(rel_prefix);
        view.lock().prefix = full.clone();
        client.spawn(keep(view.clone(), client.members(), full));
        let _ = view.wait_current(timeout);
        view
    }

    /// [`Self::replace`], unless the keys are what the copy holds already.
    fn replace_if_changed(&self, keys: Keys) {
        {
            let state = self.lock();
            if state.current && state.keys == keys {
                return;
            }
        }
        self.replace(keys);
    }

    /// Lists the prefix on a member that answers, then applies watch
    /// events from the listed revision on until the watch ends.
    async fn list_and_watch(&self, members: &Members, full: &str) -> Result<(), String> {
        let (keys, mut stream) = members
            .run(|mut etcd| async move {
                let listed = etcd
                    .get(full, Some(GetOptions::new().with_prefix()))
                    .await?;
                let revision = listed.header().map_or(0, |h| h.revision());
                let keys = keys_of(&listed, full);
                let stream = etcd
                    .watch(
                        full,
                        Some(
                            WatchOptions::new()
                                .with_prefix()
                                .with_start_revision(revision + 1),
                        ),
                    )
                    .await?;
                Ok((keys, stream))
            })
            .await?;
        self.replace(keys);
        while let Some(reply) = stream.message().await.map_err(|e| e.to_string())? {
            if reply.canceled() || reply.compact_revision() > 0 {
                return Err(format!(
                    "watch cancelled ({}; compacted at {})",
                    reply.cancel_reason(),
                    reply.compact_revision()
                ));
            }
            if reply.events().is_empty() {
                continue;
            }
            let (lock, changed) = &*self.state;
            let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
            for event in reply.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                let Some(rest) = key.strip_prefix(full) else {
                    continue;
                };
                match event.event_type() {
                    EventType::Put => {
                        state.keys.insert(
                            rest.to_string(),
                            (
                                String::from_utf8_lossy(kv.value()).into_owned(),
                                kv.mod_revision(),
                            ),
                        );
                    }
                    EventType::Delete => {
                        state.keys.remove(rest);
                    }
                }
            }
            state.version += 1;
            changed.notify_all();
        }
        Err("the watch stream ended".into())
    }

    fn replace(&self, keys: Keys) {
        let mut state = self.lock();
        state.keys = keys;
        state.current = true;
        state.failure = None;
        state.version += 1;
        self.state.1.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The copy is not current any more, and why.
    fn fail(&self, why: String) {
        let mut state = self.lock();
        state.current = false;
        state.failure = Some(why);
        self.state.1.notify_all();
    }

    /// Why the copy is not current, for an error.
    fn not_current(state: &State) -> String {
        format!(
            "cannot follow {} in etcd: {}",
            state.prefix,
            state.failure.as_deref().unwrap_or("still listing it")
        )
    }

    /// Waits until the copy is current; false after `timeout`.
    pub fn wait_current(&self, timeout: Duration) -> bool {
        let (lock, changed) = &*self.state;
        let state = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (state, _) = changed
            .wait_timeout_while(state, timeout, |s| !s.current)
            .unwrap_or_else(|p| p.into_inner());
        state.current
    }

    /// The copy's version now (for [`Self::wait_change`]).
    pub fn version(&self) -> u64 {
        self.state
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .version
    }

    /// Waits until the copy moves past `version`, or `timeout` passes.
    pub fn wait_change(&self, version: u64, timeout: Duration) {
        let (lock, changed) = &*self.state;
        let deadline = Instant::now() + timeout;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        while state.version == version {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            state = changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// A key's (value, modification revision), if the copy is current;
    /// why not when it is not (etcd unreachable, the watch re-listing).
    pub fn get(&self, rel: &str) -> Result<Option<(String, i64)>, String> {
        let state = self.lock();
        if !state.current {
            return Err(Self::not_current(&state));
        }
        Ok(state.keys.get(rel).cloned())
    }

    /// Every (key after `rel_prefix`, value) under a sub-prefix, if the
    /// copy is current.
    pub fn list(&self, rel_prefix: &str) -> Result<Vec<(String, String)>, String> {
        let state = self.lock();
        if !state.current {
            return Err(Self::not_current(&state));
        }
        Ok(state
            .keys
            .iter()
            .filter_map(|(k, (v, _))| Some((k.strip_prefix(rel_prefix)?.to_string(), v.clone())))
            .collect())
    }
}

/// The keys of a listing under `full`, by their part after it.
fn keys_of(listed: &etcd_client::GetResponse, full: &str) -> Keys {
    let mut keys = Keys::new();
    for kv in listed.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        if let Some(rest) = key.strip_prefix(full) {
            keys.insert(
                rest.to_string(),
                (
                    String::from_utf8_lossy(kv.value()).into_owned(),
                    kv.mod_revision(),
                ),
            );
        }
    }
    keys
}

/// Lists the keys under `full` on a member that answers.
async fn list(members: &Members, full: &str) -> Result<Keys, String> {
    members
        .run(|mut etcd| async move {
            let listed = etcd
                .get(full, Some(GetOptions::new().with_prefix()))
                .await?;
            Ok(keys_of(&listed, full))
        })
        .await
}
