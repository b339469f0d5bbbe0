//! Announcing the VM after go-live, as QEMU's announce-self does: a RARP
//! frame per NIC and a gratuitous ARP for every IPv4 address the guest used
//! (snooped from its own suppressed frames), at once and then on a backoff
//! (QEMU's defaults: 5 rounds, 50 ms apart, +100 ms a round, capped at
//! 550 ms; `[ft] announce_*`), so bridges re-learn which port the guest's MAC
//! is behind.

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

/// When the announce rounds go out (QEMU's announce-self parameters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AnnounceSchedule {
    /// How many rounds (at least 1 is sent).
    pub rounds: u32,
    /// The wait after the first round.
    pub initial: Duration,
    /// Added to the wait after each further round.
    pub step: Duration,
    /// The wait never exceeds this.
    pub max: Duration,
}

impl Default for AnnounceSchedule {
    /// QEMU's defaults: 5 rounds, 50 ms, +100 ms a round, at most 550 ms.
    fn default() -> Self {
        Self {
            rounds: 5,
            initial: Duration::from_millis(50),
            step: Duration::from_millis(100),
            max: Duration::from_millis(550),
        }
    }
}

impl AnnounceSchedule {
    /// The wait after round `round` (0-based) before the next one.
    pub fn delay_after(&self, round: u32) -> Duration {
        self.initial
            .saturating_add(self.step.saturating_mul(round))
            .min(self.max)
    }
}

/// Announces each NIC's MAC (RARP) and the guest's IPv4 addresses on it
/// (gratuitous ARP) on its tap, in the background: the first round at once,
/// the rest on `schedule`.
pub fn spawn(
    taps: Vec<Arc<Tap>>,
    macs: Vec<[u8; 6]>,
    addresses: Vec<(u8, [u8; 4])>,
    schedule: AnnounceSchedule,
) {
    if taps.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("tandem-announce".into())
        .spawn(move || {
            let started = std::time::Instant::now();
            let rounds = schedule.rounds.max(1);
            for round in 0..rounds {
                if round > 0 {
                    std::thread::sleep(schedule.delay_after(round - 1));
                }
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
                    "announce round {}/{rounds}: {frames} frames at {} ms after go-live",
                    round + 1,
                    started.elapsed().as_millis()
                );
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
    fn the_default_schedule_is_qemus() {
        let s = AnnounceSchedule::default();
        let gaps: Vec<u64> = (0..4)
            .map(|r| s.delay_after(r).as_millis() as u64)
            .collect();
        assert_eq!(gaps, [50, 150, 250, 350]);
        let capped = AnnounceSchedule {
            max: Duration::from_millis(200),
            ..s
        };
        assert_eq!(capped.delay_after(3), Duration::from_millis(200));
    }

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
