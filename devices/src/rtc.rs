//! The MC146818 CMOS real-time clock and its 128 bytes of NVRAM (ports 0x70–0x71).
//!
//! Wall time is never read from the host: it is `base_unix_secs` (the host's
//! wall time at VM creation, passed in by the VMM and carried in the state)
//! plus guest time from the [`Clock`], plus `offset_secs`, which the guest
//! changes by setting the clock. Both sides of a pair therefore read the same
//! date at the same stop, and time does not jump at failover.
//!
//! Setting the clock works as on the chip: while the SET bit of status B is
//! set the time registers are frozen (a staged copy is read and written);
//! clearing SET starts the clock from the staged values. A write to a time
//! register with SET clear is applied at once. Dates are converted with
//! Howard Hinnant's `days_from_civil` / `civil_from_days`.
//!
//! Status A shows UIP during the last 244 µs of each second. No interrupts are
//! raised (status C reads 0); alarm registers are stored only. Bytes
//! 0x0E–0x7F are plain RAM, except the century byte 0x32, which is part of
//! the clock.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tandem_replay::Clock;

use crate::{read_bytewise, write_bytewise, BusDevice, VmRequest};

/// Offset of the index register (bit 7: NMI disable).
pub const OFFSET_INDEX: u64 = 0;
/// Offset of the data register.
pub const OFFSET_DATA: u64 = 1;

const INDEX_NMI_DISABLE: u8 = 0x80;
const INDEX_MASK: u8 = 0x7f;
const CMOS_SIZE: usize = 128;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// Status A: update in progress.
const A_UIP: u8 = 0x80;
/// Status A after reset: 32.768 kHz time base, 1.024 kHz rate.
const A_DEFAULT: u8 = 0x26;
/// Status B: SET (updates inhibited, time being set).
const B_SET: u8 = 0x80;
/// Status B: binary (not BCD) data mode.
const B_DM_BINARY: u8 = 0x04;
/// Status B: 24-hour mode.
const B_24H: u8 = 0x02;
/// Status D: valid RAM and time.
const D_VRT: u8 = 0x80;
/// Hours register in 12-hour mode: PM.
const HOUR_PM: u8 = 0x80;

const NS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: i64 = 86_400;
/// UIP is shown for this long before each second ends.
const UIP_NS: u64 = 244_000;

/// A broken-down UTC time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CivilTime {
    /// Full year, e.g. 2025.
    pub year: i64,
    /// Month 1–12.
    pub month: u8,
    /// Day of month 1–31.
    pub day: u8,
    /// Hour 0–23.
    pub hour: u8,
    /// Minute 0–59.
    pub minute: u8,
    /// Second 0–59.
    pub second: u8,
    /// Day of week 1–7, Sunday = 1.
    pub weekday: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant).
pub fn days_from_civil(y: i64, m: u8, d: u8) -> i64 {
    let m = i64::from(m.clamp(1, 12));
    let d = i64::from(d);
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date `z` days after 1970-01-01 as (year, month, day) (Hinnant).
pub fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u8, d as u8)
}

impl CivilTime {
    /// The broken-down form of `secs` seconds since the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECS_PER_DAY);
        let rem = secs.rem_euclid(SECS_PER_DAY);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    /// Seconds since the Unix epoch (the weekday is ignored).
    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day)
            .saturating_mul(SECS_PER_DAY)
            .saturating_add(i64::from(self.hour) * 3600)
            .saturating_add(i64::from(self.minute) * 60)
            .saturating_add(i64::from(self.second))
    }
}

/// The state of the RTC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtcState {
    /// Host wall time (Unix seconds) at VM creation.
    pub base_unix_secs: u64,
    /// Seconds the guest moved the clock by setting it.
    pub offset_secs: i64,
    /// Selected register (index port bits 6..0).
    pub index: u8,
    /// NMI disable (index port bit 7).
    pub nmi_disabled: bool,
    /// The frozen time while SET is on.
    pub staged: Option<CivilTime>,
    /// Status registers and RAM; bytes 0x00–0x09 and 0x32 are unused (time
    /// is computed), alarms live at 0x01, 0x03 and 0x05.
    pub cmos: Vec<u8>,
}

/// The CMOS RTC.
pub struct Rtc {
    clock: Arc<dyn Clock>,
    state: RtcState,
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4).saturating_mul(10).saturating_add(v & 0x0f)
}

impl Rtc {
    /// An RTC whose wall time is `base_unix_secs` at guest time 0.
    pub fn new(clock: Arc<dyn Clock>, base_unix_secs: u64) -> Self {
        let mut cmos = vec![0u8; CMOS_SIZE];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_24H;
        cmos[usize::from(REG_D)] = D_VRT;
        Self {
            clock,
            state: RtcState {
                base_unix_secs,
                offset_secs: 0,
                index: 0,
                nmi_disabled: false,
                staged: None,
                cmos,
            },
        }
    }

    fn ram(&self, reg: u8) -> u8 {
        self.state.cmos.get(usize::from(reg)).copied().unwrap_or(0)
    }

    fn set_ram(&mut self, reg: u8, val: u8) {
        if let Some(b) = self.state.cmos.get_mut(usize::from(reg)) {
            *b = val;
        }
    }

    /// The running clock, in Unix seconds, now.
    fn unix_now(&self) -> i64 {
        let guest = i64::try_from(self.clock.now_ns() / NS_PER_SEC).unwrap_or(i64::MAX);
        i64::try_from(self.state.base_unix_secs)
            .unwrap_or(i64::MAX)
            .saturating_add(guest)
            .saturating_add(self.state.offset_secs)
    }

    /// The time the registers show: staged while SET, else running.
    fn time(&self) -> CivilTime {
        self.state
            .staged
            .unwrap_or_else(|| CivilTime::from_unix(self.unix_now()))
    }

    fn encode(&self, v: u8) -> u8 {
        if self.ram(REG_B) & B_DM_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.ram(REG_B) & B_DM_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn read_reg(&mut self, reg: u8) -> u8 {
        let t = self.time();
        match reg {
            REG_SECONDS => self.encode(t.second),
            REG_MINUTES => self.encode(t.minute),
            REG_HOURS if self.ram(REG_B) & B_24H == 0 => {
                let h12 = match t.hour % 12 {
                    0 => 12,
                    h => h,
                };
                let pm = if t.hour >= 12 { HOUR_PM } else { 0 };
                self.encode(h12) | pm
            }
            REG_HOURS => self.encode(t.hour),
            REG_WEEKDAY => self.encode(t.weekday),
            REG_DAY => self.encode(t.day),
            REG_MONTH => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode(t.year.div_euclid(100).rem_euclid(100) as u8),
            REG_A => {
                let frac = self.clock.now_ns() % NS_PER_SEC;
                let uip = self.state.staged.is_none() && frac >= NS_PER_SEC - UIP_NS;
                self.ram(REG_A) | if uip { A_UIP } else { 0 }
            }
            REG_C => 0,
            REG_D => D_VRT,
            _ => self.ram(reg),
        }
    }

    fn write_time(&mut self, reg: u8, val: u8) {
        let mut t = self.time();
        let twelve_hour = self.ram(REG_B) & B_24H == 0;
        let v = if reg == REG_HOURS && twelve_hour {
            self.decode(val & !HOUR_PM)
        } else {
            self.decode(val)
        };
        match reg {
            REG_SECONDS => t.second = v.min(59),
            REG_MINUTES => t.minute = v.min(59),
            REG_HOURS if twelve_hour => {
                t.hour = v.min(12) % 12 + if val & HOUR_PM != 0 { 12 } else { 0 };
            }
            REG_HOURS => t.hour = v.min(23),
            REG_WEEKDAY => t.weekday = v,
            REG_DAY => t.day = v.clamp(1, 31),
            REG_MONTH => t.month = v.clamp(1, 12),
            REG_YEAR => t.year = t.year.div_euclid(100) * 100 + i64::from(v.min(99)),
            _ => t.year = i64::from(v) * 100 + t.year.rem_euclid(100),
        }
        if self.state.staged.is_some() {
            self.state.staged = Some(t);
        } else {
            self.commit(t);
        }
    }

    /// Starts the clock running from `t`.
    fn commit(&mut self, t: CivilTime) {
        let delta = t.to_unix().saturating_sub(self.unix_now());
        self.state.offset_secs = self.state.offset_secs.saturating_add(delta);
    }

    fn write_reg(&mut self, reg: u8, val: u8) {
        match reg {
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_WEEKDAY | REG_DAY | REG_MONTH
            | REG_YEAR | REG_CENTURY => self.write_time(reg, val),
            REG_A => self.set_ram(REG_A, val & !A_UIP),
            REG_B => {
                let set = val & B_SET != 0;
                match (self.state.staged, set) {
                    (None, true) => self.state.staged = Some(self.time()),
                    (Some(t), false) => {
                        self.state.staged = None;
                        self.commit(t);
                    }
                    _ => {}
                }
                self.set_ram(REG_B, val);
            }
            REG_C | REG_D => {}
            _ => self.set_ram(reg, val),
        }
    }

    /// A copy of the device state.
    pub fn state(&self) -> RtcState {
        self.state.clone()
    }

    /// Replaces the device state (a short RAM image is padded with zeros).
    pub fn set_state(&mut self, mut state: RtcState) {
        state.cmos.resize(CMOS_SIZE, 0);
        self.state = state;
    }
}

impl BusDevice for Rtc {
    fn name(&self) -> &'static str {
        "rtc"
    }

    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let reg = self.state.index;
        read_bytewise(offset, data, |off| match off {
            OFFSET_DATA => self.read_reg(reg),
            _ => 0xff,
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        write_bytewise(offset, data, |off, val| match off {
            OFFSET_INDEX => {
                self.state.index = val & INDEX_MASK;
                self.state.nmi_disabled = val & INDEX_NMI_DISABLE != 0;
            }
            OFFSET_DATA => self.write_reg(self.state.index, val),
            _ => {}
        });
        None
    }
}

#[cfg(test)]
mod tests {
    use tandem_replay::GuestClock;

    use super::*;

    /// 2025-11-26 12:00:00 UTC, a Wednesday.
    const T0: u64 = 1_764_158_400;

    fn setup() -> (GuestClock, Rtc) {
        let clock = GuestClock::new();
        let rtc = Rtc::new(Arc::new(clock.clone()), T0);
        (clock, rtc)
    }

    fn rd(rtc: &mut Rtc, reg: u8) -> u8 {
        assert_eq!(rtc.write(0, &[reg]), None);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    fn wr(rtc: &mut Rtc, reg: u8, v: u8) {
        assert_eq!(rtc.write(0, &[reg]), None);
        assert_eq!(rtc.write(1, &[v]), None);
    }

    fn fields(rtc: &mut Rtc) -> [u8; 8] {
        [0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32].map(|r| rd(rtc, r))
    }

    #[test]
    fn civil_conversions() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        for z in [-800_000, -1, 0, 11_016, 20_418, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        let t = CivilTime::from_unix(T0 as i64);
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.weekday),
            (2025, 11, 26, 12, 4)
        );
        assert_eq!(t.to_unix(), T0 as i64);
    }

    #[test]
    fn known_time_bcd_binary_and_12h() {
        let (clock, mut rtc) = setup();
        assert_eq!(
            fields(&mut rtc),
            [0x00, 0x00, 0x12, 0x04, 0x26, 0x11, 0x25, 0x20]
        );
        assert_eq!(rd(&mut rtc, 0x0b), 0x02);
        assert_eq!(rd(&mut rtc, 0x0d), 0x80);
        assert_eq!(rd(&mut rtc, 0x0c), 0);
        wr(&mut rtc, 0x0b, 0x06); // binary
        assert_eq!(fields(&mut rtc), [0, 0, 12, 4, 26, 11, 25, 20]);
        wr(&mut rtc, 0x0b, 0x00); // BCD, 12-hour
        assert_eq!(rd(&mut rtc, 0x04), 0x80 | 0x12); // 12 PM
        clock.advance_to(13 * 3600 * NS_PER_SEC); // 01:00 next day
        assert_eq!(rd(&mut rtc, 0x04), 0x01);
        assert_eq!(rd(&mut rtc, 0x07), 0x27);
        clock.advance_to(23 * 3600 * NS_PER_SEC); // 11 AM
        assert_eq!(rd(&mut rtc, 0x04), 0x11);
    }

    #[test]
    fn time_advances_and_uip() {
        let (clock, mut rtc) = setup();
        clock.advance_to(61 * NS_PER_SEC + 500_000_000);
        assert_eq!(rd(&mut rtc, 0x00), 0x01);
        assert_eq!(rd(&mut rtc, 0x02), 0x01);
        assert_eq!(rd(&mut rtc, 0x0a), 0x26);
        clock.advance_to(62 * NS_PER_SEC - UIP_NS);
        assert_eq!(rd(&mut rtc, 0x0a), 0x26 | 0x80);
        // Year rollover from 1999-12-31 23:59:59.
        let mut rtc = Rtc::new(Arc::new(GuestClock::new()), 0);
        wr(&mut rtc, 0x0b, 0x82);
        for (r, v) in [
            (0x00, 0x59),
            (0x02, 0x59),
            (0x04, 0x23),
            (0x07, 0x31),
            (0x08, 0x12),
        ] {
            wr(&mut rtc, r, v);
        }
        wr(&mut rtc, 0x09, 0x99);
        wr(&mut rtc, 0x32, 0x19);
        wr(&mut rtc, 0x0b, 0x02);
        assert_eq!(CivilTime::from_unix(rtc.unix_now() + 1).year, 2000);
    }

    #[test]
    fn nmi_bit_and_ram() {
        let (_clock, mut rtc) = setup();
        rtc.write(0, &[0x80 | 0x40]);
        assert!(rtc.state().nmi_disabled);
        assert_eq!(rtc.state().index, 0x40);
        rtc.write(1, &[0xab]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        assert_eq!(b[0], 0xab);
        rtc.read(0, &mut b);
        assert_eq!(b[0], 0xff);
        wr(&mut rtc, 0x7f, 0x5a);
        assert!(!rtc.state().nmi_disabled);
        assert_eq!(rd(&mut rtc, 0x7f), 0x5a);
        wr(&mut rtc, 0x01, 0x30); // alarm seconds stored
        assert_eq!(rd(&mut rtc, 0x01), 0x30);
        wr(&mut rtc, 0x0d, 0x00); // read-only
        assert_eq!(rd(&mut rtc, 0x0d), 0x80);
        let st = rtc.state();
        let (_c, mut other) = setup();
        other.set_state(st.clone());
        assert_eq!(other.state(), st);
    }

    #[test]
    fn setting_time_keeps_running() {
        let (clock, mut rtc) = setup();
        wr(&mut rtc, 0x0b, 0x82); // SET, 24h, BCD
        clock.advance_to(5 * NS_PER_SEC);
        // Frozen while SET.
        assert_eq!(rd(&mut rtc, 0x00), 0x00);
        for (r, v) in [(0x09, 0x24), (0x08, 0x02), (0x07, 0x29), (0x04, 0x08)] {
            wr(&mut rtc, r, v);
        }
        wr(&mut rtc, 0x02, 0x30);
        wr(&mut rtc, 0x00, 0x15);
        assert_eq!(rd(&mut rtc, 0x07), 0x29);
        wr(&mut rtc, 0x0b, 0x02);
        assert_eq!(
            fields(&mut rtc),
            [0x15, 0x30, 0x08, 0x05, 0x29, 0x02, 0x24, 0x20]
        );
        clock.advance_to(65 * NS_PER_SEC);
        assert_eq!(rd(&mut rtc, 0x02), 0x31);
        // A direct write with SET clear applies at once; garbage is harmless.
        wr(&mut rtc, 0x04, 0xff);
        assert_eq!(rd(&mut rtc, 0x04), 0x23);
        wr(&mut rtc, 0x08, 0xee);
        assert_eq!(rd(&mut rtc, 0x08), 0x12);
    }
}
