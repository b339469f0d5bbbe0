//! The i8254 programmable interval timer (ports 0x40–0x43).
//!
//! The counters are not ticked: each channel remembers the guest time at
//! which its count was loaded, and every read derives the current count and
//! output level from the elapsed guest time ([`Clock::now_ns`], never a host
//! clock) at 1 193 182 Hz, in `u128` arithmetic. Both sides of a tandem pair
//! therefore read the same values at the same stop.
//!
//! Channel 0 drives IRQ0. The VMM calls [`Pit::poll`] at every stop: if one
//! or more rising edges of OUT0 have passed since the last poll, IRQ0 is
//! pulsed once (several collapse into one, as an unserviced PIC would latch
//! them). [`Pit::next_deadline_ns`] tells the VMM when the next edge is due,
//! so a halted guest is woken then. Until the guest first writes a count to
//! channel 0, it raises no interrupt (unlike a PC after its BIOS has run).
//!
//! Modes: 0 (interrupt on terminal count), 2 (rate generator) and 3 (square
//! wave) are exact; 4 and 5 act as a single strobe `count + 1` ticks after the
//! load; 1 is a one-shot whose output is low while counting and raises no
//! IRQ. Counting is always binary (the BCD bit is kept in the status only).
//! The gate of channels 0 and 1 is tied high; channel 2's gate is driven by
//! [`Pit::set_gate`] (port 0x61 on a PC) and a rising edge restarts the count.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_replay::Clock;

use crate::{read_bytewise, write_bytewise, BusDevice, IrqLine, VmRequest};

/// Input clock of every counter, in Hz.
pub const PIT_FREQ_HZ: u64 = 1_193_182;
const NS_PER_SEC: u128 = 1_000_000_000;

/// Offset of the mode/command register.
pub const OFFSET_COMMAND: u64 = 3;
/// Number of counters.
const CHANNELS: usize = 3;

/// Command bits 7..6: the channel, or 3 for read-back.
const CMD_CHANNEL_SHIFT: u8 = 6;
const CMD_READ_BACK: u8 = 3;
/// Command bits 5..4: access mode (0 = counter latch).
const CMD_ACCESS_SHIFT: u8 = 4;
const ACCESS_LATCH: u8 = 0;
const ACCESS_LO: u8 = 1;
const ACCESS_HI: u8 = 2;
const ACCESS_LOHI: u8 = 3;
/// Command bits 3..1: mode; bit 0: BCD.
const CMD_MODE_SHIFT: u8 = 1;
const CMD_BCD: u8 = 0x01;
/// Read-back: bit 5 low latches the count, bit 4 low the status.
const RB_NO_COUNT: u8 = 0x20;
const RB_NO_STATUS: u8 = 0x10;
/// Status byte: OUT level and null count.
const STATUS_OUT: u8 = 0x80;
const STATUS_NULL_COUNT: u8 = 0x40;

/// One counter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitChannelState {
    /// Reload value, 1..=65536 (a written 0 means 65536).
    pub count: u32,
    /// Guest time (ns) at which `count` was loaded.
    pub load_ns: u64,
    /// Mode 0–5 (6 and 7 stored as 2 and 3).
    pub mode: u8,
    /// Access mode: 1 lobyte, 2 hibyte, 3 lobyte then hibyte.
    pub access: u8,
    /// BCD bit of the control word (counting stays binary).
    pub bcd: bool,
    /// Gate input level.
    pub gate: bool,
    /// A count has been written since the control word.
    pub armed: bool,
    /// Status null-count bit: control word written, count not yet loaded.
    pub null_count: bool,
    /// Lobyte/hibyte toggle for writes: the low byte waiting for its partner.
    pub write_lo: Option<u8>,
    /// Lobyte/hibyte toggle for unlatched reads: next read is the high byte.
    pub read_hi_next: bool,
    /// Latched count (counter-latch or read-back command), until read.
    pub latched_count: Option<u16>,
    /// The latched count's lobyte has been read (lohi access).
    pub latched_hi_next: bool,
    /// Latched status byte, read before any count.
    pub latched_status: Option<u8>,
    /// Channel 0: guest time of the next IRQ edge not yet delivered.
    pub next_irq_ns: Option<u64>,
}

impl PitChannelState {
    fn new(gate: bool) -> Self {
        Self {
            count: 0x1_0000,
            load_ns: 0,
            mode: 3,
            access: ACCESS_LOHI,
            bcd: false,
            gate,
            armed: false,
            null_count: true,
            write_lo: None,
            read_hi_next: false,
            latched_count: None,
            latched_hi_next: false,
            latched_status: None,
            next_irq_ns: None,
        }
    }

    /// Whole input ticks between the load and `now`.
    fn ticks(&self, now: u64) -> u128 {
        u128::from(now.saturating_sub(self.load_ns)) * u128::from(PIT_FREQ_HZ) / NS_PER_SEC
    }

    /// The first guest time at which `tick` ticks have elapsed since the load.
    fn tick_ns(&self, tick: u128) -> u64 {
        let ns = (tick * NS_PER_SEC).div_ceil(u128::from(PIT_FREQ_HZ));
        u64::try_from(ns)
            .ok()
            .and_then(|ns| ns.checked_add(self.load_ns))
            .unwrap_or(u64::MAX)
    }

    fn count(&self) -> u128 {
        u128::from(self.count.max(1))
    }

    /// The value of the counting element at `now`.
    fn current_count(&self, now: u64) -> u16 {
        let d = self.ticks(now);
        let c = self.count();
        let v = match self.mode {
            2 => c - d % c,
            3 => c - (2 * d) % c,
            // One-shot modes count on through zero, wrapping at 16 bits.
            _ => (c + 0x1_0000 - d % 0x1_0000) % 0x1_0000,
        };
        (v & 0xffff) as u16
    }

    /// The OUT level at `now`.
    fn output(&self, now: u64) -> bool {
        if !self.armed {
            return self.mode != 0;
        }
        let d = self.ticks(now);
        let c = self.count();
        match self.mode {
            0 => d >= c,
            1 => d >= c,
            2 => d % c != c - 1,
            3 => d % c < c.div_ceil(2),
            _ => d != c,
        }
    }

    /// The first IRQ edge strictly after tick `after` (None: no further edge).
    fn next_edge_tick(&self, after: Option<u128>) -> Option<u128> {
        let c = self.count();
        match self.mode {
            2 | 3 => Some(match after {
                Some(d) => (d / c + 1) * c,
                None => c,
            }),
            0 => after.is_none().then_some(c),
            4 | 5 => after.is_none().then_some(c + 1),
            _ => None,
        }
    }

    fn status(&self, now: u64) -> u8 {
        let mut s = (self.access << CMD_ACCESS_SHIFT) | (self.mode << CMD_MODE_SHIFT);
        if self.bcd {
            s |= CMD_BCD;
        }
        if self.output(now) {
            s |= STATUS_OUT;
        }
        if self.null_count {
            s |= STATUS_NULL_COUNT;
        }
        s
    }

    fn load(&mut self, value: u16, now: u64, irq_channel: bool) {
        self.count = if value == 0 {
            0x1_0000
        } else {
            u32::from(value)
        };
        self.load_ns = now;
        self.armed = true;
        self.null_count = false;
        self.next_irq_ns = if irq_channel {
            self.next_edge_tick(None).map(|t| self.tick_ns(t))
        } else {
            None
        };
    }

    fn latch_count(&mut self, now: u64) {
        if self.latched_count.is_none() {
            self.latched_count = Some(self.current_count(now));
            self.latched_hi_next = false;
        }
    }

    fn read(&mut self, now: u64) -> u8 {
        if let Some(s) = self.latched_status.take() {
            return s;
        }
        let (value, hi) = match self.latched_count {
            Some(v) => {
                let hi = match self.access {
                    ACCESS_HI => true,
                    ACCESS_LOHI => self.latched_hi_next,
                    _ => false,
                };
                if self.access == ACCESS_LOHI && !hi {
                    self.latched_hi_next = true;
                } else {
                    self.latched_count = None;
                }
                (v, hi)
            }
            None => {
                let hi = match self.access {
                    ACCESS_HI => true,
                    ACCESS_LOHI => {
                        self.read_hi_next = !self.read_hi_next;
                        !self.read_hi_next
                    }
                    _ => false,
                };
                (self.current_count(now), hi)
            }
        };
        let [lo, hi_byte] = value.to_le_bytes();
        if hi {
            hi_byte
        } else {
            lo
        }
    }

    fn write(&mut self, val: u8, now: u64, irq_channel: bool) {
        match self.access {
            ACCESS_LO => self.load(u16::from(val), now, irq_channel),
            ACCESS_HI => self.load(u16::from(val) << 8, now, irq_channel),
            _ => match self.write_lo.take() {
                Some(lo) => self.load(u16::from_le_bytes([lo, val]), now, irq_channel),
                None => self.write_lo = Some(val),
            },
        }
    }

    fn control(&mut self, val: u8) {
        let mut mode = (val >> CMD_MODE_SHIFT) & 7;
        if mode >= 6 {
            mode -= 4;
        }
        self.access = (val >> CMD_ACCESS_SHIFT) & 3;
        self.mode = mode;
        self.bcd = val & CMD_BCD != 0;
        self.armed = false;
        self.null_count = true;
        self.write_lo = None;
        self.read_hi_next = false;
        self.latched_count = None;
        self.latched_status = None;
        self.next_irq_ns = None;
    }
}

/// The state of the PIT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PitState {
    /// Counters 0 (IRQ0), 1 and 2.
    pub channels: [PitChannelState; CHANNELS],
}

impl Default for PitState {
    fn default() -> Self {
        Self {
            channels: [
                PitChannelState::new(true),
                PitChannelState::new(true),
                PitChannelState::new(false),
            ],
        }
    }
}

/// The i8254 PIT.
pub struct Pit {
    clock: Arc<dyn Clock>,
    irq0: IrqLine,
    state: PitState,
}

impl Pit {
    /// A PIT after reset, reading guest time from `clock`, raising `irq0`.
    pub fn new(clock: Arc<dyn Clock>, irq0: IrqLine) -> Self {
        Self {
            clock,
            irq0,
            state: PitState::default(),
        }
    }

    /// Pulses IRQ0 once if channel 0 had a rising edge since the last poll.
    pub fn poll(&mut self) {
        let now = self.clock.now_ns();
        let ch = &mut self.state.channels[0];
        match ch.next_irq_ns {
            Some(due) if now >= due => {}
            _ => return,
        }
        ch.next_irq_ns = ch
            .next_edge_tick(Some(ch.ticks(now)))
            .map(|t| ch.tick_ns(t));
        self.irq0.pulse();
    }

    /// Delays channel 0's next IRQ edge to guest time `ns` at the earliest
    /// (the perturbation after a rollback to a checkpoint); later edges keep
    /// the channel's own rhythm.
    pub fn delay_next_irq(&mut self, ns: u64) {
        let ch = &mut self.state.channels[0];
        if let Some(due) = ch.next_irq_ns.as_mut() {
            *due = (*due).max(ns);
        }
    }

    /// Guest time of channel 0's next IRQ edge, if one is armed.
    pub fn next_deadline_ns(&self) -> Option<u64> {
        self.state.channels[0].next_irq_ns
    }

    /// Drives the gate of `channel` (only channel 2's is wired on a PC); a
    /// rising edge restarts the count.
    pub fn set_gate(&mut self, channel: u8, level: bool) {
        let now = self.clock.now_ns();
        let Some(ch) = self.state.channels.get_mut(usize::from(channel)) else {
            return;
        };
        if level && !ch.gate && ch.armed {
            let count = (ch.count & 0xffff) as u16;
            ch.load(count, now, channel == 0);
        }
        ch.gate = level;
    }

    /// The OUT level of `channel` now (false for a channel that does not exist).
    pub fn output(&self, channel: u8) -> bool {
        let now = self.clock.now_ns();
        self.state
            .channels
            .get(usize::from(channel))
            .is_some_and(|ch| ch.output(now))
    }

    fn command(&mut self, val: u8) {
        let now = self.clock.now_ns();
        let channel = val >> CMD_CHANNEL_SHIFT;
        if channel == CMD_READ_BACK {
            for (i, ch) in self.state.channels.iter_mut().enumerate() {
                if val & (2 << i) == 0 {
                    continue;
                }
                if val & RB_NO_COUNT == 0 {
                    ch.latch_count(now);
                }
                if val & RB_NO_STATUS == 0 && ch.latched_status.is_none() {
                    ch.latched_status = Some(ch.status(now));
                }
            }
            return;
        }
        let Some(ch) = self.state.channels.get_mut(usize::from(channel)) else {
            return;
        };
        if (val >> CMD_ACCESS_SHIFT) & 3 == ACCESS_LATCH {
            ch.latch_count(now);
        } else {
            ch.control(val);
        }
    }

    /// A copy of the device state.
    pub fn state(&self) -> PitState {
        self.state.clone()
    }

    /// Replaces the device state.
    pub fn set_state(&mut self, state: PitState) {
        self.state = state;
    }
}

impl BusDevice for Pit {
    fn name(&self) -> &'static str {
        "pit"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let now = self.clock.now_ns();
        let channels = &mut self.state.channels;
        read_bytewise(offset, data, |off| {
            let ch = usize::try_from(off).ok().and_then(|o| channels.get_mut(o));
            ch.map_or(0xff, |ch| ch.read(now))
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        let now = self.clock.now_ns();
        write_bytewise(offset, data, |off, val| match off {
            OFFSET_COMMAND => self.command(val),
            _ => {
                let idx = usize::try_from(off).unwrap_or(usize::MAX);
                if let Some(ch) = self.state.channels.get_mut(idx) {
                    ch.write(val, now, idx == 0);
                }
            }
        });
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tandem_replay::GuestClock;

    use super::*;
    use crate::lock;
    use crate::pic::Pic;

    fn setup() -> (GuestClock, Arc<Mutex<Pic>>, Pit) {
        let clock = GuestClock::new();
        let pic = Arc::new(Mutex::new(Pic::new()));
        let pit = Pit::new(Arc::new(clock.clone()), IrqLine::new(pic.clone(), 0));
        (clock, pic, pit)
    }

    fn wr(pit: &mut Pit, off: u64, v: u8) {
        assert_eq!(pit.write(off, &[v]), None);
    }

    fn rd(pit: &mut Pit, off: u64) -> u8 {
        let mut b = [0u8];
        pit.read(off, &mut b);
        b[0]
    }

    /// Program channel 0: `cmd` then the 16-bit count lo/hi.
    fn program(pit: &mut Pit, cmd: u8, count: u16) {
        wr(pit, 3, cmd);
        let [lo, hi] = count.to_le_bytes();
        wr(pit, 0, lo);
        wr(pit, 0, hi);
    }

    fn irr(pic: &Arc<Mutex<Pic>>) -> u8 {
        lock(pic).state().master.irr
    }

    fn clear_irr(pic: &Arc<Mutex<Pic>>) {
        let mut p = lock(pic);
        let mut st = p.state();
        st.master.irr = 0;
        p.set_state(st);
    }

    #[test]
    fn mode2_1khz_pulses_irq0() {
        let (clock, pic, mut pit) = setup();
        pit.poll();
        assert_eq!(pit.next_deadline_ns(), None);
        program(&mut pit, 0x34, 1193); // channel 0, lohi, mode 2
                                       // 1193 ticks = 999_847.2 ns, rounded up.
        assert_eq!(pit.next_deadline_ns(), Some(999_848));
        clock.advance_to(999_847);
        pit.poll();
        assert_eq!(irr(&pic), 0);
        clock.advance_to(999_848);
        pit.poll();
        assert_eq!(irr(&pic), 1);
        assert_eq!(pit.next_deadline_ns(), Some(1_999_695));
        clear_irr(&pic);
        // Several periods pass unserviced: one pulse.
        clock.advance_to(5_500_000);
        pit.poll();
        assert_eq!(irr(&pic), 1);
        assert_eq!(pit.next_deadline_ns(), Some(5_999_085));
        clear_irr(&pic);
        pit.poll();
        assert_eq!(irr(&pic), 0);
        // The PIC delivers it as vector base + 0.
        clock.advance_to(6_000_000);
        pit.poll();
        assert!(lock(&pic).has_pending());
        assert_eq!(lock(&pic).acknowledge(), Some(0));
    }

    #[test]
    fn latched_reads_count_down() {
        let (clock, _pic, mut pit) = setup();
        program(&mut pit, 0x34, 10_000);
        clock.advance_to(1_000_000); // 1193.182 ticks -> 1193
        wr(&mut pit, 3, 0x00); // latch channel 0
        clock.advance_to(2_000_000);
        let lo = rd(&mut pit, 0);
        let hi = rd(&mut pit, 0);
        assert_eq!(u16::from_le_bytes([lo, hi]), 10_000 - 1193);
        // Unlatched: live value, lo then hi.
        let lo = rd(&mut pit, 0);
        let hi = rd(&mut pit, 0);
        assert_eq!(u16::from_le_bytes([lo, hi]), 10_000 - 2386);
        // Lobyte-only access on channel 1 in mode 2.
        wr(&mut pit, 3, 0x54);
        wr(&mut pit, 1, 100);
        clock.advance_to(2_000_000 + 10_000); // 11.9 ticks -> 11
        assert_eq!(rd(&mut pit, 1), 89);
        // Hibyte-only on channel 2: count 0x0300.
        wr(&mut pit, 3, 0xa0);
        wr(&mut pit, 2, 3);
        assert_eq!(rd(&mut pit, 2), 3);
        clock.advance_to(2_010_000 + 1_000); // 1 tick
        assert_eq!(rd(&mut pit, 2), 2);
    }

    #[test]
    fn mode0_one_shot() {
        let (clock, pic, mut pit) = setup();
        program(&mut pit, 0x30, 100); // mode 0
        assert!(!pit.output(0));
        let due = pit.next_deadline_ns().unwrap();
        assert_eq!(due, 83_810); // ceil(100e9 / 1193182)
        clock.advance_to(due);
        assert!(pit.output(0));
        pit.poll();
        assert_eq!(irr(&pic), 1);
        assert_eq!(pit.next_deadline_ns(), None);
        clear_irr(&pic);
        clock.advance_to(10_000_000);
        pit.poll();
        assert_eq!(irr(&pic), 0);
        // Counting wraps on past zero.
        wr(&mut pit, 3, 0x00);
        let lo = rd(&mut pit, 0);
        let hi = rd(&mut pit, 0);
        assert_eq!(
            u16::from_le_bytes([lo, hi]),
            (100u32 + 65536 - 11931) as u16
        );
    }

    #[test]
    fn read_back_status_and_divisor_zero() {
        let (clock, _pic, mut pit) = setup();
        wr(&mut pit, 3, 0x36); // channel 0, lohi, mode 3
                               // Status before the count: null count set.
        wr(&mut pit, 3, 0xe2); // read-back status only, channel 0
        assert_eq!(rd(&mut pit, 0), 0x80 | 0x40 | 0x36);
        wr(&mut pit, 0, 0);
        wr(&mut pit, 0, 0); // 0 = 65536
        assert_eq!(pit.state().channels[0].count, 65536);
        assert_eq!(pit.next_deadline_ns(), Some(54_925_402));
        // Mode 3: OUT low in the second half.
        clock.advance_to(30_000_000);
        wr(&mut pit, 3, 0xc2); // latch count and status of channel 0
        assert_eq!(rd(&mut pit, 0), 0x36); // OUT low, count loaded
        let lo = rd(&mut pit, 0);
        let hi = rd(&mut pit, 0);
        // 35795 ticks, counting by two from 65536.
        assert_eq!(
            u16::from_le_bytes([lo, hi]),
            (2 * 65536u32 - 2 * 35795) as u16
        );
        // Unimplemented width bytes and a bad channel read 0xff.
        let mut b = [0u8; 2];
        pit.read(3, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn state_round_trip_and_huge_times() {
        let (clock, pic, mut pit) = setup();
        program(&mut pit, 0x34, 2);
        clock.advance_to(u64::MAX - 1);
        pit.poll();
        assert_eq!(irr(&pic), 1);
        let _ = rd(&mut pit, 0);
        let st = pit.state();
        let (_c, _p, mut other) = setup();
        other.set_state(st.clone());
        assert_eq!(other.state(), st);
        // Gate restart on channel 2.
        wr(&mut pit, 3, 0xb0);
        wr(&mut pit, 2, 5);
        wr(&mut pit, 2, 0);
        pit.set_gate(2, true);
        assert!(!pit.output(2));
        pit.set_gate(9, true);
        // A corrupt state is survived, not trusted.
        let mut bad = pit.state();
        for ch in bad.channels.iter_mut() {
            (ch.count, ch.mode, ch.access, ch.next_irq_ns) = (0, 0xff, 0xff, Some(0));
        }
        pit.set_state(bad);
        pit.poll();
        let mut b = [0u8; 4];
        pit.read(0, &mut b);
        assert_eq!(b[3], 0xff);
    }
}
