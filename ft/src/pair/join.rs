//! A joining secondary's copy of the running VM: its mirrored disks
//! (copy, then changed chunks) and guest memory in pre-copy rounds while
//! the guest runs, then the full sync point it starts from.

use super::*;

impl Replicator {
    /// Mirrored storage: reads the secondary's replica state and decides
    /// what to copy (refusing the secondary when the replicas cannot pair).
    pub(super) fn disk_handshake(
        &self,
        tx: &mut FrameSender,
        input: &mut FrameReceiver,
        fresh: bool,
    ) -> anyhow::Result<mirror::Plan> {
        let generation = self.generation.load(Ordering::Acquire);
        input.set_read_timeout(Some(Duration::from_secs(10)))?;
        let msg = input.recv();
        input.set_read_timeout(None)?;
        let mut refuse = |reason: String| {
            let _ = tx.send(
                generation,
                &Message::Refuse {
                    reason: reason.clone(),
                },
            );
            anyhow!(reason)
        };
        let theirs = match msg {
            Ok((_, Message::DiskState(p))) => mirror::decode_state(&p).map_err(&mut refuse)?,
            Ok(_) => return Err(refuse(
                "this primary mirrors its disks (storage = \"mirrored\") and the secondary does not: give both hosts the same [ft] storage".into(),
            )),
            Err(e) => bail!(
                "the secondary did not describe its replicas ({e}): is it configured with storage = \"mirrored\"?"
            ),
        };
        mirror::plan(&self.replicas, &theirs, fresh).map_err(refuse)
    }

    /// Sends the chunks `lists` (per disk) of this side's replicas through
    /// `send`; returns (chunks, bytes).
    pub(super) fn send_disk_round(
        &self,
        sync_id: u64,
        lists: &[Vec<u64>],
        send: &mut dyn FnMut(Message) -> anyhow::Result<()>,
    ) -> anyhow::Result<(u64, u64)> {
        let (mut chunks, mut bytes) = (0, 0);
        for (disk, (replica, list)) in self.replicas.iter().zip(lists).enumerate() {
            bytes += mirror::send_chunks(replica, disk as u8, sync_id, list, send)?;
            chunks += list.len() as u64;
        }
        Ok((chunks, bytes))
    }

    /// Sends to the joining secondary over the current link.
    pub(super) fn send_joining(&self, message: Message) -> anyhow::Result<()> {
        let generation = self.generation.load(Ordering::Acquire);
        match &mut *self.link() {
            Link::Joining(tx) => Ok(tx.send(generation, &message)?),
            _ => bail!("the secondary is gone"),
        }
    }

    /// The end of a joining secondary's disk copy: holds new writes, sends
    /// what was written during the copy, then `DiskDone`. Writes stay held
    /// until the caller drops the returned guard (after the full sync
    /// point the joiner starts from).
    pub(super) fn finish_disk_copy(&self, plan: &mirror::Plan) -> anyhow::Result<ResumeWrites<'_>> {
        for r in &self.replicas {
            r.pause_for_snapshot();
        }
        let guard = ResumeWrites(&self.replicas);
        let lists: Vec<Vec<u64>> = self.replicas.iter().map(|r| r.take_tracked()).collect();
        let (chunks, bytes) =
            self.send_disk_round(plan.sync_id, &lists, &mut |m| self.send_joining(m))?;
        let generation = self.generation.load(Ordering::Acquire);
        self.send_joining(Message::DiskDone(mirror::encode_done(
            plan.sync_id,
            generation,
            &self.replicas,
        )))?;
        *self.disk_sync.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((plan.sync_id, plan.peers.clone()));
        info!(
            "disks: {chunks} chunks ({} KiB) written during the copy sent again",
            bytes >> 10
        );
        Ok(guard)
    }

    /// The secondary has the replicas of sync `id`: keep in the bitmaps
    /// only what was written since.
    pub(super) fn finish_disk_sync(&self, id: u64) {
        let pending = self
            .disk_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match pending {
            Some((sync_id, peers)) if sync_id == id => {
                for (r, peer) in self.replicas.iter().zip(peers) {
                    if let Err(e) = r.finish_sync_as_source(peer, id) {
                        warn!(
                            "replica {}: cannot record the sync: {e}",
                            r.path().display()
                        );
                    }
                }
                eprintln!("tandem: disks: the secondary's replicas are in sync");
            }
            other => {
                warn!("the secondary confirmed disk sync {id:#x}, which is not the one pending");
                *self.disk_sync.lock().unwrap_or_else(|p| p.into_inner()) = other;
            }
        }
    }

    /// Asks the vCPU for its next stop: a pre-copy round, or (`full`) the
    /// full sync point a joiner starts from.
    pub(super) fn ask_vcpu(&self, full: bool) {
        if full {
            self.vm.request_full_sync();
        }
        self.vm.kick();
        self.causes.wake();
    }

    /// Pre-copy to a joining secondary: round 0 sends every non-zero page,
    /// each later round the pages written during the previous one, while
    /// the guest runs; when a round is small (or stops shrinking) the
    /// joiner is started from a full sync point carrying only the pages
    /// written since the last round.
    pub(super) fn precopy(self: &Arc<Self>) {
        let started = Instant::now();
        // Mirrored storage: the disks go first (round 0: what may differ),
        // then memory; the end of the copy is at the full sync point.
        let disk_plan = self
            .disk_plan
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(plan) = &disk_plan {
            match self.send_disk_round(plan.sync_id, &plan.chunks, &mut |m| self.send_joining(m)) {
                Ok((chunks, bytes)) => eprintln!(
                    "tandem: disks: {chunks} chunks ({} MiB) copied to the joining secondary in {} ms",
                    bytes >> 20,
                    started.elapsed().as_millis()
                ),
                Err(e) => {
                    for r in &self.replicas {
                        r.resume_writes();
                    }
                    warn!("disk copy: {e:#}; the joining secondary is dropped");
                    return;
                }
            }
        }
        let finish_disks = || -> Option<ResumeWrites<'_>> {
            let plan = disk_plan.as_ref()?;
            match self.finish_disk_copy(plan) {
                Ok(guard) => Some(guard),
                Err(e) => {
                    warn!("disk copy: {e:#}; the joining secondary is dropped");
                    None
                }
            }
        };
        let mut previous = u64::MAX;
        for round in 0..PRECOPY_MAX_ROUNDS {
            self.precopy.request_round(round == 0);
            self.ask_vcpu(false);
            let Some(gfns) = self.precopy.wait_round(Duration::from_secs(10)) else {
                warn!("pre-copy: the vCPU did not answer round {round}; copying all of memory at the stop");
                let held = finish_disks();
                self.ask_vcpu(true);
                return self.release_writes_after_full_sync(held);
            };
            let pages = gfns.len() as u64;
            match self.send_round(round, &gfns) {
                Ok((sent, bytes)) => info!(
                    "pre-copy round {round}: {sent} of {pages} pages ({} KiB) at {} ms",
                    bytes >> 10,
                    started.elapsed().as_millis()
                ),
                Err(e) => {
                    warn!("pre-copy round {round}: {e:#}; the joining secondary is dropped");
                    // A disk copy under way stops tracking writes for it.
                    for r in &self.replicas {
                        r.abort_sync();
                    }
                    return;
                }
            }
            if round > 0 && (pages <= PRECOPY_SMALL_ROUND || pages >= previous) {
                break;
            }
            previous = pages;
        }
        let held = finish_disks();
        if disk_plan.is_some() && held.is_none() {
            return;
        }
        self.precopy.finish_with_delta();
        self.ask_vcpu(true);
        self.release_writes_after_full_sync(held);
    }

    /// Disk writes held for a joiner's copy go on once the vCPU has taken
    /// the full sync point it starts from (or the joiner is gone).
    pub(super) fn release_writes_after_full_sync(&self, held: Option<ResumeWrites<'_>>) {
        if held.is_none() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.vm.full_sync_pending() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
    }

    /// Reads the pages `gfns` of guest memory and sends them to the joining
    /// secondary in messages of at most [`PRECOPY_CHUNK`] pages; round 0
    /// leaves out zero pages. Returns (pages sent, bytes sent).
    pub(super) fn send_round(&self, round: u32, gfns: &[u64]) -> anyhow::Result<(u64, u64)> {
        let total = gfns.len() as u64;
        let mut page = vec![0u8; tandem_replay::log::PAGE_SIZE];
        let (mut sent, mut bytes, mut scanned) = (0u64, 0u64, 0u64);
        // An empty round still sends one message: the joiner sees it end.
        let chunks: Vec<&[u64]> = if gfns.is_empty() {
            vec![&[]]
        } else {
            gfns.chunks(PRECOPY_CHUNK).collect()
        };
        for chunk in chunks {
            let mut pages = Vec::with_capacity(chunk.len() * wire::PAGE_ENTRY);
            for &gfn in chunk {
                self.memory
                    .read_page(gfn, &mut page)
                    .map_err(|e| anyhow!("reading guest memory: {e}"))?;
                if round == 0 && page.iter().all(|&b| b == 0) {
                    continue;
                }
                pages.extend_from_slice(&gfn.to_le_bytes());
                pages.extend_from_slice(&page);
                sent += 1;
            }
            scanned += chunk.len() as u64;
            bytes += pages.len() as u64;
            self.send_joining(Message::Memory {
                round,
                total,
                scanned,
                pages,
            })?;
        }
        Ok((sent, bytes))
    }
}

/// Pre-copy gives up converging after this many rounds.
pub(super) const PRECOPY_MAX_ROUNDS: u32 = 8;

/// A round this small (pages) is the last before the stop.
pub(super) const PRECOPY_SMALL_ROUND: u64 = 256;

/// Pages per pre-copy message (8 MiB).
pub(super) const PRECOPY_CHUNK: usize = 2048;
