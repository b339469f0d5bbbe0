#!/bin/sh
# /init of the L1 kernel (busybox), inside QEMU TCG with an emulated AMD SVM
# CPU: loads kvm_amd, then runs the scenarios named in /l2/scenarios with
# tandem against that KVM and Debian's kernel as the guest. Each scenario
# prints one "L1-RESULT <scenario> <PASS|FAIL|SKIP> <details>" line; the
# harness on the host collects them.
export PATH=/bin:/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=90% tmpfs /tmp
# The guests' console and tandem's messages go to a tmpfs of their own: a
# recording that fills /tmp must not take its own error message with it.
mkdir -p /out && mount -t tmpfs -o size=256m tmpfs /out
up() { cut -d' ' -f1 /proc/uptime; }
result() { echo "L1-RESULT $*"; }
finish() { echo "L1-DONE at $(up)s"; sync; poweroff -f; }
echo "L1-INIT: up at $(up)s"
if ! grep -q -m1 '^flags.* svm' /proc/cpuinfo; then
    for s in $(cat /l2/scenarios); do result "$s" SKIP "QEMU's TCG CPU offers no SVM here"; done
    finish
fi
for m in irqbypass ccp kvm kvm-amd; do
    insmod /lib/modules/$m.ko || echo "L1-INIT: insmod $m failed"
done
if [ ! -e /dev/kvm ]; then
    for s in $(cat /l2/scenarios); do result "$s" SKIP "kvm_amd gave no /dev/kvm in L1 ($(dmesg | grep -i -m1 -E 'kvm|svm'))"; done
    finish
fi
CMDLINE=$(cat /l2/cmdline)
LIMIT=$(cat /l2/limit)
GUEST="--kernel /l2/vmlinuz --initrd /l2/initrd --mem 256M"
# Runs tandem (label, args...): stdout to /out/<label>.out, stderr to
# /out/<label>.err; sets RC and SECS (L1 time).
tandem_as() {
    label=$1; shift
    s=$(up)
    timeout -s KILL "$LIMIT" /bin/tandem "$@" > /out/$label.out 2> /out/$label.err
    RC=$?
    SECS=$(awk -v a="$s" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')
    echo "L1-INIT: $label: exit $RC after ${SECS}s; last stderr lines:"
    tail -n 5 /out/$label.err | cut -c1-300 | sed "s/^/L1-INIT:   /"
}
# LINUX_DEBUG_EPOCHS: the record and replay scenarios dump their epoch ends.
DEBUG_EPOCHS=$(cat /l2/debug-epochs 2>/dev/null || echo 0)
# Exports the dump variables for scenario $1 (record or replay).
debug_epochs() {
    [ "$DEBUG_EPOCHS" -gt 0 ] || return 0
    export TANDEM_DEBUG_EPOCHS=/out/$1.epochs TANDEM_DEBUG_EPOCHS_FULL=$DEBUG_EPOCHS
}
# Prints where the record and replay dumps differ: the diff of the blocks
# of the first two and the last two epochs that differ (from the dumps'
# index files: the dumps are too large for busybox diff).
first_epoch_difference() {
    [ -s /out/record.epochs.index ] && [ -s /out/replay.epochs.index ] || return 0
    paste -d ' ' /out/record.epochs.index /out/replay.epochs.index \
        | awk '$5 != $10 { print "epoch " $2 " stop " $4 }' > /out/differing
    n=$(wc -l < /out/differing)
    echo "L1-INIT:   epochs: $n of $(wc -l < /out/record.epochs.index) epoch ends differ"
    { head -n 2 /out/differing; tail -n 2 /out/differing; } | uniq | while read -r head; do
        echo "L1-INIT:   epochs: differing block: $head"
        for f in record replay; do
            awk -v h="$head" '$0 == h { p = 1; print; next } /^epoch/ { if (p) exit } p' /out/$f.epochs > /out/$f.block
        done
        diff /out/record.block /out/replay.block | grep '^[-+] ' | head -n 30 | sed 's/^/L1-INIT:   epochs: /'
    done
}
# The numbers of the guest's "GUEST-INIT: count N" lines in file $1.
counts() { sed -n 's/^GUEST-INIT: count \([0-9]*\).*/\1/p' "$1" | tr -d '\r'; }
# Waits (at most $2 s) until "$1" succeeds; false on timeout.
wait_until() {
    t0=$(up)
    until eval "$1"; do
        awk -v a="$t0" -v b="$(up)" -v l="$2" 'BEGIN { exit !(b - a > l) }' && return 1
        sleep 0.2
    done
}
# Scenario 4: witness, primary and secondary as three tandem processes in
# L1 (on loopback) protect the guest; kill -USR1 of the primary while the
# guest counts; the secondary goes live and the count carries on with no
# gap or contradiction (repeats allowed).
# Both sides' figures (`tandem status --json`: stops, epochs, divergences,
# sync points by reason, the replay lag and the brake's waits).
pair_status() {
    echo "L1-INIT: pair: status:"
    /bin/tandem status --config $P/pair.toml --json 2>&1 | cut -c1-3000 | sed 's/^/L1-INIT:   /'
}

# Where L1's CPU time goes while the pair runs (a diagnosis): every 60 s
# L1's /proc/stat cpu line (user nice system idle iowait irq softirq steal
# guest), each tandem thread's CPU ticks so far (utime+stime, and each,
# 100/s) and both sides' status (its vcpu_ms_* figures: where each vCPU
# thread's time went).
cpu_samples() {
    while sleep 60; do
        echo "L1-INIT: pair: cpu at $(up)s: $(head -n 1 /proc/stat)"
        for side in "primary $primary" "secondary $secondary"; do
            set -- $side
            for t in /proc/$2/task/*; do
                awk -v side="$1" '{ sub(/^[0-9]+ \(/, ""); sub(/\)/, ""); print side, $1, $13 + $14, $13 "u/" $14 "s" }' $t/stat 2>/dev/null
            done | awk '$3 > 50' | tr '\n' ';' | sed 's/^/L1-INIT: pair: threads: /'
            echo
        done
        pair_status
    done
}

pair_scenario() {
    P=/tmp/pair
    rm -rf $P && mkdir -p $P/state
    ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
    total=40
    /bin/tandem keygen $P/pair.psk > /dev/null
    cat > $P/pair.toml <<EOF
[vm]
name = "linux"
kernel = "/l2/vmlinuz"
initrd = "/l2/initrd"
cmdline = "$CMDLINE l2.count=$total l2.sleep_ms=500"
mem = "256M"

[hosts]
a = { address = "127.0.0.1:7401" }
b = { address = "127.0.0.2:7402" }

[ft]
heartbeat_ms = 500
failover_timeout_ms = 15000
witness = "tcp://127.0.0.1:7500"
state_dir = "$P/state"
psk_file = "$P/pair.psk"
$(cat /l2/pair-ft 2>/dev/null)
EOF
    /bin/tandem keygen --witness-key-for $P/pair.toml $P/witness.psk > /dev/null
    /bin/tandem witness --listen 127.0.0.1:7500 --state $P/witness.state \
        --psk-file $P/witness.psk > /out/witness.out 2>&1 &
    witness=$!
    s0=$(up)
    /bin/tandem primary --config $P/pair.toml --host a > /out/primary.out 2> /out/primary.err &
    primary=$!
    /bin/tandem secondary --config $P/pair.toml --host b > /out/secondary.out 2> /out/secondary.err &
    secondary=$!
    cpu_samples &
    sampler=$!
    # Fail over in the middle of the count.
    if ! wait_until "counts /out/primary.out | grep -qx 10" "$LIMIT"; then
        pair_status
        echo "L1-INIT: pair: the guest's console as the primary released it (last lines):"
        tail -n 3 /out/primary.out | cut -c1-200 | sed 's/^/L1-INIT:   /'
        for side in primary secondary; do
            echo "L1-INIT: pair: $side: $(grep -c 'diverged' /out/$side.err) lines about divergences; last stderr lines:"
            tail -n 3 /out/$side.err | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-250 | sed 's/^/L1-INIT:   /'
        done
        result pair FAIL "the protected guest never counted to 10 in ${LIMIT}s: $(tail -n 2 /out/primary.err | cut -c1-200)"
        kill -9 $primary $secondary $witness $sampler 2>/dev/null
        return
    fi
    boot=$(awk -v a="$s0" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')
    pair_status
    kill -USR1 $primary
    k=$(up)
    at=$(counts /out/primary.out | tail -n 1)
    echo "L1-INIT: pair: count $at released by the primary after ${boot}s; kill -USR1 of the primary"
    wait_until "counts /out/secondary.out | grep -qx $((at + 1))" "$LIMIT" \
        || echo "L1-INIT: pair: the secondary showed no count $((at + 1)) in ${LIMIT}s"
    gap=$(awk -v a="$k" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }')
    echo "L1-INIT: pair: the secondary's console after ${gap}s: $(counts /out/secondary.out | tail -n 1)"
    wait_until "grep -q 'GUEST-INIT: exiting with 42' /out/secondary.out" "$LIMIT"
    sleep 2
    kill -9 $primary $secondary $witness $sampler 2>/dev/null
    echo "L1-INIT: pair: primary stderr:"; tail -n 4 /out/primary.err | cut -c1-300 | sed 's/^/L1-INIT:   /'
    echo "L1-INIT: pair: secondary stderr:"; tail -n 6 /out/secondary.err | cut -c1-300 | sed 's/^/L1-INIT:   /'
    # The count as the guest's users saw it: the primary's, then the live
    # secondary's. Each step repeats a number seen or adds one; it ends at
    # the total.
    seq=$( (counts /out/primary.out; counts /out/secondary.out) | tr '\n' ' ')
    verdict=$(echo "$seq" | awk -v total="$total" '{
        top = 0; bad = "";
        for (i = 1; i <= NF; i++) {
            if ($i > top + 1) { bad = "jumped from " top " to " $i; break }
            if ($i > top) top = $i
        }
        if (bad == "" && top != total) bad = "ended at " top " of " total;
        print (bad == "" ? "ok" : bad) }')
    figures="boot to count 10 ${boot}s, failed over at count ${at}, next count ${gap}s after kill -USR1"
    if [ "$verdict" = ok ] && grep -q 'GUEST-INIT: exiting with 42' /out/secondary.out; then
        result pair PASS "$figures; the count carried on without a gap to ${total} and init exited 42 on the secondary"
    else
        result pair FAIL "$figures; count: $verdict; sequence $(echo "$seq" | cut -c1-200)"
    fi
}

RUN_SECS=
for s in $(cat /l2/scenarios); do
    case $s in
    run)
        # The instruction-count position counter needs KVM's emulator; under
        # SVM the guest runs natively, so its self-check must say no.
        /bin/tandem run --kernel /nonexistent --position kvm-insn-stat > /out/position.err 2>&1
        position=$(grep -m1 -o 'kvm-insn-stat: .*' /out/position.err | cut -c1-160)
        tandem_as run run $GUEST --cmdline "$CMDLINE"
        RUN_SECS=$SECS
        if ! grep -q "not exact on this host" /out/position.err; then
            result run FAIL "the kvm-insn-stat self-check did not refuse under SVM: $(head -c 200 /out/position.err)"
        elif [ "$RC" = 42 ] && grep -q "GUEST-INIT: exiting with 42" /out/run.out; then
            result run PASS "Debian's kernel booted to its init, which exited 42, in ${SECS}s of L1 time; position self-check says no (${position})"
        else
            result run FAIL "exit $RC after ${SECS}s (expected 42 from the guest's init): $(tail -n 1 /out/run.err | cut -c1-200)"
        fi ;;
    record)
        # Bounded below /tmp's size, so a log too large ends with tandem's
        # own error (and leaves room to replay what was recorded).
        cap=$(( $(df -k /tmp | awk 'NR == 2 { print $2 }') * 7 / 10 ))K
        # shellcheck disable=SC2046
        debug_epochs record
        tandem_as record run $GUEST --cmdline "$CMDLINE" --record /tmp/l2.log --record-max "$cap" $(cat /l2/record-args)
        unset TANDEM_DEBUG_EPOCHS TANDEM_DEBUG_EPOCHS_FULL
        size=$(stat -c %s /tmp/l2.log 2>/dev/null || echo 0)
        /bin/tandem log inspect /tmp/l2.log > /out/inspect.out 2>&1
        rate=$(grep -m1 'guest time' /out/inspect.out | sed 's/^[^:]*: *//')
        # For a diagnosis on the host: what the log holds (records by kind,
        # stops, sync points) and how far the guest got (its last console
        # lines and tandem's vCPU counters).
        sed 's/^/L1-INIT:   inspect: /' /out/inspect.out | head -n 40
        tail -n 4 /out/record.out | cut -c1-200 | sed 's/^/L1-INIT:   guest: /'
        # How the guest keeps time (its TSC reads are what tandem cannot log).
        grep -a -i -m 12 -E 'tsc|clocksource|calibrat|delay loop' /out/record.out | cut -c1-160 | sed 's/^/L1-INIT:   guest time: /'
        grep -m1 -o 'VcpuStats {[^}]*' /out/record.err | cut -c1-400 | sed 's/^/L1-INIT:   /' || true
        diag=$(cat /l2/diag-lines 2>/dev/null || echo 0)
        [ "$diag" -gt 0 ] && tail -n "$diag" /out/record.err | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-200 | sed 's/^/L1-INIT:   diag: /'
        ratio=n/a
        [ -n "$RUN_SECS" ] && ratio=$(awk -v r="$SECS" -v p="$RUN_SECS" 'BEGIN { printf "%.2fx", r / p }')
        figures="time ${SECS}s (${ratio} the plain run), log $((size / 1048576)) MiB, guest time ${rate:-unknown}"
        if [ "$RC" = 42 ]; then
            result record PASS "$figures"
        else
            result record FAIL "exit $RC: $figures: $(tail -n 1 /out/record.err | cut -c1-200)"
        fi ;;
    replay)
        if [ ! -s /tmp/l2.log ]; then
            result replay SKIP "no recording (run the record scenario first)"
            continue
        fi
        debug_epochs replay
        # The console the replay's own guest wrote (tandem emits the
        # recorded bytes and only counts a difference): what is compared.
        export TANDEM_DEBUG_REPLAY_CONSOLE=/out/replay.own
        # shellcheck disable=SC2046
        tandem_as replay replay /tmp/l2.log --kernel /l2/vmlinuz --initrd /l2/initrd $(cat /l2/replay-args 2>/dev/null)
        # What the divergences were, by kind (the summary line is cut).
        sed -n 's/^  differs: //p' /tmp/l2.log.divergence.txt 2>/dev/null \
            | sed 's/[0-9]* pages dirtied by the replay but not the recording.*/pages dirtied by the replay only/; s/scrub of pages .*/scrub/' \
            | tr ',' '\n' | sed 's/^ *//' | sort | uniq -c | sort -rn | head -n 12 | sed 's/^/L1-INIT:   divergence kinds: /'
        unset TANDEM_DEBUG_EPOCHS TANDEM_DEBUG_EPOCHS_FULL TANDEM_DEBUG_REPLAY_CONSOLE
        first_epoch_difference
        summary=$(grep -m1 -E 'stops, .*sync points' /out/replay.err | cut -c1-300)
        # How the replay ended where it differs from the recording, and the
        # guest's own last words (its console as the replay ran it is only
        # compared, so a panic shows here, not in replay.out).
        grep -m3 -E 'replay ended with|cross-check failed' /out/replay.err | sed 's/\x1b\[[0-9;]*m//g' | cut -c1-300 | sed 's/^/L1-INIT:   /'
        if cmp -s /out/record.out /out/replay.own; then
            same=identical
        else
            same=DIFFERENT
            at=$(cmp /out/record.out /out/replay.own 2>&1 | head -n 1)
            echo "L1-INIT:   the replay's own console differs: $at; its last lines:"
            tail -n 12 /out/replay.own | tr -d '\r' | cut -c1-200 | sed 's/^/L1-INIT:   replay console: /'
        fi
        if [ "$RC" = 42 ] && [ "$same" = identical ]; then
            result replay PASS "exit 42, console $same, ${SECS}s; $summary"
        else
            result replay FAIL "exit $RC (recorded 42), console $same ($(wc -c < /out/record.out) vs $(wc -c < /out/replay.own) bytes of the replay's own); $summary"
        fi ;;
    pair)
        pair_scenario ;;
    *) result "$s" FAIL "unknown scenario" ;;
    esac
done
finish
