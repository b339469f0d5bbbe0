//! `run_primary`: the primary side from its first generation to its end.

use super::*;

/// Runs the primary: wins a generation, waits for the secondary (unless
/// `--alone`), runs the guest shipping its log, holds output until acked,
/// carries on alone (after winning the next generation) if the secondary
/// goes away, and takes a new secondary at any time (re-protection: it
/// joins at a full sync point).
pub fn run_primary(
    params: PairParams,
    vm_config: impl FnOnce(RunMode) -> VmConfig,
) -> anyhow::Result<Ended> {
    let generation = claim_first_generation(&params)?;
    let (sink, frames_rx, vm_slot) = ShipSink::new(&params);
    let options = pair_record_options(&params);
    let greeted = admit(
        listen(&params)?,
        params.psk.clone(),
        params.expected_peer_ip(),
    )?;
    let first = if params.alone {
        None
    } else {
        Some(wait_for_first_secondary(&params, &greeted)?)
    };
    let vm = Vm::new(vm_config(RunMode::Primary {
        options,
        sink: Box::new(sink),
    }))?;
    let gate = vm
        .gate()
        .ok_or_else(|| anyhow!("primary VM has no output gate"))?;
    if let Some((socket, path)) = &params.console {
        socket.set_input(vm.cause_queue());
        socket
            .serve(path, params.access)
            .with_context(|| format!("cannot serve the console on {}", path.display()))?;
    }
    // The vCPU publishes the stop of each full sync point before it logs
    // it; the sink tags that record for the ship thread.
    let _ = vm_slot.set(vm.handle());
    let replicator = Replicator::new(params, &vm, generation)?;
    publish(&replicator.params, &vm, Role::Primary, generation)?;
    replicator.offer_switchover();
    replicator.add_link_probes();
    match first {
        Some(first) => replicator.attach_first(first),
        None => replicator.run_alone(&gate, generation),
    }
    replicator.start_on(greeted, Some(frames_rx))?;
    let report = vm.run();
    info!(
        "replication: {} log bytes shipped",
        replicator.params.throttle.shipped_bytes()
    );
    replicator.finish(&gate, report)
}

/// Wins this side's first generation at the arbiter, or says which host
/// holds the VM instead.
fn claim_first_generation(params: &PairParams) -> anyhow::Result<u64> {
    let current = params.current()?;
    if let Some(holder) = current.holder.as_deref().filter(|h| *h != params.me) {
        bail!(
            "the arbiter shows host {holder} live for {} ({current}); start this host with `tandem pair`",
            params.vm_name
        );
    }
    let Some(generation) = params.claim(current.generation)? else {
        bail!(
            "another side holds the VM {} at the arbiter; start this host with `tandem pair` or as secondary",
            params.vm_name
        );
    };
    info!("primary: generation {generation}");
    params.event(&format!("primary generation={generation}"));
    Ok(generation)
}

/// Waits for a secondary that authenticates (others are refused).
fn wait_for_first_secondary(
    params: &PairParams,
    greeted: &Receiver<Greeted>,
) -> anyhow::Result<Greeted> {
    eprintln!(
        "tandem: primary waiting for the secondary on {}",
        params.listen
    );
    greeted
        .recv()
        .map_err(|_| anyhow!("the accept thread on {} ended", params.listen))
}

impl Replicator {
    /// The link's figures on the control socket: frames not yet acked, how
    /// long the oldest waits, and when the secondary was last heard.
    fn add_link_probes(self: &Arc<Self>) {
        let board = &self.params.board;
        let r = self.clone();
        board.probe("unacked_frames", Arc::new(move || r.lag().0));
        let r = self.clone();
        board.probe("lag_ms", Arc::new(move || r.lag().1));
        let r = self.clone();
        board.probe(
            "last_heartbeat_ms",
            Arc::new(move || millis(r.base).saturating_sub(r.last_heard.load(Ordering::Acquire))),
        );
    }

    /// Attaches the secondary that was waited for before the VM started.
    fn attach_first(self: &Arc<Self>, first: Greeted) {
        let Greeted {
            tx,
            rx,
            first: hello,
            from,
        } = first;
        if let Err(e) = self.attach((tx, rx), from, true, hello) {
            // The secondary gave up on this connection (a handshake
            // timeout on a loaded host) and connects again: it joins the
            // running VM then. Meanwhile this side runs as one that lost
            // its secondary.
            warn!("the first secondary dropped during its handshake: {e:#}");
            self.go_unprotected(&format!("the secondary at {from} dropped"));
        }
    }

    /// `--alone`: output flows unprotected until a secondary joins.
    fn run_alone(&self, gate: &tandem_vmm::backend::gate::GatedOutputs, generation: u64) {
        gate.open();
        self.set_replica_generation(generation);
        self.params.throttle.open();
        self.params
            .board
            .set(Role::Primary, generation, "none (alone)");
    }

    /// After the VM stopped: how this side ended. A fenced side releases
    /// nothing more; otherwise the guest's last output, still held until
    /// the secondary has it (it acks the End record), is waited for within
    /// the failover timeout and never dropped.
    fn finish(
        &self,
        gate: &tandem_vmm::backend::gate::GatedOutputs,
        report: Result<tandem_vmm::RunReport, tandem_vmm::VmError>,
    ) -> anyhow::Result<Ended> {
        if let Some(reason) = fence::fenced() {
            return Ok(Ended::Fenced(reason));
        }
        if self.stepped_down.load(Ordering::Acquire) {
            gate.flush();
            return Ok(Ended::SteppedDown);
        }
        let deadline = Instant::now() + self.params.failover_timeout;
        while gate.held() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if gate.held() > 0 {
            // Without an ack in time, release it the way a lost secondary
            // does (after winning the arbitration).
            self.go_unprotected("no ack for the guest's last output");
        }
        // Released console bytes pass through a writer thread: let them out
        // before the process exits.
        gate.flush();
        Ok(Ended::Vm(Box::new(report)))
    }
}
