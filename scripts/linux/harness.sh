#!/usr/bin/env bash
# `make linux` / `make linux-boot`: Debian's stock kernel as a tandem guest,
# on a hardware-like KVM. An "L1" Debian kernel runs in QEMU TCG with an
# emulated AMD SVM CPU (-cpu max), loads kvm_amd, and runs tandem against it
# with the same kernel as its guest ("L2"). Scenarios (arguments, in order):
#   run     tandem run boots the guest to its init, which exits 42
#   record  the same with --record at the default settings: time over the
#           plain run, log size and rate
#   replay  tandem replay of that log: the recorded exit and console
#   pair    witness, primary and secondary in L1 protect the guest while it
#           counts; kill -USR1 of the primary; the count carries on
#           (L1 then gets two CPUs)
# Prints one result line per scenario; exits 1 if any failed. Skips (exit 0,
# with the reason) where QEMU offers no SVM. Needs root (apt-get, mknod).
# LINUX_LIMIT_S: each tandem run's limit inside L1 (default 1200).
# LINUX_RECORD_ARGS: extra tandem run options for the record scenario (for
# a diagnosis, e.g. "--min-kick-interval 100000"; the default has none).
# LINUX_PAIR_FT: the [ft] lines for the pair scenario (default
# "irq_defer_us = 10000", what `tandem run --record` defaults to without a
# position counter; without it every timer tick is a sync point in L1).
# LINUX_DIAG_LINES: print that many of the recording's last stderr lines
# (with LINUX_RECORD_ARGS="-vvv": the last stops, their RIPs and flags).
# LINUX_GUEST_ARGS: appended to the guest kernel's command line.
# LINUX_REPLAY_ARGS: extra tandem replay options (e.g. --no-repair).
# LINUX_DEBUG_EPOCHS: N > 0 makes the record and replay scenarios dump every
# epoch end's state (TANDEM_DEBUG_EPOCHS, all of memory for the first N) and
# print the first difference between the two dumps.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=$ROOT/target/linux
TANDEM=$ROOT/target/release/tandem
SCENARIOS=${*:-run record replay pair}
# Three tandem processes and two guests need a second CPU in L1. One TCG
# thread runs both: with a thread per CPU (MTTCG) L1's kernel panicked in
# tandem's vCPU thread ("corrupted stack end detected inside scheduler",
# 200 s into a recording; -smp 1 runs never did).
ACCEL=tcg SMP=1
case " $SCENARIOS " in *" pair "*) ACCEL=tcg,thread=single SMP=2 ;; esac
LIMIT=${LINUX_LIMIT_S:-1200}
L2_CMDLINE="console=ttyS0 earlyprintk=serial,ttyS0 noapic nolapic reboot=k panic=-1 lpj=1000000 rdinit=/init nokaslr ${LINUX_GUEST_ARGS:-}"

say() { echo "linux: $*"; }

# What the harness needs from Debian.
missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
[ -x /bin/busybox ] || missing+=(busybox-static)
command -v cpio >/dev/null || missing+=(cpio)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    # A fresh machine may have no package lists yet: update once, then retry.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
        { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
[ -x "$TANDEM" ] || { say "no $TANDEM: run make build first" >&2; exit 2; }

# The kernel: whatever linux-image-amd64 depends on now, downloaded once.
mkdir -p "$OUT/deb"
pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -n 1)
[ -n "$pkg" ] || pkg=linux-image-6.1.0-57-amd64
kver=${pkg#linux-image-}
kroot=$OUT/deb/$kver
if [ ! -e "$kroot/boot/vmlinuz-$kver" ]; then
    say "downloading $pkg"
    (cd "$OUT/deb" && apt-get download "$pkg" 2>/dev/null && dpkg-deb -x "$pkg"_*.deb "$kver" && rm -f "$pkg"_*.deb)
fi
vmlinuz=$kroot/boot/vmlinuz-$kver
moddir=$kroot/lib/modules/$kver/kernel

# The guest's initramfs: /init counts and exits 42 through port 0xf4.
gcc -static -O2 -o "$OUT/l2init" scripts/linux/l2init.c
rm -rf "$OUT/l2root" && mkdir -p "$OUT/l2root/dev" "$OUT/l2root/proc"
cp "$OUT/l2init" "$OUT/l2root/init"
mknod "$OUT/l2root/dev/console" c 5 1
(cd "$OUT/l2root" && find . | cpio -o -H newc --quiet | gzip -9) > "$OUT/l2-initrd.gz"

# L1's initramfs: busybox, the KVM modules, tandem and its libraries, the
# guest's kernel and initramfs, and what to run.
R=$OUT/l1root
rm -rf "$R" && mkdir -p "$R"/{bin,sbin,usr/bin,proc,sys,dev,tmp,lib/modules,l2}
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
mknod "$R/dev/console" c 5 1
cp "$moddir/virt/lib/irqbypass.ko" "$moddir/drivers/crypto/ccp/ccp.ko" \
   "$moddir/arch/x86/kvm/kvm.ko" "$moddir/arch/x86/kvm/kvm-amd.ko" "$R/lib/modules/"
strip -o "$R/bin/tandem" "$TANDEM"
for lib in $(ldd "$TANDEM" | grep -o '/[^ ]*'); do
    mkdir -p "$R$(dirname "$lib")" && cp -L "$lib" "$R$lib"
done
cp "$vmlinuz" "$R/l2/vmlinuz"
cp "$OUT/l2-initrd.gz" "$R/l2/initrd"
echo "$L2_CMDLINE" > "$R/l2/cmdline"
echo "$LIMIT" > "$R/l2/limit"
echo "${LINUX_RECORD_ARGS:-}" > "$R/l2/record-args"
echo "${LINUX_DIAG_LINES:-0}" > "$R/l2/diag-lines"
echo "${LINUX_PAIR_FT-irq_defer_us = 10000}" > "$R/l2/pair-ft"
echo "${LINUX_DEBUG_EPOCHS:-0}" > "$R/l2/debug-epochs"
echo "${LINUX_REPLAY_ARGS:-}" > "$R/l2/replay-args"
echo "$SCENARIOS" > "$R/l2/scenarios"
cp scripts/linux/l1init.sh "$R/init" && chmod +x "$R/init"
(cd "$R" && find . | cpio -o -H newc --quiet | gzip -1) > "$OUT/l1-initrd.gz"

# Boot L1. no_timer_check: on a busy machine L1 can otherwise panic
# "IO-APIC + timer doesn't work".
say "kernel $kver; booting L1 under QEMU TCG (scenarios: $SCENARIOS; console in target/linux/l1-console.log)"
started=$(date +%s)
# Each scenario may take LIMIT; the pair waits up to three times that.
n=$(( $(echo "$SCENARIOS" | wc -w) + 2 * $(echo "$SCENARIOS" | tr ' ' '\n' | grep -cx pair || true) ))
set +e
timeout -s KILL $((LIMIT * n + 600)) qemu-system-x86_64 -accel $ACCEL -cpu max -smp $SMP -m 8G \
    -nographic -no-reboot -kernel "$vmlinuz" -initrd "$OUT/l1-initrd.gz" \
    -append "console=ttyS0 rdinit=/init panic=-1 loglevel=4 no_timer_check" \
    < /dev/null > "$OUT/l1-console.log" 2>&1
qemu=$?
set -e
tr -d '\r' < "$OUT/l1-console.log" | grep -E '^L1-(INIT|RESULT)' | grep -v '^L1-INIT:   ' | tail -n 40 | sed 's/^/  /' >&2 || true
say "L1 ran $(( $(date +%s) - started )) s (QEMU exit $qemu)"
results=$(tr -d '\r' < "$OUT/l1-console.log" | sed -n 's/^L1-RESULT //p')
failed=0
for s in $SCENARIOS; do
    line=$(echo "$results" | grep -m1 "^$s " || true)
    if [ -z "$line" ]; then
        echo "linux $s: FAIL no result (L1 ended early; see target/linux/l1-console.log)"
        failed=1
        continue
    fi
    echo "linux ${line%% *}: ${line#* }"
    case $line in "$s FAIL"*) failed=1 ;; esac
done
exit $failed
