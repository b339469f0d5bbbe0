//! Announcing the VM after go-live, as QEMU's announce-self does: a RARP
//! frame per NIC and a gratuitous ARP for every IPv4 address the guest used
//! (snooped from its own suppressed frames), repeated on a backoff (first after 50 ms, 5 rounds,
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

/// A gratuitous ARP request for `ip` at `mac` (60 bytes, padded).
pub fn garp_frame(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

/// Announces each NIC's MAC (RARP) and the guest's IPv4 addresses on it
/// (gratuitous ARP) on its tap, in the background.
pub fn spawn(taps: Vec<Arc<Tap>>, macs: Vec<[u8; 6]>, addresses: Vec<(u8, [u8; 4])>) {
    if taps.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("tandem-announce".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let mut delay = Duration::from_millis(50);
            for round in 1..=5 {
                std::thread::sleep(delay);
                let mut frames = 0;
                for (nic, (tap, mac)) in taps.iter().zip(&macs).enumerate() {
                    tap.send(&rarp_frame(*mac));
                    frames += 1;
                    for (_, ip) in addresses.iter().filter(|(d, _)| usize::from(*d) == nic) {
                        tap.send(&garp_frame(*mac, *ip));
                        frames += 1;
                    }
                }
                tracing::info!(
                    "announce round {round}/5: {frames} frames at {} ms after go-live",
                    started.elapsed().as_millis()
                );
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

    #[test]
    fn garp_frame_layout() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let f = garp_frame(mac, [10, 0, 0, 2]);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        assert_eq!(&f[20..22], &[0, 1]);
        assert_eq!(&f[28..32], &[10, 0, 0, 2]);
        assert_eq!(&f[38..42], &[10, 0, 0, 2]);
    }
}
