//! Bad input gets one line naming the problem and a non-zero exit status,
//! never a panic or a backtrace.

mod common;

use std::time::Duration;

use common::{assert_clean_error, guest, run_command, tandem};

const LIMIT: Duration = Duration::from_secs(60);
/// `tandem run` could not start the VM.
const START_FAILED: i32 = 3;
/// clap's status for a malformed command line.
const USAGE: i32 = 2;

fn run(args: &[&str]) -> common::Finished {
    let mut cmd = tandem();
    cmd.arg("run").args(args);
    run_command(cmd, None, LIMIT)
}

fn temp_file(name: &str, bytes: &[u8]) -> String {
    let path = std::env::temp_dir().join(format!("tandem-bad-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

#[test]
fn missing_kernel() {
    let f = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_clean_error(
        &f,
        START_FAILED,
        "kernel /nonexistent/vmlinux does not exist",
    );
}

#[test]
fn kernel_that_is_a_directory() {
    let f = run(&["--kernel", "/tmp"]);
    assert_clean_error(&f, START_FAILED, "is not a regular file");
}

#[test]
fn unreadable_kernel_names_the_file() {
    // Root reads anything, so use a FIFO-free trick: a file we cannot open
    // because its path goes through a regular file.
    let file = temp_file("plain", b"x");
    let f = run(&["--kernel", &format!("{file}/kernel")]);
    assert_clean_error(&f, START_FAILED, "does not exist");
}

#[test]
fn file_that_is_no_kernel() {
    let junk = temp_file("junk", &[0x42; 8192]);
    let f = run(&["--kernel", &junk]);
    assert_clean_error(
        &f,
        START_FAILED,
        "neither a Linux bzImage nor an ELF image with a PVH entry note",
    );
    let empty = temp_file("empty", b"");
    let f = run(&["--kernel", &empty]);
    assert_clean_error(&f, START_FAILED, "neither a Linux bzImage");
}

#[test]
fn elf_without_pvh_note() {
    // Any host program is an ELF without a PVH note.
    let f = run(&["--kernel", "/bin/true"]);
    assert_clean_error(&f, START_FAILED, "without a PVH entry note");
}

#[test]
fn truncated_guest_image() {
    let image = std::fs::read(guest("hello")).unwrap();
    for (name, len) in [
        ("third", image.len() / 3),
        ("header", 40),
        ("half", image.len() / 2 + 1),
    ] {
        let cut = temp_file(&format!("cut-{name}.elf"), &image[..len]);
        let f = run(&["--kernel", &cut]);
        assert_clean_error(&f, START_FAILED, &cut);
        assert!(
            f.stderr.contains("is truncated") || f.stderr.contains("cannot load"),
            "{name}: {f:?}"
        );
    }
}

#[test]
fn absurd_memory_sizes() {
    let hello = guest("hello").display().to_string();
    for mem in ["0", "1K", "100G", "4096G"] {
        let f = run(&["--kernel", &hello, "--mem", mem]);
        assert_clean_error(&f, START_FAILED, "guest memory of");
    }
    for mem in ["lots", "-1M", "99999999999999999999G"] {
        let f = run(&["--kernel", &hello, "--mem", mem]);
        assert_eq!(f.status, USAGE, "{mem}: {f:?}");
        assert!(f.stderr.starts_with("error:"), "{mem}: {f:?}");
        assert!(!f.stderr.contains("panicked"), "{mem}: {f:?}");
    }
}

#[test]
fn no_kvm_device() {
    let hello = guest("hello").display().to_string();
    let f = run(&["--kernel", &hello, "--kvm-device", "/nonexistent/kvm"]);
    assert_clean_error(&f, START_FAILED, "/nonexistent/kvm does not exist");
}

#[test]
fn no_permission_on_kvm_device() {
    // Drop to an unprivileged user; /dev/kvm is root-only on these hosts.
    let unprivileged = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !unprivileged {
        println!("skipped: cannot drop privileges with setpriv here");
        return;
    }
    let hello = guest("hello");
    let copy = std::env::temp_dir().join(format!("tandem-hello-{}.elf", std::process::id()));
    std::fs::copy(&hello, &copy).unwrap();
    let bin = std::env::temp_dir().join(format!("tandem-bin-{}", std::process::id()));
    std::fs::copy(env!("CARGO_BIN_EXE_tandem"), &bin).unwrap();
    let kvm = tandem_kvm_path();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args(["run", "--kernel"])
        .arg(&copy)
        .args(["--kvm-device", &kvm])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let f = run_command(cmd, None, LIMIT);
    let _ = std::fs::remove_file(copy);
    let _ = std::fs::remove_file(bin);
    assert_clean_error(&f, START_FAILED, &format!("no permission to open {kvm}"));
}

/// A KVM device node nobody but root may open: /dev/kvm if it is root-only,
/// else a private copy of the node.
fn tandem_kvm_path() -> String {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata("/dev/kvm")
        .map(|m| m.permissions().mode())
        .unwrap_or(0);
    if mode & 0o006 == 0 {
        return "/dev/kvm".into();
    }
    let node = std::env::temp_dir().join(format!("tandem-kvm-{}", std::process::id()));
    let status = std::process::Command::new("mknod")
        .arg(&node)
        .args(["c", "10", "232"])
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
    node.display().to_string()
}

#[test]
fn unknown_serial_target() {
    let hello = guest("hello").display().to_string();
    let f = run(&["--kernel", &hello, "--serial", "tcp:1234"]);
    assert_eq!(f.status, USAGE, "{f:?}");
    assert!(
        f.stderr.contains("expected `stdio` or `file:PATH`"),
        "{f:?}"
    );
}
