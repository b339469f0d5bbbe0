//! The VM identity in the log header.
//!
//! Replay is only sound on the same guest: the same kernel image, command
//! line, memory size, devices, CPUID table, MSR list and device-model
//! version. The recorder writes a [`VmIdentity`] into the header; the
//! replayer builds its own from its configuration and refuses to run when
//! [`VmIdentity::mismatch`] names a difference.

use std::fmt::Debug;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The sha256 of a kernel image, for [`VmIdentity::image_hash`].
pub fn image_hash(image: &[u8]) -> [u8; 32] {
    Sha256::digest(image).into()
}

/// One device of the VM, as the identity names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDesc {
    /// The device kind, e.g. "uart", "virtio-blk".
    pub kind: String,
    /// Whatever else decides what the guest sees (address, IRQ, size, MAC).
    pub detail: String,
}

/// One CPUID entry the guest sees (as in `kvm_cpuid_entry2`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    /// Leaf (EAX on input).
    pub function: u32,
    /// Subleaf (ECX on input).
    pub index: u32,
    /// KVM_CPUID_FLAG_* bits.
    pub flags: u32,
    /// Output EAX.
    pub eax: u32,
    /// Output EBX.
    pub ebx: u32,
    /// Output ECX.
    pub ecx: u32,
    /// Output EDX.
    pub edx: u32,
}

/// What makes two VMs the same guest, written in the log header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// sha256 of the kernel image ([`image_hash`]).
    pub image_hash: [u8; 32],
    /// The image's name, for messages only.
    pub image_name: String,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// The devices, in creation order.
    pub devices: Vec<DeviceDesc>,
    /// The CPUID table given to the vCPU.
    pub cpuid: Vec<CpuidEntry>,
    /// The MSR indices the guest can see (and sync points capture).
    pub msrs: Vec<u32>,
    /// Version of tandem's device models; bumped when one changes behaviour.
    pub device_model_version: u32,
    /// The guest's TSC frequency in kHz.
    pub tsc_khz: u32,
    /// Wall-clock time (Unix seconds) the RTC started from at VM creation.
    pub rtc_base_unix_secs: u64,
    /// The position counter that placed the log's positioned stops and its
    /// fingerprint (`kvm-insn-stat; ...`), or empty: none, every interrupt
    /// at a sync point. Written only in an identity of version 2, so a log
    /// without positions stays readable by older builds.
    #[serde(skip)]
    pub position: String,
}

impl VmIdentity {
    /// Names the first field in which the VM about to replay (`other`)
    /// differs from this recorded identity, or None when replay may start.
    ///
    /// Compared: image hash, command line, memory size, devices, CPUID
    /// table, MSR list, device-model version and TSC frequency. Not
    /// compared: the image *name* (a renamed file is the same image) and the
    /// RTC base, which the replayer adopts from the log.
    pub fn mismatch(&self, other: &VmIdentity) -> Option<String> {
        if self.image_hash != other.image_hash {
            return Some(format!(
                "kernel image: the log was recorded with {} (sha256 {}), this VM has {} (sha256 {})",
                self.image_name,
                hex(&self.image_hash),
                other.image_name,
                hex(&other.image_hash)
            ));
        }
        differ("command line", &self.cmdline, &other.cmdline)
            .or_else(|| differ("memory size", &self.mem_size, &other.mem_size))
            .or_else(|| list_differ("device", &self.devices, &other.devices))
            .or_else(|| list_differ("CPUID entry", &self.cpuid, &other.cpuid))
            .or_else(|| list_differ("MSR", &self.msrs, &other.msrs))
            .or_else(|| {
                differ(
                    "device-model version",
                    &self.device_model_version,
                    &other.device_model_version,
                )
            })
            .or_else(|| differ("TSC kHz", &self.tsc_khz, &other.tsc_khz))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn differ<T: PartialEq + Debug>(what: &str, log: &T, this: &T) -> Option<String> {
    (log != this).then(|| format!("{what}: the log has {log:?}, this VM has {this:?}"))
}

fn list_differ<T: PartialEq + Debug>(what: &str, log: &[T], this: &[T]) -> Option<String> {
    if let Some((i, (a, b))) = log.iter().zip(this).enumerate().find(|(_, (a, b))| a != b) {
        return Some(format!("{what} {i}: the log has {a:?}, this VM has {b:?}"));
    }
    (log.len() != this.len()).then(|| {
        format!(
            "{what} count: the log has {}, this VM has {}",
            log.len(),
            this.len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> VmIdentity {
        VmIdentity {
            image_hash: image_hash(b"kernel"),
            image_name: "bzImage".into(),
            cmdline: "console=ttyS0".into(),
            mem_size: 32 << 20,
            devices: vec![DeviceDesc {
                kind: "uart".into(),
                detail: "0x3f8 irq 4".into(),
            }],
            cpuid: vec![CpuidEntry {
                function: 1,
                index: 0,
                flags: 0,
                eax: 0x806c1,
                ebx: 0,
                ecx: 0x8000_0000,
                edx: 0x0789_fbff,
            }],
            msrs: vec![0x10, 0x174],
            device_model_version: 1,
            tsc_khz: 2_000_000,
            rtc_base_unix_secs: 1_700_000_000,
            position: String::new(),
        }
    }

    #[test]
    fn the_same_identity_matches() {
        assert_eq!(identity().mismatch(&identity()), None);
    }

    #[test]
    fn name_and_rtc_base_do_not_matter() {
        let mut other = identity();
        other.image_name = "renamed".into();
        other.rtc_base_unix_secs = 0;
        assert_eq!(identity().mismatch(&other), None);
    }

    #[test]
    fn each_field_is_named() {
        type Change = fn(&mut VmIdentity);
        let cases: Vec<(Change, &str)> = vec![
            (|v| v.image_hash = image_hash(b"other"), "kernel image"),
            (|v| v.cmdline.push_str(" quiet"), "command line"),
            (|v| v.mem_size *= 2, "memory size"),
            (|v| v.devices[0].detail = "0x2f8".into(), "device 0"),
            (|v| v.devices.clear(), "device count"),
            (|v| v.cpuid[0].ecx = 0, "CPUID entry 0"),
            (|v| v.msrs.push(0x1b), "MSR count"),
            (|v| v.device_model_version = 2, "device-model version"),
            (|v| v.tsc_khz = 1, "TSC kHz"),
        ];
        for (change, name) in cases {
            let mut other = identity();
            change(&mut other);
            let why = identity().mismatch(&other).expect(name);
            assert!(why.starts_with(name), "{why} should name {name}");
        }
    }

    #[test]
    fn the_image_hash_is_sha256() {
        assert_eq!(
            hex(&image_hash(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
