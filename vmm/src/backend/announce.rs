//! Announcing the VM's MAC after go-live, as QEMU's announce-self does: a
//! RARP frame per NIC, repeated on a backoff (first after 50 ms, 5 rounds,
//! +100 ms a round, capped at 550 ms), so bridges re-learn which port the
//! guest's MAC is behind.

use std::sync::Arc;
use std::time::Duration;

use super::tap::Tap;

/// A broadcast RARP "reverse request" for `mac` (60 bytes, padded).
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // RARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x03]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

/// Announces each NIC's MAC on its tap in the background.
pub fn spawn(taps: Vec<Arc<Tap>>, macs: Vec<[u8; 6]>) {
    if taps.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("tandem-announce".into())
        .spawn(move || {
            let mut delay = Duration::from_millis(50);
            for _round in 0..5 {
                std::thread::sleep(delay);
                for (tap, mac) in taps.iter().zip(&macs) {
                    tap.send(&rarp_frame(*mac));
                }
                delay = (delay + Duration::from_millis(100)).min(Duration::from_millis(550));
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot announce the VM's MACs: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rarp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = rarp_frame(mac);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[32..38], &mac);
    }
}
