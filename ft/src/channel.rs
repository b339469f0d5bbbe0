//! The replication connection as two halves, each sealing or checking
//! every message when the pair has a key (see [`super::auth`]).
//!
//! With a key, a message on the wire is the [`wire`] message followed by
//! its MAC; a message whose MAC does not hold ends the connection (the
//! secondary reconnects and resumes), it is never acted on.

use std::io::{self, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tracing::warn;

use super::admission::{DeadlineReader, HANDSHAKE_DEADLINE, MAX_PRE_AUTH_MESSAGE};
use super::auth::{self, Psk, CLIENT_TO_SERVER, SERVER_TO_CLIENT};
use super::seal::FrameSeal;
use super::wire::{self, Message};

/// The sending half of a connection.
pub struct FrameSender {
    stream: TcpStream,
    mac: Option<FrameSeal>,
}

impl FrameSender {
    /// Sends one message (sealed when the channel is authenticated).
    pub fn send(&mut self, generation: u64, m: &Message) -> io::Result<()> {
        let mut bytes = wire::encode(generation, m)?;
        if let Some(mac) = &mut self.mac {
            mac.seal(&mut bytes, wire::HEAD_LEN);
        }
        // One write per message: a heartbeat never interleaves with another
        // thread's message. A write that fails (or times out) may have sent
        // part of a message: the connection is over (the secondary
        // reconnects and resumes).
        let sent = (&self.stream).write_all(&bytes);
        if sent.is_err() {
            self.shutdown();
        }
        sent
    }

    /// Another handle on the connection, to shut it from a thread that
    /// cannot wait for this sender (which may be blocked in a send).
    pub fn try_clone_socket(&self) -> io::Result<TcpStream> {
        self.stream.try_clone()
    }

    /// Bounds how long a send may block (a peer that stopped reading):
    /// then the send fails and the connection is closed, so no lock is
    /// held behind it for longer.
    pub fn set_write_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.stream.set_write_timeout(limit)
    }

    /// Closes the connection both ways (the peer's reads end).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

/// The receiving half of a connection.
pub struct FrameReceiver {
    stream: TcpStream,
    mac: Option<FrameSeal>,
    peer: String,
}

impl FrameReceiver {
    /// Reads one message; with a key, one whose MAC fails is an error
    /// (`InvalidData`) and is logged.
    pub fn recv(&mut self) -> io::Result<(u64, Message)> {
        self.recv_with_progress(&mut |_, _| {})
    }

    /// [`Self::recv`], reporting a large message's progress as it arrives.
    pub fn recv_with_progress(
        &mut self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> io::Result<(u64, Message)> {
        let mut stream = &self.stream;
        let (head, mut payload) = wire::read_raw(&mut stream, progress)?;
        if let Some(mac) = &mut self.mac {
            let mut tag = vec![0u8; mac.tag_len()];
            io::Read::read_exact(&mut stream, &mut tag)?;
            let seq = mac.seq();
            if !mac.open(&head, &mut payload, &tag) {
                warn!(
                    "message {seq} from {} failed authentication (modified, replayed or not from the peer): connection reset",
                    self.peer
                );
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("message {seq} from {} failed authentication", self.peer),
                ));
            }
        }
        wire::decode(&head, payload)
    }

    /// Closes the connection both ways.
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(Shutdown::Both);
    }

    /// Bounds how long a read waits (None: forever).
    pub fn set_read_timeout(&self, limit: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(limit)
    }
}

/// Both ends, once the handshake is done: no more handshake deadlines, and
/// the session key from both nonces seals what `outgoing` sends.
fn session(
    stream: TcpStream,
    psk: &Psk,
    (client, server): (&auth::Nonce, &auth::Nonce),
    outgoing: u8,
) -> io::Result<(FrameSender, FrameReceiver)> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    let key = psk.session_key(client, server);
    halves(stream, Some((key, psk.encrypts())), outgoing)
}

fn halves(
    stream: TcpStream,
    key: Option<([u8; 32], bool)>,
    outgoing: u8,
) -> io::Result<(FrameSender, FrameReceiver)> {
    let incoming = if outgoing == CLIENT_TO_SERVER {
        SERVER_TO_CLIENT
    } else {
        CLIENT_TO_SERVER
    };
    let peer = peer_name(&stream);
    stream.set_nodelay(true)?;
    let rx = stream.try_clone()?;
    Ok((
        FrameSender {
            stream,
            mac: key.map(|(k, encrypt)| FrameSeal::new(k, outgoing, encrypt)),
        },
        FrameReceiver {
            stream: rx,
            mac: key.map(|(k, encrypt)| FrameSeal::new(k, incoming, encrypt)),
            peer,
        },
    ))
}

/// The connecting side (secondary): proves it holds `psk` and checks that
/// the other side does (no key: an unauthenticated channel, `--insecure`).
pub fn connect(
    stream: TcpStream,
    psk: Option<&Arc<Psk>>,
) -> anyhow::Result<(FrameSender, FrameReceiver)> {
    let peer = peer_name(&stream);
    let Some(psk) = psk else {
        return Ok(halves(stream, None, CLIENT_TO_SERVER)?);
    };
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    stream.set_write_timeout(Some(HANDSHAKE_DEADLINE))?;
    let mut s = &stream;
    let client = auth::nonce()?;
    wire::write(&mut s, 0, &Message::AuthHello { nonce: client })?;
    let (_, reply) =
        read_handshake(&stream, deadline).with_context(|| format!("authenticating with {peer}"))?;
    let (server, proof) = match reply {
        Message::AuthChallenge { nonce, proof } => (nonce, proof),
        Message::Refuse { reason } => bail!("{peer} refused: {reason}"),
        other => bail!(
            "{peer} did not authenticate (sent {}): is it running without a key?",
            other.kind()
        ),
    };
    if !psk.check_server_proof(&client, &server, &proof) {
        let _ = wire::write(
            &mut s,
            0,
            &Message::Refuse {
                reason: "authentication failed: the keys differ".into(),
            },
        );
        bail!(
            "{peer} failed authentication: its key differs from {}",
            psk.path().display()
        );
    }
    wire::write(
        &mut s,
        0,
        &Message::AuthProof {
            proof: psk.client_proof(&client, &server),
        },
    )?;
    Ok(session(stream, psk, (&client, &server), CLIENT_TO_SERVER)?)
}

/// The accepting side (primary): the same handshake from the other end. A
/// peer without the key is refused (and told why) and the refusal logged.
pub fn accept(
    stream: TcpStream,
    psk: Option<&Arc<Psk>>,
) -> anyhow::Result<(FrameSender, FrameReceiver)> {
    let peer = peer_name(&stream);
    let refuse = |s: &TcpStream, reason: &str| {
        let _ = wire::write(
            &mut &*s,
            0,
            &Message::Refuse {
                reason: reason.to_string(),
            },
        );
    };
    let Some(psk) = psk else {
        return Ok(halves(stream, None, SERVER_TO_CLIENT)?);
    };
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    stream.set_write_timeout(Some(HANDSHAKE_DEADLINE))?;
    let mut s = &stream;
    let (_, first) =
        read_handshake(&stream, deadline).with_context(|| format!("authenticating {peer}"))?;
    let Message::AuthHello { nonce: client } = first else {
        refuse(
            &stream,
            "authentication required: give this host the pair's [ft] psk_file",
        );
        bail!(
            "{peer} did not authenticate (sent {}): refused",
            first.kind()
        );
    };
    let server = auth::nonce()?;
    wire::write(
        &mut s,
        0,
        &Message::AuthChallenge {
            nonce: server,
            proof: psk.server_proof(&client, &server),
        },
    )?;
    let (_, reply) =
        read_handshake(&stream, deadline).with_context(|| format!("authenticating {peer}"))?;
    match reply {
        Message::AuthProof { proof } if psk.check_client_proof(&client, &server, &proof) => {}
        Message::Refuse { reason } => bail!("{peer} refused this host's key: {reason}"),
        Message::AuthProof { .. } => {
            refuse(&stream, "authentication failed: the keys differ");
            bail!("{peer} failed authentication (wrong key): refused");
        }
        other => {
            refuse(&stream, "authentication failed: expected an auth proof");
            bail!(
                "{peer} sent {} instead of an auth proof: refused",
                other.kind()
            );
        }
    }
    Ok(session(stream, psk, (&client, &server), SERVER_TO_CLIENT)?)
}

/// One handshake message: small, and by the handshake's total deadline.
fn read_handshake(stream: &TcpStream, deadline: Instant) -> io::Result<(u64, Message)> {
    wire::read_limited(
        &mut DeadlineReader::new(stream, deadline),
        MAX_PRE_AUTH_MESSAGE,
    )
}

/// Connects to `peer` from this host's own address `local` (its `[hosts]`
/// entry), so the peer can check who connects; from any address if `local`
/// is not this host's (behind NAT), said once per call.
pub fn dial(local: IpAddr, peer: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP))?;
    if !local.is_unspecified() && local.is_ipv4() == peer.is_ipv4() {
        if let Err(e) = socket.bind(&SocketAddr::new(local, 0).into()) {
            tracing::info!("connecting to {peer} from any address, not {local}: {e}");
        }
    }
    socket.connect_timeout(&peer.into(), timeout)?;
    Ok(socket.into())
}

/// The peer's address for messages.
fn peer_name(stream: &TcpStream) -> String {
    stream
        .peer_addr()
        .map_or_else(|_| "the peer".to_string(), |a| a.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    type Halves = anyhow::Result<(FrameSender, FrameReceiver)>;

    /// Both ends of one connection, authenticated with the keys given.
    fn pair(client_key: Option<&str>, server_key: Option<&str>) -> (Halves, Halves) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server_key = server_key.map(|k| Arc::new(Psk::from_bytes(k.as_bytes())));
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            accept(s, server_key.as_ref())
        });
        let client_key = client_key.map(|k| Arc::new(Psk::from_bytes(k.as_bytes())));
        let client = connect(TcpStream::connect(addr).unwrap(), client_key.as_ref());
        (client, server.join().unwrap())
    }

    const KEY: &str = "the pair's shared key, 32 bytes!";

    #[test]
    fn same_key_authenticates_and_messages_flow_both_ways() {
        let (c, s) = pair(Some(KEY), Some(KEY));
        let ((mut ctx, mut crx), (mut stx, mut srx)) = (c.unwrap(), s.unwrap());
        ctx.send(3, &Message::Ack(9)).unwrap();
        ctx.send(3, &Message::Heartbeat).unwrap();
        assert_eq!(srx.recv().unwrap(), (3, Message::Ack(9)));
        assert_eq!(srx.recv().unwrap(), (3, Message::Heartbeat));
        stx.send(4, &Message::Log(vec![1, 2, 3])).unwrap();
        assert_eq!(crx.recv().unwrap(), (4, Message::Log(vec![1, 2, 3])));
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides() {
        let (c, s) = pair(Some("a different key, also long"), Some(KEY));
        let (c, s) = (c.err().unwrap(), s.err().unwrap());
        assert!(format!("{c:#}").contains("key differs"), "{c:#}");
        assert!(format!("{s:#}").contains("keys differ"), "{s:#}");
    }

    #[test]
    fn a_keyless_peer_is_refused_with_the_reason() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            accept(s, Some(&Arc::new(Psk::from_bytes(KEY.as_bytes()))))
        });
        let (mut ctx, mut crx) = connect(TcpStream::connect(addr).unwrap(), None).unwrap();
        let hello = Message::Hello {
            min: 1,
            max: 1,
            vm: "vm".into(),
            host: "b".into(),
        };
        ctx.send(0, &hello).unwrap();
        let e = server.join().unwrap().err().unwrap();
        assert!(format!("{e:#}").contains("did not authenticate"), "{e:#}");
        // The keyless side learns why.
        let (_, m) = crx.recv().unwrap();
        assert!(matches!(m, Message::Refuse { reason } if reason.contains("psk_file")));
    }

    #[test]
    fn a_modified_or_replayed_message_is_rejected_not_decoded() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let raw = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (srx_stream, _) = listener.accept().unwrap();
        srx_stream.set_nodelay(true).unwrap();
        let key = [9u8; 32];
        let (_, mut srx) = halves(srx_stream, Some((key, true)), SERVER_TO_CLIENT).unwrap();
        let mut mac = FrameSeal::new(key, CLIENT_TO_SERVER, true);
        let sealed = |mac: &mut FrameSeal, m: &Message| {
            let mut bytes = wire::encode(1, m).unwrap();
            mac.seal(&mut bytes, wire::HEAD_LEN);
            bytes
        };
        let first = sealed(&mut mac, &Message::Ack(7));
        (&raw).write_all(&first).unwrap();
        assert_eq!(srx.recv().unwrap(), (1, Message::Ack(7)));
        // The same message again (a replay): its sequence number is spent.
        (&raw).write_all(&first).unwrap();
        let e = srx.recv().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // A correctly sealed next message with one payload byte flipped.
        let mut flipped = sealed(&mut mac, &Message::Ack(8));
        flipped[wire::HEAD_LEN] ^= 1;
        (&raw).write_all(&flipped).unwrap();
        let e = srx.recv().unwrap_err();
        assert!(e.to_string().contains("failed authentication"), "{e}");
    }
}
