//! Boots a real Linux bzImage when one is provided.
//!
//! `TANDEM_LINUX_KERNEL=/path/to/bzImage` (and optionally
//! `TANDEM_LINUX_INITRD`) enables the test. It needs hardware-backed KVM:
//! the development machines' nested, paravirtual KVM runs guest code in its
//! instruction emulator, which cannot run a stock kernel (see
//! ../shared/GUEST-NOTES.md). Without either, the test prints why it skipped.

mod common;

use std::time::Duration;

fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .any(|l| l.starts_with("flags") && (l.contains(" vmx") || l.contains(" svm")))
        })
        .unwrap_or(false)
}

#[test]
fn boots_a_linux_bzimage_to_its_console() {
    let Some(kernel) = std::env::var_os("TANDEM_LINUX_KERNEL") else {
        println!("skipped: set TANDEM_LINUX_KERNEL to a bzImage to run the Linux boot test");
        return;
    };
    if !hardware_virtualization() {
        println!(
            "skipped: this host's CPU flags show no vmx/svm, so its KVM is nested and \
             paravirtual and cannot boot a stock kernel"
        );
        return;
    }
    let mut cmd = common::tandem();
    cmd.arg("run")
        .arg("--kernel")
        .arg(&kernel)
        .args(["--mem", "256M"])
        // No root fs: the kernel panics after init, and panic=-1 + reboot=k
        // makes it reset through the i8042, which ends the VM with status 0.
        .args([
            "--cmdline",
            "console=ttyS0 earlyprintk=serial,ttyS0 noapic nolapic reboot=k panic=-1 lpj=1000000",
        ]);
    if let Some(initrd) = std::env::var_os("TANDEM_LINUX_INITRD") {
        cmd.arg("--initrd").arg(initrd);
    }
    let f = common::run_command(cmd, None, Duration::from_secs(300));
    assert!(
        f.stdout.contains("Linux version"),
        "no kernel banner on COM1: {f:?}"
    );
    assert!(!f.stderr.contains("panicked"), "{f:?}");
}
