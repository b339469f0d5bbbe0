//! The pair file's tests: every key's default and refusal, by section, and
//! a property test that no input panics the parser.
//!
//! Size: over 800 lines because each refusal is one short test with its
//! exact message (the operator's contract); split by section if it grows.

use std::net::{IpAddr, Ipv4Addr};

use super::*;

/// Every key, as in docs/pair-config.md.
const FULL: &str = r#"[vm]
name = "web1"
kernel = "/path/netecho.elf"
initrd = "/path/initrd"
cmdline = "ip=10.0.0.2"
mem = "32M"
disk = ["/shared/disk.img", "/shared/seed.img,ro"]
net = [{ mac = "52:54:00:12:34:56" }, {}]
console = "unix:/run/tandem/web1.sock"

[hosts]
a = { address = "10.10.0.1:7400", tap = ["tap0", "tap1"], control = "unix:/run/tandem/a.ctl" }
b = { address = "10.10.0.2:7400", tap = ["tap2", "tap3"] }

[ft]
heartbeat_ms = 50
failover_timeout_ms = 1000
output_commit = "replayed"
storage = "shared"
witness = "tcp://10.10.0.3:7500"
state_dir = "/srv/tandem/web1"
fence_command = "ipmitool -H bmc-peer power off"
max_unacked_bytes = "128M"
max_lag_ms = 250
max_replay_lag_ms = 1500
announce_rounds = 3
announce_initial_ms = 10
announce_step_ms = 20
announce_max_ms = 40
psk_file = "/etc/tandem/web1.psk"
socket_group = "root"
"#;

/// The smallest valid file; `[ft]` is on line 8, so a key added by [`ft`]
/// is on line 9.
const MINIMAL: &str = r#"[vm]
kernel = "/k"

[hosts]
a = { address = "10.10.0.1:7400" }
b = { address = "10.10.0.2:7400" }

[ft]
"#;

/// MINIMAL with `lines` in `[ft]`, from line 9.
fn ft(lines: &str) -> String {
    format!("{MINIMAL}{lines}\n")
}

/// A file with `lines` in `[vm]` from line 3, and `hosts` as `[hosts]` from line 5.
fn vm_hosts(lines: &str, hosts: &str) -> String {
    format!("[vm]\nkernel = \"/k\"\n{lines}\n[hosts]\n{hosts}\n")
}

/// The one-line message of the error parsing `text` as pair.toml.
fn err(text: &str) -> String {
    match parse(text, "pair.toml") {
        Ok(cfg) => panic!("accepted:\n{text}\nas {cfg:?}"),
        Err(e) => e.to_string(),
    }
}

fn ok(text: &str) -> PairConfig {
    parse(text, "pair.toml").unwrap_or_else(|e| panic!("{e}"))
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn full_file_gives_typed_values() {
    let cfg = ok(FULL);
    let expected = PairConfig {
        vm: VmConfigSection {
            name: "web1".into(),
            kernel: "/path/netecho.elf".into(),
            initrd: Some("/path/initrd".into()),
            cmdline: "ip=10.0.0.2".into(),
            mem: 32 << 20,
            disks: vec![
                DiskConfig {
                    path: "/shared/disk.img".into(),
                    read_only: false,
                },
                DiskConfig {
                    path: "/shared/seed.img".into(),
                    read_only: true,
                },
            ],
            nics: vec![
                Nic {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                },
                Nic {
                    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x57],
                },
            ],
            console: Some("/run/tandem/web1.sock".into()),
            device_model: None,
        },
        hosts: [
            HostEntry {
                address: addr("10.10.0.1:7400"),
                taps: vec!["tap0".into(), "tap1".into()],
                control: Some("/run/tandem/a.ctl".into()),
                disks: None,
            },
            HostEntry {
                address: addr("10.10.0.2:7400"),
                taps: vec!["tap2".into(), "tap3".into()],
                control: None,
                disks: None,
            },
        ],
        ft: FtConfig {
            heartbeat: Duration::from_millis(50),
            failover_timeout: Duration::from_millis(1000),
            output_commit: OutputCommit::Replayed,
            storage: Storage::Shared,
            witness: Some(Witness::Tcp(addr("10.10.0.3:7500"))),
            state_dir: "/srv/tandem/web1".into(),
            fence_command: Some("ipmitool -H bmc-peer power off".into()),
            respawn: None,
            psk_file: Some("/etc/tandem/web1.psk".into()),
            witness_key_file: None,
            etcd: EtcdAccess::default(),
            position: tandem_vmm::position::PositionChoice::None,
            irq_defer: Duration::ZERO,
            encrypt: true,
            verify_peer_address: true,
            socket_group: Some(0),
            on_guest_crash: tandem_vmm::CrashPolicy::Reboot,
            max_unacked_bytes: 128 << 20,
            max_lag: Duration::from_millis(250),
            max_replay_lag: Duration::from_millis(1500),
            announce: Announce {
                rounds: 3,
                initial: Duration::from_millis(10),
                step: Duration::from_millis(20),
                max: Duration::from_millis(40),
            },
        },
    };
    assert_eq!(cfg, expected);
    assert_eq!(
        cfg.net_configs(HostId::B),
        vec![
            NetConfig {
                tap: "tap2".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
            },
            NetConfig {
                tap: "tap3".into(),
                mac: Some([0x52, 0x54, 0, 0x12, 0x34, 0x57]),
            },
        ]
    );
}

#[test]
fn defaults_apply() {
    // No [ft] at all.
    let text = MINIMAL.trim_end().strip_suffix("[ft]").unwrap();
    let cfg = parse(text, "/etc/tandem/db2.toml").unwrap();
    assert_eq!(cfg.vm.name, "db2");
    assert_eq!(cfg.vm.mem, 64 << 20);
    assert_eq!(cfg.vm.cmdline, "");
    assert_eq!((cfg.vm.initrd, cfg.vm.console), (None, None));
    assert!(cfg.vm.disks.is_empty() && cfg.vm.nics.is_empty());
    assert!(cfg.hosts[0].taps.is_empty() && cfg.hosts[1].control.is_none());
    let ft = cfg.ft;
    assert_eq!(ft.heartbeat, Duration::from_millis(100));
    assert_eq!(ft.failover_timeout, Duration::from_millis(2000));
    assert_eq!(ft.output_commit, OutputCommit::Received);
    assert_eq!(ft.storage, Storage::Shared);
    assert_eq!(ft.witness, None);
    assert_eq!(ft.state_dir, PathBuf::from("/var/lib/tandem/db2"));
    assert_eq!(ft.fence_command, None);
    assert_eq!(ft.max_unacked_bytes, 64 << 20);
    assert_eq!(ft.max_lag, Duration::from_millis(500));
    assert_eq!(ft.max_replay_lag, Duration::from_millis(2000));
    assert_eq!(ft.announce, DEFAULT_ANNOUNCE);
    // An empty [ft] is the same.
    assert_eq!(ok(MINIMAL).ft.announce, DEFAULT_ANNOUNCE);
}

#[test]
fn announce_delays_back_off_to_max() {
    let delays: Vec<u128> = (0..DEFAULT_ANNOUNCE.rounds)
        .map(|r| DEFAULT_ANNOUNCE.delay_after(r).as_millis())
        .collect();
    assert_eq!(delays, [50, 150, 250, 350, 450]);
    let short = Announce {
        max: Duration::from_millis(200),
        ..DEFAULT_ANNOUNCE
    };
    assert_eq!(short.delay_after(4), Duration::from_millis(200));
}

#[test]
fn missing_sections() {
    assert_eq!(
        err("[vm]\nkernel = \"/k\"\n"),
        "pair.toml: missing section [hosts]"
    );
    assert_eq!(
        err("[hosts]\na = { address = \"10.10.0.1:1\" }\n"),
        "pair.toml: missing section [vm]"
    );
}

#[test]
fn missing_keys_name_their_section_line() {
    assert_eq!(
        err("[hosts]\na = { address = \"10.10.0.1:1\" }\nb = { address = \"10.10.0.2:1\" }\n\n[vm]\nname = \"x\"\n"),
        "pair.toml:5: [vm] missing key kernel: the guest kernel image to boot"
    );
    let e = err(&vm_hosts("", "a = { address = \"10.10.0.1:1\" }"));
    assert!(e.starts_with("pair.toml:4: [hosts] missing key b: "), "{e}");
    let e = err(&vm_hosts(
        "",
        "a = { address = \"10.10.0.1:1\" }\nb = { tap = \"t\" }",
    ));
    assert!(
        e.starts_with("pair.toml:6: [hosts] missing key b.address: "),
        "{e}"
    );
}

#[test]
fn unknown_key_at_top_level() {
    let e = err(&format!("fx = 1\n{MINIMAL}"));
    assert!(
        e.starts_with("pair.toml:1: unknown field `fx`, expected one of `vm`, `hosts`, `ft`"),
        "{e}"
    );
    let e = err(&format!("{MINIMAL}\n[fence]\ncommand = \"x\"\n"));
    assert!(e.starts_with("pair.toml:10: unknown field `fence`"), "{e}");
    let e = err(&format!("{MINIMAL}\n[ft.extra]\n"));
    assert!(
        e.starts_with("pair.toml:10: [ft] unknown field `extra`"),
        "{e}"
    );
}

#[test]
fn unknown_key_in_sections() {
    let e = err(&ft("heartbeat_ms = 100\nheartbeet_ms = 100"));
    assert!(
        e.starts_with(
            "pair.toml:10: [ft] unknown field `heartbeet_ms`, expected one of `heartbeat_ms`"
        ),
        "{e}"
    );
    let e = err(&vm_hosts("memory = \"1G\"", ""));
    assert!(
        e.starts_with("pair.toml:3: [vm] unknown field `memory`"),
        "{e}"
    );
    let e = err(&vm_hosts(
        "",
        "a = { address = \"10.10.0.1:1\", tapp = \"t\" }",
    ));
    assert!(
        e.starts_with("pair.toml:5: [hosts] unknown field `tapp`"),
        "{e}"
    );
    let e = err(&vm_hosts(
        "net = [{ mac = \"52:54:00:00:00:01\", tap = \"t\" }]",
        "",
    ));
    assert!(
        e.starts_with("pair.toml:3: [vm] unknown field `tap`, expected `mac`"),
        "{e}"
    );
    let e = err(&vm_hosts("", "c = { address = \"10.10.0.3:1\" }"));
    assert!(
        e.starts_with("pair.toml:5: [hosts] unknown field `c`, expected `a` or `b`"),
        "{e}"
    );
}

#[test]
fn type_errors_name_key_and_line() {
    assert_eq!(
        err(&ft("heartbeat_ms = \"100\"")),
        "pair.toml:9: [ft] heartbeat_ms: invalid type: string \"100\", expected u64"
    );
    assert_eq!(
        err(&ft("max_lag_ms = -1")),
        "pair.toml:9: [ft] max_lag_ms: invalid value: integer `-1`, expected u64"
    );
    assert_eq!(
        err(&vm_hosts("mem = true", "")),
        "pair.toml:3: [vm] mem: invalid type: boolean `true`, expected a size like \"64M\" or a number of bytes"
    );
}

#[test]
fn syntax_error_has_line() {
    let e = err(&ft("witness = \"tcp://10.10.0.3:7500"));
    assert!(e.starts_with("pair.toml:9: "), "{e}");
    let e = err(&vm_hosts("cmdline = \"a\"\ncmdline = \"b\"", ""));
    assert_eq!(e, "pair.toml:4: [vm] cmdline: duplicate key");
}

#[test]
fn bad_addresses() {
    let hosts =
        |a: &str| format!("a = {{ address = \"{a}\" }}\nb = {{ address = \"10.10.0.2:7400\" }}");
    assert_eq!(
        err(&vm_hosts("", &hosts("10.10.0.1"))),
        "pair.toml:5: [hosts] a.address = \"10.10.0.1\" is not IP:PORT (like \"10.10.0.1:7400\"; host names are not accepted)"
    );
    let e = err(&vm_hosts("", &hosts("node-a:7400")));
    assert!(
        e.starts_with("pair.toml:5: [hosts] a.address = \"node-a:7400\" is not IP:PORT"),
        "{e}"
    );
    let e = err(&vm_hosts("", &hosts("10.10.0.1:0")));
    assert!(
        e.ends_with("a.address = \"10.10.0.1:0\" needs a port other than 0"),
        "{e}"
    );
    let e = err(&vm_hosts("", &hosts("0.0.0.0:7400")));
    assert!(
        e.ends_with("is not an address a peer can connect to"),
        "{e}"
    );
    // IPv6 is fine.
    let cfg = ok(&vm_hosts("", &hosts("[fd00::1]:7400")));
    assert_eq!(cfg.hosts[0].address, addr("[fd00::1]:7400"));
}

#[test]
fn both_hosts_on_one_address() {
    let text = vm_hosts(
        "",
        "a = { address = \"10.10.0.1:7400\" }\n\nb = { address = \"10.10.0.1:7400\" }",
    );
    assert_eq!(
        err(&text),
        "pair.toml:7: [hosts] b.address = \"10.10.0.1:7400\" is also a.address; the two hosts need distinct addresses"
    );
    // One machine, two ports: allowed (tests run pairs on localhost).
    ok(&vm_hosts(
        "",
        "a = { address = \"127.0.0.1:7400\" }\nb = { address = \"127.0.0.1:7401\" }",
    ));
}

#[test]
fn failover_timeout_must_exceed_twice_heartbeat() {
    assert_eq!(
        err(&ft("heartbeat_ms = 100\nfailover_timeout_ms = 100")),
        "pair.toml:10: [ft] failover_timeout_ms = 100 must be more than twice heartbeat_ms (100)"
    );
    assert!(
        err(&ft("heartbeat_ms = 100\nfailover_timeout_ms = 200")).contains("= 200 must be more")
    );
    ok(&ft("heartbeat_ms = 100\nfailover_timeout_ms = 201"));
    // A heartbeat that makes the default timeout too short points at itself.
    assert_eq!(
        err(&ft("\nheartbeat_ms = 1000")),
        "pair.toml:10: [ft] failover_timeout_ms = 2000 (the default) must be more than twice heartbeat_ms (1000)"
    );
    assert_eq!(
        err(&ft("heartbeat_ms = 0")),
        "pair.toml:9: [ft] heartbeat_ms = 0 must be at least 1"
    );
}

#[test]
fn bad_macs() {
    assert_eq!(
        err(&vm_hosts("net = [{ mac = \"52:54:00:12:34\" }]", "")),
        "pair.toml:3: [vm] net[0].mac = \"52:54:00:12:34\" is not a MAC address (like \"52:54:00:12:34:56\")"
    );
    let e = err(&vm_hosts(
        "net = [\n  {},\n  { mac = \"52:54:00:zz:34:56\" },\n]",
        "",
    ));
    assert!(
        e.starts_with("pair.toml:5: [vm] net[1].mac = \"52:54:00:zz:34:56\" is not a MAC"),
        "{e}"
    );
    assert_eq!(
        err(&vm_hosts("net = [{ mac = \"01:00:5e:00:00:01\" }]", "")),
        "pair.toml:3: [vm] net[0].mac = \"01:00:5e:00:00:01\" is a multicast address; a NIC needs a unicast MAC"
    );
    assert_eq!(
        err(&vm_hosts("net = [{ mac = \"00:00:00:00:00:00\" }]", "")),
        "pair.toml:3: [vm] net[0].mac = \"00:00:00:00:00:00\" is all zeros; a NIC needs a real MAC"
    );
    assert_eq!(
        err(&vm_hosts("net = [{ mac = \"ff:ff:ff:ff:ff:ff\" }]", "")),
        "pair.toml:3: [vm] net[0].mac = \"ff:ff:ff:ff:ff:ff\" is the broadcast address; a NIC needs a unicast MAC"
    );
    let e = err(&vm_hosts(
        "net = [{ mac = \"52:54:00:12:34:57\" }, {}]",
        "a = { address = \"10.10.0.1:1\", tap = [\"t0\", \"t1\"] }\nb = { address = \"10.10.0.2:1\", tap = [\"t0\", \"t1\"] }",
    ));
    assert!(e.ends_with("has the same MAC as net[0]"), "{e}");
}

#[test]
fn sizes() {
    assert_eq!(
        err(&vm_hosts("mem = \"64X\"", "")),
        "pair.toml:3: [vm] mem = \"64X\" is not a size (examples: \"64M\", \"1G\", 67108864)"
    );
    assert_eq!(
        err(&vm_hosts("mem = \"1M\"", "")),
        "pair.toml:3: [vm] mem = \"1M\" is out of range (2M to 3G)"
    );
    assert_eq!(
        err(&vm_hosts("mem = \"4G\"", "")),
        "pair.toml:3: [vm] mem = \"4G\" is out of range (2M to 3G)"
    );
    let e = err(&vm_hosts("mem = \"99999999999G\"", ""));
    assert!(e.ends_with("is too large"), "{e}");
    let hosts = "a = { address = \"10.10.0.1:1\" }\nb = { address = \"10.10.0.2:1\" }";
    assert_eq!(ok(&vm_hosts("mem = 33554432", hosts)).vm.mem, 32 << 20);
    assert_eq!(ok(&vm_hosts("mem = \"65536k\"", hosts)).vm.mem, 64 << 20);
    assert_eq!(
        ok(&ft("max_unacked_bytes = \"1G\"")).ft.max_unacked_bytes,
        1 << 30
    );
    assert_eq!(
        err(&ft("max_unacked_bytes = 4096")),
        "pair.toml:9: [ft] max_unacked_bytes = 4096 must be at least 1M"
    );
}

#[test]
fn storage_and_output_commit() {
    assert_eq!(
        ok(&ft("storage = \"mirrored\"")).ft.storage,
        Storage::Mirrored
    );
    assert_eq!(
        err(&ft("storage = \"nfs\"")),
        "pair.toml:9: [ft] storage = \"nfs\" must be \"shared\" or \"mirrored\""
    );
    assert_eq!(
        err(&ft("output_commit = \"sent\"")),
        "pair.toml:9: [ft] output_commit = \"sent\" must be \"received\" or \"replayed\""
    );
}

#[test]
fn mirrored_replicas_are_per_host_and_one_per_disk() {
    let file = |storage: &str, a_disk: &str| {
        format!(
            "[vm]\nkernel = \"/k\"\ndisk = [\"/d/web1.img\", \"/d/logs.img,ro\"]\n[hosts]\n\
             a = {{ address = \"10.10.0.1:1\"{a_disk} }}\nb = {{ address = \"10.10.0.2:1\" }}\n\
             [ft]\nstorage = \"{storage}\"\n"
        )
    };
    let cfg = ok(&file(
        "mirrored",
        ", disk = [\"/a/web1.img\", \"/a/logs.img\"]",
    ));
    let a = cfg.disk_configs(HostId::A);
    assert_eq!(a[0].path, PathBuf::from("/a/web1.img"));
    assert!(a[1].read_only, "read-only comes from [vm] disk");
    assert_eq!(
        cfg.disk_configs(HostId::B),
        cfg.vm.disks,
        "no entry: [vm] disk"
    );
    assert_eq!(
        err(&file("shared", ", disk = [\"/a/web1.img\", \"/a/logs.img\"]")),
        "pair.toml:5: [hosts] a.disk = [\"/a/web1.img\", \"/a/logs.img\"] is only for storage = \"mirrored\" (with shared storage both hosts use [vm] disk)"
    );
    assert_eq!(
        err(&file("mirrored", ", disk = [\"/a/web1.img\"]")),
        "pair.toml:5: [hosts] a.disk = [\"/a/web1.img\"] names 1 replica(s) but [vm] disk has 2 disk(s); give one per disk, same order"
    );
}

#[test]
fn device_model_pins_a_version_this_build_runs() {
    let hosts = "a = { address = \"10.10.0.1:1\" }\nb = { address = \"10.10.0.2:1\" }";
    assert_eq!(
        ok(&vm_hosts("device_model = 1", hosts)).vm.device_model,
        Some(1)
    );
    assert_eq!(ok(&vm_hosts("", hosts)).vm.device_model, None);
    assert_eq!(
        err(&vm_hosts("device_model = 9", hosts)),
        "pair.toml:3: [vm] device_model = 9 is not a device-model version this build runs (1 to 3)"
    );
}

#[test]
fn etcd_witnesses_name_members_and_a_prefix() {
    let cfg = ok(&ft(
        "witness = \"etcd://10.0.0.1:2379,10.0.0.2:2379/tandem\"",
    ));
    assert_eq!(
        cfg.ft.witness,
        Some(Witness::Etcd {
            endpoints: vec![addr("10.0.0.1:2379"), addr("10.0.0.2:2379")],
            prefix: "/tandem".into()
        })
    );
    let e = err(&ft("witness = \"etcd://10.0.0.1:2379\""));
    assert!(e.contains("needs a key prefix"), "{e}");
    let e = err(&ft("witness = \"etcd://etcd1:2379/t\""));
    assert!(e.contains("host names are not accepted"), "{e}");
}

#[test]
fn etcd_access_needs_its_pieces_together() {
    let w = "witness = \"etcd://10.0.0.1:2379/tandem\"";
    let cfg = ok(&ft(&format!(
        "{w}\netcd_ca = \"/pki/ca.pem\"\netcd_cert = \"/pki/c.pem\"\netcd_key = \"/pki/c.key\"\netcd_user = \"tandem\"\netcd_password_file = \"/pki/pw\""
    )));
    assert_eq!(
        cfg.ft.etcd,
        EtcdAccess {
            ca: Some("/pki/ca.pem".into()),
            identity: Some(("/pki/c.pem".into(), "/pki/c.key".into())),
            user: Some(("tandem".into(), "/pki/pw".into())),
        }
    );
    assert!(cfg.ft.etcd.tls());
    assert_eq!(ok(&ft(w)).ft.etcd, EtcdAccess::default());
    for (lines, says) in [
        ("etcd_cert = \"/c\"", "etcd_cert = \"/c\" needs etcd_key"),
        ("etcd_key = \"/k\"", "etcd_key = \"/k\" needs etcd_cert"),
        ("etcd_cert = \"/c\"\netcd_key = \"/k\"", "needs etcd_ca"),
        ("etcd_user = \"u\"", "needs etcd_password_file"),
        ("etcd_password_file = \"/p\"", "needs etcd_user"),
        (
            "etcd_ca = \"/ca\"\netcd_user = \"a b\"\netcd_password_file = \"/p\"",
            "without spaces",
        ),
        (
            "etcd_user = \"u\"\netcd_password_file = \"/p\"",
            "the password crosses the network in the clear",
        ),
        ("etcd_ca = \"\"", "etcd_ca = \"\" is empty"),
    ] {
        let e = err(&ft(&format!("{w}\n{lines}")));
        assert!(e.contains(says), "{lines}: {e}");
    }
    let e = err(&ft("witness = \"tcp://10.0.0.3:7500\"\netcd_ca = \"/ca\""));
    assert!(e.contains("is for an etcd witness"), "{e}");
}

#[test]
fn on_guest_crash_reboots_by_default() {
    assert_eq!(
        ok(&ft("")).ft.on_guest_crash,
        tandem_vmm::CrashPolicy::Reboot
    );
    assert_eq!(
        ok(&ft("on_guest_crash = \"halt\"")).ft.on_guest_crash,
        tandem_vmm::CrashPolicy::Halt
    );
    assert_eq!(
        ok(&ft("on_guest_crash = \"restart-checkpoint\""))
            .ft
            .on_guest_crash,
        tandem_vmm::CrashPolicy::RestartCheckpoint { interval_ms: 20 }
    );
    assert_eq!(
        ok(&ft(
            "on_guest_crash = \"restart-checkpoint\"\ncheckpoint_interval_ms = 50"
        ))
        .ft
        .on_guest_crash,
        tandem_vmm::CrashPolicy::RestartCheckpoint { interval_ms: 50 }
    );
    assert_eq!(
        err(&ft("checkpoint_interval_ms = 0")),
        "pair.toml:9: [ft] checkpoint_interval_ms = 0 must be at least 1"
    );
    let e = err(&ft("checkpoint_interval_ms = 60000"));
    assert!(e.contains("must be at most 10000"), "{e}");
    let e = err(&ft("on_guest_crash = \"rollback\""));
    assert!(
        e.contains("must be \"reboot\", \"halt\" or \"restart-checkpoint\""),
        "{e}"
    );
}

#[test]
fn console_and_control_must_be_unix_sockets() {
    assert_eq!(
        err(&vm_hosts("console = \"/run/web1.sock\"", "")),
        "pair.toml:3: [vm] console = \"/run/web1.sock\" must be \"unix:PATH\" (a socket the live side serves)"
    );
    let e = err(&vm_hosts("console = \"unix:\"", ""));
    assert!(e.contains("must be \"unix:PATH\""), "{e}");
    let e = err(&vm_hosts(
        "",
        "a = { address = \"10.10.0.1:1\", control = \"tcp://1.2.3.4:5\" }",
    ));
    assert_eq!(
        e,
        "pair.toml:5: [hosts] a.control = \"tcp://1.2.3.4:5\" must be \"unix:PATH\""
    );
}

#[test]
fn witness_forms() {
    assert_eq!(
        err(&ft("witness = \"http://10.10.0.3:7500\"")),
        "pair.toml:9: [ft] witness = \"http://10.10.0.3:7500\" must be \"tcp://IP:PORT\", \"file:/PATH\" or \"etcd://IP:PORT[,IP:PORT...]/PREFIX\""
    );
    let e = err(&ft("witness = \"tcp://arbiter:7500\""));
    assert!(
        e.starts_with("pair.toml:9: [ft] witness = \"tcp://arbiter:7500\" is not IP:PORT"),
        "{e}"
    );
    let e = err(&ft("witness = \"file:shared/arb\""));
    assert!(e.contains("needs an absolute path"), "{e}");
    assert_eq!(
        ok(&ft("witness = \"file:/shared/tandem-arbiter\""))
            .ft
            .witness,
        Some(Witness::File("/shared/tandem-arbiter".into()))
    );
    let w = ok(&ft("witness = \"tcp://10.10.0.3:7500\""))
        .ft
        .witness
        .unwrap();
    assert_eq!(w.to_string(), "tcp://10.10.0.3:7500");
}

#[test]
fn taps_follow_the_nics() {
    let net = "net = [{ mac = \"52:54:00:00:00:01\" }]";
    let e = err(&vm_hosts(net, "a = { address = \"10.10.0.1:1\" }"));
    assert!(
        e.starts_with("pair.toml:5: [hosts] missing key a.tap: "),
        "{e}"
    );
    assert_eq!(
        err(&vm_hosts(
            net,
            "a = { address = \"10.10.0.1:1\", tap = \"\" }"
        )),
        "pair.toml:5: [hosts] a.tap = \"\" names an empty tap"
    );
    assert_eq!(
        err(&vm_hosts(net, "a = { address = \"10.10.0.1:1\", tap = [\"t0\", \"t1\"] }")),
        "pair.toml:5: [hosts] a.tap = [\"t0\", \"t1\"] names 2 tap(s) but [vm] net has 1 NIC(s); give one tap per NIC"
    );
    let e = err(&vm_hosts(
        net,
        "a = { address = \"10.10.0.1:1\", tap = \"a-very-long-tap-name\" }",
    ));
    assert!(e.contains("is not an interface name"), "{e}");
}

#[test]
fn names_and_paths() {
    let e = err(&vm_hosts("name = \"web 1\"", ""));
    assert!(
        e.starts_with("pair.toml:3: [vm] name = \"web 1\" must be 1 to 64"),
        "{e}"
    );
    let e = parse(MINIMAL, "my pair.toml").unwrap_err().to_string();
    assert!(
        e.starts_with("my pair.toml:1: [vm] name = \"my pair\" (from the file name) must be"),
        "{e}"
    );
    assert_eq!(
        err(&vm_hosts("disk = [\"/d\", \",ro\"]", "")),
        "pair.toml:3: [vm] disk[1] = \",ro\" is not \"PATH\" or \"PATH,ro\""
    );
    assert_eq!(
        err(&ft("socket_group = \"no-such-group-here\"")),
        "pair.toml:9: [ft] socket_group = \"no-such-group-here\" is no group on this host"
    );
    assert_eq!(
        err(&ft("state_dir = \"\"")),
        "pair.toml:9: [ft] state_dir = \"\" is empty"
    );
}

#[test]
fn load_reads_and_names_the_file() {
    let path = std::env::temp_dir().join(format!("tandem-config-test-{}.toml", std::process::id()));
    std::fs::write(&path, ft("heartbeat_ms = 0")).unwrap();
    let e = load(&path).unwrap_err().to_string();
    std::fs::write(&path, MINIMAL).unwrap();
    let loaded = load(&path);
    std::fs::remove_file(&path).unwrap();
    assert_eq!(
        e,
        format!(
            "{}:9: [ft] heartbeat_ms = 0 must be at least 1",
            path.display()
        )
    );
    let state_dir = loaded.unwrap().ft.state_dir;
    let expected = format!("/var/lib/tandem/tandem-config-test-{}", std::process::id());
    assert_eq!(state_dir, PathBuf::from(expected));
    let e = load(Path::new("/nonexistent/pair.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("/nonexistent/pair.toml: cannot read it: "),
        "{e}"
    );
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn which_host_flag_wins() {
    let cfg = ok(MINIMAL);
    let local = [ip("10.10.0.1")];
    assert_eq!(which_host(&cfg, Some("b"), &local).unwrap(), HostId::B);
    assert_eq!(which_host(&cfg, Some("a"), &[]).unwrap(), HostId::A);
    assert_eq!(
        which_host(&cfg, Some("c"), &local).unwrap_err().to_string(),
        "--host \"c\": expected a or b"
    );
}

#[test]
fn which_host_by_local_address() {
    let cfg = ok(MINIMAL);
    let lo = ip("127.0.0.1");
    assert_eq!(
        which_host(&cfg, None, &[lo, ip("10.10.0.2")]).unwrap(),
        HostId::B
    );
    assert_eq!(
        which_host(&cfg, None, &[ip("10.10.0.1"), lo]).unwrap(),
        HostId::A
    );
    // An IPv4-mapped IPv6 local address counts as the IPv4 one.
    assert_eq!(
        which_host(&cfg, None, &[ip("::ffff:10.10.0.1")]).unwrap(),
        HostId::A
    );
    assert_eq!(
        which_host(&cfg, None, &[lo, ip("10.10.0.9")])
            .unwrap_err()
            .to_string(),
        "this machine has none of the addresses in [hosts] (10.10.0.1, 10.10.0.2); pass --host a|b"
    );
    assert_eq!(
        which_host(&cfg, None, &[ip("10.10.0.2"), ip("10.10.0.1")])
            .unwrap_err()
            .to_string(),
        "this machine matches both a (10.10.0.1) and b (10.10.0.2) in [hosts]; pass --host a|b"
    );
}

#[test]
fn host_ids() {
    assert_eq!(HostId::A.peer(), HostId::B);
    assert_eq!(HostId::B.peer(), HostId::A);
    assert_eq!(HostId::BOTH.map(|h| h.to_string()), ["a", "b"]);
    let cfg = ok(MINIMAL);
    assert_eq!(cfg.host(HostId::B).address, addr("10.10.0.2:7400"));
    assert_eq!(cfg.host(HostId::A.peer()), &cfg.hosts[1]);
}

#[test]
fn local_addresses_include_loopback() {
    let addrs = local_addresses();
    assert!(
        addrs.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST)),
        "{addrs:?}"
    );
    let mut dedup = addrs.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), addrs.len());
}

#[test]
fn documented_example_is_valid() {
    let doc = include_str!("../../docs/pair-config.md");
    let example = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("docs/pair-config.md has a ```toml example");
    let cfg = parse(example, "web1.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(cfg.vm.name, "web1");
    assert_eq!(cfg.net_configs(HostId::A)[0].tap, "tap0");
}

mod fuzz {
    //! The pair file is operator input: any text, and any small damage to a
    //! valid file, gets a result (usually an error naming a line), never a
    //! panic. `make fuzz` runs these with many more cases.
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_text_parses_or_errors(text in "\\PC{0,400}") {
            let _ = parse(&text, "fuzz.toml");
        }

        #[test]
        fn damaged_valid_files_parse_or_error(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = FULL.as_bytes().to_vec();
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            let text = String::from_utf8_lossy(&bytes);
            if let Err(e) = parse(&text, "fuzz.toml") {
                prop_assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
            }
        }
    }
}

#[test]
fn irq_defer_us_is_read_and_bounded() {
    assert_eq!(ok(&ft("")).ft.irq_defer, Duration::ZERO);
    assert_eq!(
        ok(&ft("irq_defer_us = 4000")).ft.irq_defer,
        Duration::from_micros(4000)
    );
    assert_eq!(
        err(&ft("irq_defer_us = 2000000")),
        "pair.toml:9: [ft] irq_defer_us = 2000000 must be at most 1000000 (a second)"
    );
}
