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
        tandem_as record run $GUEST --cmdline "$CMDLINE" --record /tmp/l2.log --record-max "$cap" $(cat /l2/record-args)
        size=$(stat -c %s /tmp/l2.log 2>/dev/null || echo 0)
        /bin/tandem log inspect /tmp/l2.log > /out/inspect.out 2>&1
        rate=$(grep -m1 'guest time' /out/inspect.out | sed 's/^[^:]*: *//')
        # For a diagnosis on the host: what the log holds (records by kind,
        # stops, sync points) and how far the guest got (its last console
        # lines and tandem's vCPU counters).
        sed 's/^/L1-INIT:   inspect: /' /out/inspect.out | head -n 40
        tail -n 4 /out/record.out | cut -c1-200 | sed 's/^/L1-INIT:   guest: /'
        grep -m1 -o 'VcpuStats {[^}]*' /out/record.err | cut -c1-400 | sed 's/^/L1-INIT:   /' || true
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
        tandem_as replay replay /tmp/l2.log --kernel /l2/vmlinuz --initrd /l2/initrd
        summary=$(grep -m1 -E 'stops, .*sync points' /out/replay.err | cut -c1-300)
        if cmp -s /out/record.out /out/replay.out; then same=identical; else same=DIFFERENT; fi
        if [ "$RC" = 42 ] && [ "$same" = identical ]; then
            result replay PASS "exit 42, console $same, ${SECS}s; $summary"
        else
            result replay FAIL "exit $RC (recorded 42), console $same ($(wc -c < /out/record.out) vs $(wc -c < /out/replay.out) bytes); $summary"
        fi ;;
    *) result "$s" FAIL "unknown scenario" ;;
    esac
done
finish
