//! What a pair side shows on its control socket: every role's figures
//! (probes read when a client asks), the once-a-second rates, and the
//! socket itself.

use super::*;
use tandem_vmm::VmFigures;

/// Registers this side for fencing and shutdown and serves its control
/// socket with the figures every role has.
pub(super) fn publish(
    params: &PairParams,
    vm: &Vm,
    role: Role,
    generation: u64,
) -> anyhow::Result<()> {
    fence::register(fence::Side {
        board: params.board.clone(),
        stopper: vm.stopper(),
    });
    params.board.set(role, generation, "connected");
    output_probes(params, vm);
    let handle = vm.handle();
    vm_probes(params, vm, &handle);
    rate_probes(params, handle.clone())?;
    params.board.probe(
        "last_diverged_epoch",
        Arc::new(move || handle.last_divergence().unwrap_or(0)),
    );
    params
        .board
        .serve(&params.control, params.access)
        .with_context(|| {
            format!(
                "cannot serve the control socket {}",
                params.control.display()
            )
        })
}

/// Held output and the log the brake holds back. (The figures keep the
/// order `tandem status` has always printed them in.)
fn output_probes(params: &PairParams, vm: &Vm) {
    let board = &params.board;
    if let Some(gate) = vm.gate() {
        let oldest = gate.clone();
        board.probe("held_outputs", Arc::new(move || gate.held() as u64));
        board.probe("oldest_held_ms", Arc::new(move || oldest.oldest_held_ms()));
    }
    // Then, on a primary, how far its secondary's replay has executed and
    // how long it has been behind a shipped watermark (the replay-lag brake).
    let figures: [ThrottleFigure; 4] = [
        ("unacked_bytes", |t| t.unacked()),
        ("secondary_replayed_stop", |t| {
            t.replayed_stop().unwrap_or(0)
        }),
        ("replay_lag_ms", |t| t.replay_lag().as_millis() as u64),
        ("replay_lag_waits", |t| {
            t.replay_waits.load(Ordering::Relaxed)
        }),
    ];
    for (name, figure) in figures {
        let throttle = params.throttle.clone();
        board.probe(name, Arc::new(move || figure(&throttle)));
    }
}

/// A status figure of the primary's brake and how to read it.
type ThrottleFigure = (&'static str, fn(&tandem_vmm::journal::Throttle) -> u64);

/// A status figure's name and how to read it from a snapshot.
type NamedFigure = (&'static str, fn(&VmFigures) -> u64);

/// The VM's own counters: stops, sync points, epochs, divergences,
/// checkpoints, crashes (each read from a snapshot when asked).
fn vm_probes(params: &PairParams, vm: &Vm, handle: &VmHandle) {
    let board = &params.board;
    let causes = vm.cause_queue();
    board.probe("inputs_dropped", Arc::new(move || causes.dropped()));
    let figures: [NamedFigure; 24] = [
        ("stops", |f| f.stops),
        ("sync_points", |f| f.sync_points),
        ("epochs", |f| f.epochs),
        ("epochs_verified", |f| f.epochs_verified),
        ("epochs_transferred", |f| f.epochs_transferred),
        ("divergences", |f| f.divergences),
        ("checkpoints", |f| f.checkpoints),
        ("guest_rollbacks", |f| f.guest_rollbacks),
        ("guest_reboots", |f| f.guest_reboots),
        ("guest_crashes", |f| f.guest_crashes),
        ("positioned_stops", |f| f.positioned_stops),
        ("sync_points_unpositioned", |f| f.sync_points_unpositioned),
        ("sync_points_interval", |f| f.sync_points_interval),
        ("sync_points_requested", |f| f.sync_points_requested),
        ("sync_points_full", |f| f.sync_points_full),
        ("sync_points_catch_up", |f| f.sync_points_catch_up),
        ("irq_at_own_exits", |f| f.irq_at_own_exits),
        ("landing_p50_us", |f| f.landing_p50_us),
        ("landing_p99_us", |f| f.landing_p99_us),
        ("vcpu_ms_guest", |f| f.vcpu_ms_guest),
        ("vcpu_ms_epoch_ends", |f| f.vcpu_ms_epoch_ends),
        ("vcpu_ms_sync_points", |f| f.vcpu_ms_sync_points),
        ("vcpu_ms_halted", |f| f.vcpu_ms_halted),
        ("vcpu_ms_leaving", |f| f.vcpu_ms_leaving),
    ];
    for (name, figure) in figures {
        let h = handle.clone();
        board.probe(name, Arc::new(move || figure(&h.figures())));
    }
    let h = handle.clone();
    board.probe("at_stop", Arc::new(move || h.current_stop()));
    let device_model = u64::from(vm.identity().device_model_version);
    board.probe("device_model", Arc::new(move || device_model));
    let shipped = params.throttle.clone();
    board.probe(
        "log_bytes_shipped",
        Arc::new(move || shipped.shipped_bytes()),
    );
}

/// Rates over the last second (log kbit/s, sync points/s), from a sampler
/// thread: a probe answers many clients, and deltas between queries would
/// depend on who asked. Every 10 s the status also goes out as a tracing
/// event (`TANDEM_LOG=debug`), for log collectors.
fn rate_probes(params: &PairParams, vm: VmHandle) -> anyhow::Result<()> {
    let log_kbit_s = Arc::new(AtomicU64::new(0));
    let sync_points_per_s = Arc::new(AtomicU64::new(0));
    let shipped = params.throttle.clone();
    let (kbit, syncs) = (log_kbit_s.clone(), sync_points_per_s.clone());
    let board = params.board.clone();
    let sample = move || (shipped.shipped_bytes(), vm.figures().sync_points);
    std::thread::Builder::new()
        .name("tandem-rates".into())
        .spawn(move || {
            let mut seconds = 0u64;
            let mut last = sample();
            loop {
                std::thread::sleep(Duration::from_secs(1));
                let now = sample();
                kbit.store(now.0.saturating_sub(last.0) * 8 / 1000, Ordering::Relaxed);
                syncs.store(now.1.saturating_sub(last.1), Ordering::Relaxed);
                seconds += 1;
                if seconds % 10 == 0 {
                    tracing::debug!(target: "tandem::status", status = %board.render());
                }
                last = now;
            }
        })?;
    params.board.probe(
        "log_kbit_s",
        Arc::new(move || log_kbit_s.load(Ordering::Relaxed)),
    );
    params.board.probe(
        "sync_points_per_s",
        Arc::new(move || sync_points_per_s.load(Ordering::Relaxed)),
    );
    Ok(())
}
