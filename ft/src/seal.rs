//! What protects each message on the replication link after the handshake:
//! encrypted and authenticated (ChaCha20-Poly1305, the default), or only
//! authenticated (HMAC-SHA256, `[ft] encrypt = false`).
//!
//! Either way the key is the connection's own session key, each direction
//! counts its messages, and the count is never sent: it is the AEAD's nonce
//! (direction ‖ sequence number), so a modified message, one replayed from
//! this connection or from an earlier one fails to open. A resume starts a
//! new connection with a new key, so the sequence numbers it sends again
//! never meet the same key twice.
//!
//! The wire header (message type, generation, length) stays readable, for
//! framing; the AEAD authenticates it as associated data.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};

use super::auth::{FrameMac, MAC_LEN};

/// Length of the AEAD's tag.
pub const AEAD_TAG_LEN: usize = 16;

/// One direction of a session.
pub enum FrameSeal {
    /// Authenticated only.
    Mac(FrameMac),
    /// Encrypted and authenticated.
    Aead {
        cipher: Box<ChaCha20Poly1305>,
        direction: u8,
        seq: u64,
    },
}

impl FrameSeal {
    /// Messages going `direction` under the session key `key`.
    pub fn new(key: [u8; 32], direction: u8, encrypt: bool) -> Self {
        if encrypt {
            FrameSeal::Aead {
                cipher: Box::new(ChaCha20Poly1305::new(&key.into())),
                direction,
                seq: 0,
            }
        } else {
            FrameSeal::Mac(FrameMac::new(key, direction))
        }
    }

    /// The sequence number of the next message.
    pub fn seq(&self) -> u64 {
        match self {
            FrameSeal::Mac(mac) => mac.seq(),
            FrameSeal::Aead { seq, .. } => *seq,
        }
    }

    /// Bytes that follow each message on the wire.
    pub fn tag_len(&self) -> usize {
        match self {
            FrameSeal::Mac(_) => MAC_LEN,
            FrameSeal::Aead { .. } => AEAD_TAG_LEN,
        }
    }

    /// Seals the message `head ‖ payload` held in `bytes` (the first
    /// `head_len` bytes are the header): encrypts the payload in place when
    /// encrypting, and appends the tag.
    pub fn seal(&mut self, bytes: &mut Vec<u8>, head_len: usize) {
        match self {
            FrameSeal::Mac(mac) => {
                let tag = mac.seal(&[bytes]);
                bytes.extend_from_slice(&tag);
            }
            FrameSeal::Aead {
                cipher,
                direction,
                seq,
            } => {
                let nonce = nonce(*direction, *seq);
                let (head, payload) = bytes.split_at_mut(head_len);
                // Encryption in place cannot fail for messages under the
                // AEAD's limit (256 GiB); ours are under 257 MiB.
                let tag = cipher
                    .encrypt_in_place_detached(&nonce, head, payload)
                    .unwrap_or_default();
                *seq += 1;
                bytes.extend_from_slice(&tag);
            }
        }
    }

    /// Opens the next message: checks `tag` over `head` and `payload` and
    /// decrypts the payload in place. False (and nothing counted) if it
    /// does not open.
    pub fn open(&mut self, head: &[u8], payload: &mut [u8], tag: &[u8]) -> bool {
        match self {
            FrameSeal::Mac(mac) => mac.open(&[head, payload], tag),
            FrameSeal::Aead {
                cipher,
                direction,
                seq,
            } => {
                if tag.len() != AEAD_TAG_LEN {
                    return false;
                }
                let nonce = nonce(*direction, *seq);
                let opened = cipher
                    .decrypt_in_place_detached(&nonce, head, payload, Tag::from_slice(tag))
                    .is_ok();
                if opened {
                    *seq += 1;
                }
                opened
            }
        }
    }
}

/// The AEAD nonce of message `seq` going `direction`: unique per key.
fn nonce(direction: u8, seq: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[0] = direction;
    n[4..].copy_from_slice(&seq.to_le_bytes());
    n.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{CLIENT_TO_SERVER, SERVER_TO_CLIENT};

    fn message(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![7u8; 13];
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn encrypted_messages_hide_their_payload_and_open_only_in_order() {
        let key = [9u8; 32];
        let mut tx = FrameSeal::new(key, CLIENT_TO_SERVER, true);
        let mut rx = FrameSeal::new(key, CLIENT_TO_SERVER, true);
        let secret = b"the guest's password is hunter2";
        let mut m0 = message(secret);
        tx.seal(&mut m0, 13);
        let mut m1 = message(b"second");
        tx.seal(&mut m1, 13);
        assert!(
            !m0.windows(secret.len()).any(|w| w == secret),
            "the payload crossed in clear"
        );
        let open = |rx: &mut FrameSeal, m: &[u8]| {
            let (head, rest) = m.split_at(13);
            let (payload, tag) = rest.split_at(rest.len() - AEAD_TAG_LEN);
            let mut payload = payload.to_vec();
            rx.open(head, &mut payload, tag).then_some(payload)
        };
        // Out of order (dropped or replayed later message).
        assert!(open(&mut rx, &m1).is_none());
        // Modified header or payload.
        let mut bad = m0.clone();
        bad[3] ^= 1;
        assert!(open(&mut rx, &bad).is_none());
        let mut bad = m0.clone();
        bad[20] ^= 1;
        assert!(open(&mut rx, &bad).is_none());
        assert_eq!(open(&mut rx, &m0).as_deref(), Some(&secret[..]));
        // Replayed.
        assert!(open(&mut rx, &m0).is_none());
        assert_eq!(open(&mut rx, &m1).as_deref(), Some(&b"second"[..]));
        // The other direction, or another key.
        let mut back = FrameSeal::new(key, SERVER_TO_CLIENT, true);
        let mut m = message(b"x");
        back.seal(&mut m, 13);
        let mut rx2 = FrameSeal::new(key, CLIENT_TO_SERVER, true);
        assert!(open(&mut rx2, &m).is_none());
        let mut other = FrameSeal::new([8u8; 32], SERVER_TO_CLIENT, true);
        assert!(open(&mut other, &m).is_none());
    }

    #[test]
    fn unencrypted_messages_are_still_authenticated() {
        let key = [9u8; 32];
        let mut tx = FrameSeal::new(key, CLIENT_TO_SERVER, false);
        let mut rx = FrameSeal::new(key, CLIENT_TO_SERVER, false);
        let mut m = message(b"clear text");
        tx.seal(&mut m, 13);
        assert!(m.windows(10).any(|w| w == b"clear text"));
        let (head, rest) = m.split_at(13);
        let (payload, tag) = rest.split_at(rest.len() - MAC_LEN);
        let mut bad = payload.to_vec();
        bad[0] ^= 1;
        assert!(!rx.open(head, &mut bad, tag));
        assert!(rx.open(head, &mut payload.to_vec(), tag));
    }
}

#[cfg(test)]
mod fuzz {
    //! What arrives on the link is the attacker's: any header, payload and
    //! tag fails to open (or opens only if sealed under the key), never a
    //! panic, in both modes. `make fuzz` runs these with many more cases.
    use super::*;
    use crate::auth::CLIENT_TO_SERVER;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_bytes_fail_to_open(
            encrypt in any::<bool>(),
            head in prop::collection::vec(any::<u8>(), 0..20),
            mut payload in prop::collection::vec(any::<u8>(), 0..300),
            tag in prop::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut rx = FrameSeal::new([3u8; 32], CLIENT_TO_SERVER, encrypt);
            prop_assert!(!rx.open(&head, &mut payload, &tag));
            prop_assert_eq!(rx.seq(), 0);
        }
    }
}
