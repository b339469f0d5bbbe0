//! The legacy PC devices and the one place that knows their port numbers.

use std::io::Write;
use std::sync::{Arc, Mutex};

use tandem_devices::debug_exit::DebugExit;
use tandem_devices::i8042::I8042;
use tandem_devices::pic::{Pic, PicBus, PicPort};
use tandem_devices::pit::Pit;
use tandem_devices::rtc::Rtc;
use tandem_devices::scratch::Scratch;
use tandem_devices::serial::Serial;
use tandem_devices::{BusDevice, IrqLine, SharedDevice, VmRequest};
use tandem_replay::{Clock, GuestClock};

use crate::bus::{Bus, BusError};

/// Master PIC command/data ports (Intel 8259A datasheet; PC/AT layout).
pub const PIC_MASTER_BASE: u64 = 0x20;
/// Slave PIC ports.
pub const PIC_SLAVE_BASE: u64 = 0xa0;
/// Each PIC has a command and a data port.
pub const PIC_PORTS: u64 = 2;
/// ELCR (edge/level control) registers, one per PIC.
pub const ELCR_BASE: u64 = 0x4d0;
/// Both ELCR bytes.
pub const ELCR_PORTS: u64 = 2;
/// i8254 PIT: three counters and the mode/command register.
pub const PIT_BASE: u64 = 0x40;
/// PIT ports.
pub const PIT_PORTS: u64 = 4;
/// i8042 data (0x60) through command/status (0x64).
pub const I8042_BASE: u64 = 0x60;
/// i8042 window.
pub const I8042_PORTS: u64 = 5;
/// CMOS index and data.
pub const RTC_BASE: u64 = 0x70;
/// CMOS ports.
pub const RTC_PORTS: u64 = 2;
/// POST diagnostic port, written by firmware and kernels as an I/O delay.
pub const POST_CODE_PORT: u64 = 0x80;
/// tandem's debug-exit port (as QEMU's isa-debug-exit at iobase 0xf4).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// The test scratch register used by the `piostorm` guest.
pub const SCRATCH_BASE: u64 = 0x600;
/// COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// 8250 register window.
pub const COM1_PORTS: u64 = 8;
/// COM1's ISA interrupt.
pub const COM1_IRQ: u8 = 4;
/// The PIT's interrupt.
pub const PIT_IRQ: u8 = 0;

/// Port 0x80: writes are dropped, reads return all ones.
struct PostCode;

impl BusDevice for PostCode {
    fn name(&self) -> &'static str {
        "post-code"
    }
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) -> Option<VmRequest> {
        None
    }
}

/// The legacy devices of one VM.
pub struct LegacyDevices {
    /// The PIC pair.
    pub pic: Arc<Mutex<Pic>>,
    /// The PIT.
    pub pit: Arc<Mutex<Pit>>,
    /// COM1.
    pub serial: Arc<Mutex<Serial>>,
    /// The CMOS RTC.
    pub rtc: Arc<Mutex<Rtc>>,
    /// The i8042 (reset line only).
    pub i8042: Arc<Mutex<I8042>>,
    /// The debug-exit port.
    pub debug_exit: Arc<Mutex<DebugExit>>,
    /// The test scratch register.
    pub scratch: Arc<Mutex<Scratch>>,
    /// The guest watchdog (device-model version 3 on).
    pub watchdog: Arc<Mutex<tandem_devices::watchdog::Watchdog>>,
    /// The device-model version the devices behave as.
    pub device_model: u32,
}

impl LegacyDevices {
    /// Creates the devices; `rtc_base_unix_secs` is the wall time at VM
    /// creation, fixed for the VM's life.
    pub fn new(
        clock: &GuestClock,
        rtc_base_unix_secs: u64,
        serial_out: Box<dyn Write + Send>,
        device_model: u32,
    ) -> Self {
        let pic = Arc::new(Mutex::new(Pic::new()));
        let clock: Arc<dyn Clock> = Arc::new(clock.clone());
        let pit = Pit::new(clock.clone(), IrqLine::new(pic.clone(), PIT_IRQ));
        let watchdog = tandem_devices::watchdog::Watchdog::new(clock.clone());
        let serial = Serial::new(IrqLine::new(pic.clone(), COM1_IRQ), serial_out);
        Self {
            pit: Arc::new(Mutex::new(pit)),
            serial: Arc::new(Mutex::new(serial)),
            rtc: Arc::new(Mutex::new(Rtc::new(clock, rtc_base_unix_secs))),
            i8042: Arc::new(Mutex::new(I8042::new())),
            debug_exit: Arc::new(Mutex::new(DebugExit::new())),
            scratch: Arc::new(Mutex::new(Scratch::with_model(device_model))),
            pic,
            watchdog: Arc::new(Mutex::new(watchdog)),
            device_model,
        }
    }

    /// Puts every device on the port bus.
    pub fn register(&self, bus: &mut Bus) -> Result<(), BusError> {
        let pic_port =
            |port| -> SharedDevice { Arc::new(Mutex::new(PicBus::new(self.pic.clone(), port))) };
        bus.insert(pic_port(PicPort::Master), PIC_MASTER_BASE, PIC_PORTS)?;
        bus.insert(pic_port(PicPort::Slave), PIC_SLAVE_BASE, PIC_PORTS)?;
        bus.insert(pic_port(PicPort::Elcr), ELCR_BASE, ELCR_PORTS)?;
        bus.insert(self.pit.clone(), PIT_BASE, PIT_PORTS)?;
        bus.insert(self.i8042.clone(), I8042_BASE, I8042_PORTS)?;
        bus.insert(self.rtc.clone(), RTC_BASE, RTC_PORTS)?;
        bus.insert(Arc::new(Mutex::new(PostCode)), POST_CODE_PORT, 1)?;
        bus.insert(self.debug_exit.clone(), DEBUG_EXIT_PORT, 1)?;
        let scratch_ports = tandem_devices::lock(&self.scratch).ports();
        bus.insert(self.scratch.clone(), SCRATCH_BASE, scratch_ports)?;
        if self.device_model >= 3 {
            bus.insert(
                Arc::new(Mutex::new(tandem_devices::pvpanic::PvPanic)),
                tandem_devices::pvpanic::PVPANIC_PORT,
                1,
            )?;
            bus.insert(
                self.watchdog.clone(),
                tandem_devices::watchdog::WATCHDOG_PORT,
                4,
            )?;
        }
        bus.insert(self.serial.clone(), COM1_BASE, COM1_PORTS)?;
        Ok(())
    }
}
