//! The primary takes secondaries: connections are admitted and
//! authenticated off the accept path ([`admit`]), then taken one at a time
//! ([`Replicator::accept`]): a joiner ([`Replicator::attach`]) or a
//! secondary that reconnects and resumes ([`Replicator::resume`]).

use super::*;

impl Replicator {
    /// Takes secondaries for as long as the primary runs (re-protection),
    /// one at a time, as their handshakes complete.
    pub(super) fn accept(self: &Arc<Self>, greeted: Receiver<Greeted>) {
        for Greeted {
            tx,
            rx,
            first,
            from: addr,
        } in greeted
        {
            let mut tx = tx;
            if let Message::Resume { vm, frames } = first {
                if vm != self.params.vm_name {
                    warn!("secondary {addr} resumes {vm}, not {}", self.params.vm_name);
                    continue;
                }
                if let Err(e) = self.resume(tx, rx, frames) {
                    warn!("secondary {addr}: {e:#}");
                }
                continue;
            }
            if !matches!(*self.link(), Link::Detached) {
                let generation = self.generation.load(Ordering::Acquire);
                let _ = tx.send(
                    generation,
                    &Message::Refuse {
                        reason: "this primary already has a secondary".into(),
                    },
                );
                continue;
            }
            if let Err(e) = self.attach((tx, rx), addr, false, first) {
                warn!("secondary {addr}: {e:#}");
            }
        }
    }

    /// Takes a secondary: handshake, then it joins at the next full sync
    /// point (the very first one at stop 0 follows from the start).
    pub(super) fn attach(
        self: &Arc<Self>,
        (mut tx, mut input): (FrameSender, FrameReceiver),
        from: SocketAddr,
        fresh: bool,
        hello: Message,
    ) -> anyhow::Result<()> {
        let generation = self.generation.load(Ordering::Acquire);
        let p = &self.params;
        handshake_as_primary(&mut tx, generation, (&p.vm_name, &p.peer_name), hello)
            .with_context(|| format!("handshake with the secondary at {from}"))?;
        if !self.replicas.is_empty() {
            let plan = self
                .disk_handshake(&mut tx, &mut input, fresh)
                .with_context(|| format!("mirrored disks of the secondary at {from}"))?;
            self.set_replica_generation(generation);
            if fresh {
                // The guest has not run: copy now; the snapshot is now.
                let started = Instant::now();
                let (chunks, bytes) =
                    self.send_disk_round(plan.sync_id, &plan.chunks, &mut |m| {
                        Ok(tx.send(generation, &m)?)
                    })?;
                for r in &self.replicas {
                    r.pause_for_snapshot();
                    r.resume_writes();
                }
                tx.send(
                    generation,
                    &Message::DiskDone(mirror::encode_done(
                        plan.sync_id,
                        generation,
                        &self.replicas,
                    )),
                )?;
                *self.disk_sync.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((plan.sync_id, plan.peers));
                eprintln!(
                    "tandem: disks: {chunks} chunks ({} MiB) copied to the secondary in {} ms",
                    bytes >> 20,
                    started.elapsed().as_millis()
                );
            } else {
                for r in &self.replicas {
                    r.start_tracking();
                }
                *self.disk_plan.lock().unwrap_or_else(|p| p.into_inner()) = Some(plan);
            }
        }
        self.sent.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.next_index.store(0, Ordering::Release);
        if fresh {
            // The first secondary follows from stop 0: the header now.
            tx.send(generation, &Message::Log(self.header.clone()))?;
        }
        self.heard();
        self.renew_lease(millis(self.base));
        tx.set_write_timeout(Some(self.params.failover_timeout))?;
        self.set_socket(&tx);
        *self.link() = if fresh {
            Link::Attached(tx)
        } else {
            Link::Joining(tx)
        };
        self.attached.store(fresh, Ordering::Release);
        self.params.board.set(
            Role::Primary,
            generation,
            if fresh { "attached" } else { "joining" },
        );
        let me = self.clone();
        std::thread::Builder::new()
            .name("tandem-acks".into())
            .spawn(move || me.read_acks(input))?;
        if !fresh {
            // Memory goes over in rounds while the guest runs; then the
            // secondary starts from a full sync point that carries only
            // what changed since.
            let me = self.clone();
            std::thread::Builder::new()
                .name("tandem-precopy".into())
                .spawn(move || me.precopy())?;
        }
        info!("secondary connected from {from}");
        Ok(())
    }

    /// A secondary whose connection broke comes back: resend what it lacks
    /// on the new connection and carry on — not a failover.
    pub(super) fn resume(
        self: &Arc<Self>,
        mut tx: FrameSender,
        input: FrameReceiver,
        frames: u64,
    ) -> anyhow::Result<()> {
        tx.set_write_timeout(Some(self.params.failover_timeout))?;
        let generation = self.generation.load(Ordering::Acquire);
        let mut link = self.link();
        if !matches!(*link, Link::Attached(_)) {
            tx.send(
                generation,
                &Message::Refuse {
                    reason: "nothing to resume".into(),
                },
            )?;
            bail!("a resume with no secondary attached");
        }
        let sent = self.sent.lock().unwrap_or_else(|p| p.into_inner());
        let next = self.next_index.load(Ordering::Acquire);
        let oldest = sent.front().map_or(next, |(i, _, _, _)| *i);
        if frames < oldest || frames > next {
            tx.send(
                generation,
                &Message::Refuse {
                    reason: format!(
                        "cannot resume from frame {frames}: this primary keeps {oldest}..{next}"
                    ),
                },
            )?;
            bail!("resume from frame {frames} impossible ({oldest}..{next} kept)");
        }
        tx.send(
            generation,
            &Message::Welcome {
                version: PROTOCOL_MAX,
            },
        )?;
        let mut resent = 0;
        for (_, _, _, bytes) in sent.iter().filter(|(i, _, _, _)| *i >= frames) {
            tx.send(generation, &Message::Log(bytes.clone()))?;
            resent += 1;
        }
        drop(sent);
        self.set_socket(&tx);
        *link = Link::Attached(tx);
        self.attached.store(true, Ordering::Release);
        drop(link);
        self.heard();
        self.renew_lease(millis(self.base));
        eprintln!("tandem: secondary reconnected; resumed from frame {frames} ({resent} frames sent again)");
        self.params
            .event(&format!("secondary-resumed frame={frames}"));
        let me = self.clone();
        std::thread::Builder::new()
            .name("tandem-acks".into())
            .spawn(move || me.read_acks(input))?;
        Ok(())
    }
}

/// Authenticates a new connection (when the pair has a key) and reads
/// its first message: the secondary's hello or resume.
/// A connection that authenticated and said what it wants.
pub(super) struct Greeted {
    pub(super) tx: FrameSender,
    pub(super) rx: FrameReceiver,
    /// Its first message (hello or resume).
    pub(super) first: Message,
    pub(super) from: SocketAddr,
}

/// Accepts connections on `listener` for good: each handshake runs on a
/// thread of its own, by a total deadline, within the admission limits, so
/// no peer that never finishes one keeps a secondary out. What completes
/// comes out of the returned channel, in order of completion.
///
/// With `peer_ip`, a connection from any other address is refused before
/// its handshake (it is not the pair's other host), and told why.
pub(super) fn admit(
    listener: TcpListener,
    psk: Option<Arc<Psk>>,
    peer_ip: Option<std::net::IpAddr>,
) -> std::io::Result<Receiver<Greeted>> {
    let (greeted_tx, greeted) = channel::<Greeted>();
    let admission = Admission::new(admission::DEFAULT_LIMITS);
    let refusals = admission::RefusalLog::default();
    std::thread::Builder::new()
        .name("tandem-accept".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and the like: keep serving.
                        warn!("accepting a secondary: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                let Ok(from) = stream.peer_addr() else {
                    continue;
                };
                if let Some(peer_ip) = peer_ip.filter(|ip| *ip != from.ip()) {
                    let reason = format!(
                        "a connection from {} refused: the peer host's address is {peer_ip} (behind NAT, set [ft] verify_peer_address = false)",
                        from.ip()
                    );
                    if let Some(n) = refusals.note() {
                        warn!("{reason} ({n} refused since the last such line)");
                    }
                    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
                    let _ = wire::write(&mut &stream, 0, &Message::Refuse { reason });
                    continue;
                }
                let ticket = match admission.admit(from.ip()) {
                    Ok(t) => t,
                    Err(refused) => {
                        if let Some(n) = refusals.note() {
                            warn!("secondary {from}: not admitted: {refused} ({n} refused since the last such line)");
                        }
                        continue;
                    }
                };
                let (psk, greeted_tx) = (psk.clone(), greeted_tx.clone());
                let spawned = std::thread::Builder::new()
                    .name("tandem-greet".into())
                    .spawn(move || {
                        let result = greet(stream, psk.as_ref());
                        drop(ticket);
                        match result {
                            Ok((tx, rx, first)) => {
                                let _ = greeted_tx.send(Greeted {
                                    tx,
                                    rx,
                                    first,
                                    from,
                                });
                            }
                            Err(e) => warn!("secondary {from}: {e:#}"),
                        }
                    });
                if let Err(e) = spawned {
                    warn!("secondary {from}: cannot start its handshake: {e}");
                }
            }
        })?;
    Ok(greeted)
}

pub(super) fn greet(
    stream: TcpStream,
    psk: Option<&Arc<Psk>>,
) -> anyhow::Result<(FrameSender, FrameReceiver, Message)> {
    let (mut tx, mut rx) = channel::accept(stream, psk)?;
    rx.set_read_timeout(Some(admission::HANDSHAKE_DEADLINE))?;
    let (_, first) = rx.recv().context("no hello")?;
    rx.set_read_timeout(None)?;
    if let Message::AuthHello { .. } = first {
        let _ = tx.send(
            0,
            &Message::Refuse {
                reason: "this host has no key (started with --insecure); give both hosts the same [ft] psk_file".into(),
            },
        );
        bail!("the peer authenticates but this host has no key (--insecure): refused");
    }
    Ok((tx, rx, first))
}

/// The socket a secondary connects to.
pub(super) fn listen(params: &PairParams) -> anyhow::Result<TcpListener> {
    TcpListener::bind(params.listen).with_context(|| format!("cannot listen on {}", params.listen))
}

/// Checks a secondary's hello: the VM this primary runs, the host that is
/// this primary's peer (`(vm, peer_host)`), a protocol both speak.
pub(super) fn handshake_as_primary(
    tx: &mut FrameSender,
    generation: u64,
    (vm, peer_host): (&str, &str),
    hello: Message,
) -> anyhow::Result<()> {
    let Message::Hello {
        min,
        max,
        vm: theirs,
        host,
    } = hello
    else {
        bail!("expected a hello, got {hello:?}");
    };
    if host != peer_host {
        let reason = format!(
            "this primary's peer is host {peer_host}, not {}",
            if host.is_empty() {
                "a secondary that names no host"
            } else {
                &host
            }
        );
        tx.send(
            generation,
            &Message::Refuse {
                reason: reason.clone(),
            },
        )?;
        bail!("{reason}: refused");
    }
    if theirs != vm {
        tx.send(
            generation,
            &Message::Refuse {
                reason: format!("this primary runs {vm}, not {theirs}"),
            },
        )?;
        bail!("the secondary follows {theirs}, this primary runs {vm}");
    }
    let Some(version) = wire::negotiate(min, max) else {
        let reason = format!("no common protocol version: secondary speaks {min}–{max}, primary {PROTOCOL_MIN}–{PROTOCOL_MAX}");
        tx.send(
            generation,
            &Message::Refuse {
                reason: reason.clone(),
            },
        )?;
        bail!(reason);
    };
    tx.send(generation, &Message::Welcome { version })?;
    Ok(())
}
