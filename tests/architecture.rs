//! Review checks of the determinism contract that the compiler cannot make.
//!
//! 1. Device models never read a clock, a file, a socket or a thread's
//!    result: everything from outside reaches them as a `Cause` through the
//!    `Inputs` port, and leaves as an `Output`.
//! 2. Worker threads (the live backends) never touch guest memory: only the
//!    vCPU thread, through the device models, writes it.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Non-test source lines of every `.rs` file under `dir` (a `#[cfg(test)]`
/// module and files named `*tests.rs`/`testutil.rs` are test code).
fn source_lines(dir: &str) -> Vec<(PathBuf, usize, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut lines = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with("tests.rs") || name == "testutil.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("#[cfg(test)]") {
                break;
            }
            let code = line.split("//").next().unwrap_or("").to_string();
            lines.push((file.clone(), i + 1, code));
        }
    }
    lines
}

fn violations(dir: &str, banned: &[&str]) -> Vec<String> {
    source_lines(dir)
        .into_iter()
        .flat_map(|(file, n, code)| {
            banned
                .iter()
                .filter(|b| code.contains(*b))
                .map(|b| format!("{}:{n}: `{b}` in {code:?}", file.display()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn devices_get_the_outside_world_only_through_inputs() {
    let banned = [
        "Instant::now",
        "SystemTime",
        "std::time",
        "std::fs",
        "std::net",
        "File::",
        "UdpSocket",
        "TcpStream",
        "thread::spawn",
        "std::thread",
        "libc::",
        "stdin",
        "RawFd",
        "AsRawFd",
        "mpsc",
    ];
    let found = violations("devices/src", &banned);
    assert!(
        found.is_empty(),
        "device code reaching outside the Inputs port:\n{}",
        found.join("\n")
    );
}

#[test]
fn worker_threads_never_touch_guest_memory() {
    let banned = [
        "GuestMemory",
        "GuestAddress",
        "write_obj",
        "write_slice",
        "vm_memory",
        "tandem_devices",
        "MmioTransport",
    ];
    let found = violations("vmm/src/backend", &banned);
    assert!(
        found.is_empty(),
        "backend code touching guest memory or devices:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checks_themselves_see_the_code() {
    // Guard against a vacuous pass: the scans must find real code.
    assert!(source_lines("devices/src").len() > 1000);
    assert!(!violations("vmm/src/backend", &["thread::Builder"]).is_empty());
    assert!(!violations("devices/src", &["fn read("]).is_empty());
}
