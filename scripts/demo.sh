#!/usr/bin/env bash
# The tandem demo: a protected VM survives the loss of its host.
#
# Everything runs inside a network namespace this script creates (and
# deletes): a bridge with one tap per "host", a witness (the arbiter), a
# primary and a secondary tandem running the netecho guest (a UDP counter
# service that persists its counter to a shared disk before replying), and a
# client. The client asks for counter values, the primary is killed with
# kill -9 halfway, the secondary takes over the VM's identity, and the client
# carries on: no value is ever handed out twice.
set -euo pipefail
cd "$(dirname "$0")/.."
T=$PWD/target/release/tandem
G=$PWD/target/guests
NS=tandem-demo
D=$(mktemp -d /tmp/tandem-demo.XXXXXX)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$D"
}
trap cleanup EXIT

ip netns del "$NS" 2>/dev/null || true
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
for tap in tapa tapb; do
    ip -n "$NS" tuntap add dev "$tap" mode tap
    ip -n "$NS" link set "$tap" master br0
    ip -n "$NS" link set "$tap" up
done
ip -n "$NS" addr add 10.79.0.1/24 dev br0
ip -n "$NS" link set br0 up
truncate -s 64K "$D/disk.img"
cat > "$D/pair.toml" <<TOML
[vm]
name = "demo"
kernel = "$G/netecho.elf"
cmdline = "ip=10.79.0.2"
mem = "32M"
disk = ["$D/disk.img"]
net = [{ mac = "52:54:00:00:79:02" }]

[hosts]
a = { address = "127.0.0.1:7401", tap = "tapa" }
b = { address = "127.0.0.2:7402", tap = "tapb" }

[ft]
heartbeat_ms = 50
failover_timeout_ms = 1000
witness = "tcp://127.0.0.1:7500"
state_dir = "$D/state"
TOML

echo "== starting the witness, the primary (host a) and the secondary (host b)"
ip netns exec "$NS" "$T" witness --listen 127.0.0.1:7500 --state "$D/witness.state" > "$D/witness.log" 2>&1 &
pids+=($!)
disown
sleep 0.5
ip netns exec "$NS" "$T" primary --config "$D/pair.toml" --host a > "$D/primary.log" 2>&1 &
primary=$!
pids+=($primary)
disown
sleep 0.3
ip netns exec "$NS" "$T" secondary --config "$D/pair.toml" --host b > "$D/secondary.log" 2>&1 &
pids+=($!)
disown
for _ in $(seq 100); do grep -q "netecho: up" "$D/primary.log" && break; sleep 0.2; done
grep "netecho: up" "$D/primary.log"

echo "== a client asks the protected VM for counter values; the primary is killed (-9) after 30"
ip netns exec "$NS" python3 - "$primary" <<'PY'
import os, signal, socket, struct, sys, time
primary = int(sys.argv[1])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("10.79.0.1", 0))
s.settimeout(0.3)
seen, request, killed_at, first_after = {}, 0, None, None
while len(seen) < 60 and request < 2000:
    s.sendto(struct.pack("<II", 7, request), ("10.79.0.2", 9000))
    try:
        while True:
            data = s.recv(64)
            if len(data) == 16:
                _, rid, value = struct.unpack("<IIQ", data)
                if value in seen.values() and seen.get(rid) != value:
                    sys.exit(f"value {value} handed out twice!")
                seen[rid] = value
                if killed_at and first_after is None:
                    first_after = time.monotonic() - killed_at
                if rid == request:
                    break
    except socket.timeout:
        pass
    if len(seen) == 30 and killed_at is None:
        os.kill(primary, signal.SIGKILL)
        killed_at = time.monotonic()
        print(f"   request {request}: primary killed (value so far {max(seen.values())})")
    request += 1
print(f"   {len(seen)} requests answered, values {min(seen.values())}..{max(seen.values())}, none handed out twice")
print(f"   first reply from the new primary {first_after*1000:.0f} ms after kill -9")
PY
echo "== what the secondary said"
sed 's/\x1b\[[0-9;]*m//g' "$D/secondary.log" | grep -E "silent|going live" || true
echo "== demo done"
