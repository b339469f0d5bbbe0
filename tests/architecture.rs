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
        let all: Vec<&str> = text.lines().collect();
        for (i, line) in all.iter().enumerate() {
            // The test module ends what is checked (a `#[cfg(test)]` item
            // elsewhere, a helper, does not).
            let next = all.get(i + 1).map_or("", |l| l.trim_start());
            if line.trim_start().starts_with("#[cfg(test)]") && next.split(' ').any(|w| w == "mod")
            {
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

// ---------------------------------------------------------------------------
// Layout rules (the restructure): no module import cycles inside a crate, no
// wildcard arm over the wire messages, no unwrap/expect in ft, vmm, replay.

/// The crates and their source roots.
const CRATES: [&str; 7] = [
    "src",
    "ft/src",
    "config/src",
    "vmm/src",
    "devices/src",
    "replay/src",
    "bench/src",
];

/// The module path of `file` under the crate root `root` ("" for the root).
fn module_of(root: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(root).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "main" | "lib")
    ) {
        parts.pop();
    }
    parts.join("::")
}

/// Module paths named in one line of code, resolved against `module` (the
/// file's own module): `crate::a::b`, `super::b`, `super::{b, c}`.
fn references(module: &str, code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (start, _) in code
        .match_indices("crate::")
        .chain(code.match_indices("super::"))
    {
        // Only whole words: not `tandem_crate::` or `my_super::`.
        if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
            continue;
        }
        // `super::super::x` is found from its first `super`.
        if start >= 2 && &code[start - 2..start] == "::" {
            continue;
        }
        let mut base: Vec<&str> = if code[start..].starts_with("crate::") {
            Vec::new()
        } else {
            module.split("::").filter(|p| !p.is_empty()).collect()
        };
        let mut rest = &code[start..];
        let mut first = true;
        loop {
            if let Some(r) = rest.strip_prefix("crate::").filter(|_| first) {
                rest = r;
            } else if let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            } else {
                break;
            }
            first = false;
        }
        let paths: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
            let group = group.split('}').next().unwrap_or("");
            group.split(',').map(|p| p.trim().to_string()).collect()
        } else {
            vec![rest.to_string()]
        };
        for p in paths {
            let mut full = base.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            for seg in p.split("::") {
                let ident: String = seg
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if ident.is_empty() || ident == "self" {
                    break;
                }
                full.push(ident);
            }
            out.push(full.join("::"));
        }
    }
    out
}

/// Module → modules it imports, for the crate at `dir` (edges between a
/// module and its own ancestors or descendants are nesting, not imports).
fn import_graph(
    dir: &str,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let modules: std::collections::BTreeSet<String> =
        files.iter().map(|f| module_of(&root, f)).collect();
    let nested = |a: &str, b: &str| {
        a.is_empty()
            || b.is_empty()
            || a == b
            || a.starts_with(&format!("{b}::"))
            || b.starts_with(&format!("{a}::"))
    };
    let mut graph = std::collections::BTreeMap::<_, std::collections::BTreeSet<String>>::new();
    for (file, _, code) in source_lines(dir) {
        let from = module_of(&root, &file);
        for target in references(&from, &code) {
            // The longest known module the path starts with.
            let mut parts: Vec<&str> = target.split("::").collect();
            while !parts.is_empty() && !modules.contains(&parts.join("::")) {
                parts.pop();
            }
            let to = parts.join("::");
            if !nested(&from, &to) {
                graph.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    graph
}

/// One cycle in `graph`, if there is any.
fn find_cycle(
    graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_import_cycles_inside_a_crate() {
    for dir in CRATES {
        if let Some(cycle) = find_cycle(&import_graph(dir)) {
            panic!(
                "an import cycle in {dir}: {} (move what both need into a module both import)",
                cycle.join(" -> ")
            );
        }
    }
}

#[test]
fn the_cycle_check_finds_a_cycle() {
    // Guard against a vacuous pass: the graph sees real imports, and a
    // cycle put into it is found.
    let mut graph = import_graph("ft/src");
    assert!(
        graph.get("pair").is_some_and(|to| to.contains("wire")),
        "{graph:?}"
    );
    assert!(references("a::b", "use super::{c::D, e};").contains(&"a::c::D".to_string()));
    graph
        .entry("wire".into())
        .or_default()
        .insert("pair".into());
    assert!(find_cycle(&graph).is_some());
}

/// `_ =>` arms in a `match` whose other arms name a wire `Message`
/// (a new message kind must be handled or refused by name, never dropped).
fn wildcard_arms_over_messages(dir: &str) -> Vec<String> {
    let lines = source_lines(dir);
    let mut found = Vec::new();
    for (i, (file, n, code)) in lines.iter().enumerate() {
        let trimmed = code.trim_start();
        if !trimmed.starts_with("_ =>") {
            continue;
        }
        let indent = code.len() - trimmed.len();
        // The arms before it at the same indentation, up to the match.
        let mut names_message = false;
        for (f, _, prev) in lines[..i].iter().rev().take(200) {
            if f != file {
                break;
            }
            let t = prev.trim_start();
            let ind = prev.len() - t.len();
            if ind < indent && !t.is_empty() {
                break;
            }
            let wire = ["Message::", "Reply::", "ToSecondary::", "ToPrimary::"];
            if ind == indent && wire.iter().any(|w| t.contains(w)) {
                names_message = true;
            }
        }
        if names_message {
            found.push(format!("{}:{n}: {}", file.display(), code.trim()));
        }
    }
    found
}

#[test]
fn no_wildcard_arm_over_the_wire_messages() {
    let found = wildcard_arms_over_messages("ft/src");
    assert!(
        found.is_empty(),
        "a `_ =>` arm over wire messages (name the messages this receiver does not expect and refuse them):\n{}",
        found.join("\n")
    );
}

/// `unwrap()`/`expect(` outside tests, each with the allowlist entry that
/// excuses it (file suffix, text on the line, reason).
const UNWRAP_ALLOWED: &[(&str, &str, &str)] = &[
    (
        "ft/src/auth.rs",
        ".expect(\"32 bytes is a valid HKDF-SHA256 output length\")",
        "HKDF-Expand fails only for outputs over 255 blocks; these ask for one",
    ),
    (
        "ft/src/auth.rs",
        ".expect(\"HMAC takes keys of any length\")",
        "HMAC's new_from_slice fails for no key length (keys longer than a block are hashed)",
    ),
];

#[test]
fn no_unwrap_or_expect_outside_tests() {
    let mut found = Vec::new();
    for dir in ["ft/src", "vmm/src", "replay/src"] {
        for (file, n, code) in source_lines(dir) {
            if !(code.contains(".unwrap()") || code.contains(".expect(")) {
                continue;
            }
            let path = file.display().to_string();
            let excused = UNWRAP_ALLOWED
                .iter()
                .any(|(f, text, _why)| path.ends_with(f) && code.contains(text));
            if !excused {
                found.push(format!("{path}:{n}: {}", code.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "unwrap/expect outside tests (return an error, or add an allowlist entry with its reason):\n{}",
        found.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Size rules: no function over 100 lines outside tests, and a file over 800
// lines says why at its top (a `Size:` paragraph in its module comment).

/// Longest non-test function allowed, in lines.
const MAX_FN_LINES: usize = 100;
/// Longest file allowed without a `Size:` reason at its top, in lines.
const MAX_FILE_LINES: usize = 800;

/// `code` without the contents of its string and char literals (braces in
/// format strings are not code).
fn without_literals(code: &str) -> String {
    let mut out = String::new();
    let mut in_str = false;
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_str => {
                chars.next();
            }
            '"' => in_str = !in_str,
            '\'' if !in_str => {
                // A char literal such as '{' (not a lifetime such as 'a).
                let rest: String = chars.clone().take(3).collect();
                if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                } else if rest.starts_with('\\') && rest.chars().nth(2) == Some('\'') {
                    chars.next();
                    chars.next();
                    chars.next();
                }
            }
            _ if in_str => {}
            _ => out.push(c),
        }
    }
    out
}

/// Functions longer than `max` lines in `lines` (one file's non-test code):
/// "file:line: fn name (n lines)".
fn long_functions(lines: &[(PathBuf, usize, String)], max: usize) -> Vec<String> {
    let mut found = Vec::new();
    for (i, (file, n, code)) in lines.iter().enumerate() {
        let t = code.trim_start();
        let Some(at) = t.find("fn ") else { continue };
        let head = &t[..at];
        let is_item = head.split_whitespace().all(|w| {
            matches!(w, "pub" | "const" | "async" | "unsafe" | "extern") || w.starts_with("pub(")
        });
        if !is_item {
            continue;
        }
        let name: String = t[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut opened) = (0i64, false);
        for (f, end, body) in &lines[i..] {
            if f != file {
                break;
            }
            let body = without_literals(body);
            if !opened && body.trim_end().ends_with(';') {
                break; // a declaration, no body
            }
            for c in body.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth <= 0 {
                let len = end - n + 1;
                if len > max {
                    found.push(format!("{}:{n}: fn {name} ({len} lines)", file.display()));
                }
                break;
            }
        }
    }
    found
}

/// Where the function-length rule applies: every crate but the benchmarks.
fn size_checked() -> impl Iterator<Item = &'static str> {
    CRATES.into_iter().filter(|c| *c != "bench/src")
}

#[test]
fn no_function_over_100_lines_outside_tests() {
    let mut found = Vec::new();
    for dir in size_checked() {
        found.extend(long_functions(&source_lines(dir), MAX_FN_LINES));
    }
    assert!(
        found.is_empty(),
        "functions over {MAX_FN_LINES} lines (split them by what they do):\n{}",
        found.join("\n")
    );
}

#[test]
fn the_length_check_measures_functions() {
    let file = PathBuf::from("x.rs");
    let mut lines = vec![(
        file.clone(),
        1,
        "pub(crate) fn long(a: u8) -> String {".to_string(),
    )];
    for i in 0..100 {
        lines.push((
            file.clone(),
            i + 2,
            format!("    let _ = format!(\"{{}}{{\", {i});"),
        ));
    }
    lines.push((file.clone(), 102, "}".to_string()));
    lines.push((file.clone(), 103, "fn short() {}".to_string()));
    lines.push((file.clone(), 104, "fn declared();".to_string()));
    assert_eq!(
        long_functions(&lines, MAX_FN_LINES),
        vec!["x.rs:1: fn long (102 lines)".to_string()]
    );
    assert!(long_functions(&lines, 102).is_empty());
    // And it sees this project's code: some function here is over 30 lines.
    assert!(!long_functions(&source_lines("ft/src"), 30).is_empty());
}

#[test]
fn a_file_over_800_lines_says_why_at_its_top() {
    let mut found = Vec::new();
    let mut files = Vec::new();
    for dir in CRATES {
        rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir), &mut files);
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines = text.lines().count();
        let top: Vec<&str> = text.lines().take_while(|l| l.starts_with("//!")).collect();
        if lines > MAX_FILE_LINES && !top.iter().any(|l| l.contains("Size:")) {
            found.push(format!("{} ({lines} lines)", file.display()));
        }
    }
    assert!(
        found.is_empty(),
        "files over {MAX_FILE_LINES} lines without a `Size:` reason in their module comment:\n{}",
        found.join("\n")
    );
}
