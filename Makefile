# tandem: build, test and demo entry points. See README.md.
#   make demo    build everything and run the demo: a protected VM survives kill -9 of its host
#   make test    unit + integration tests (real KVM, real guests)
#   make lint    rustfmt --check and clippy -D warnings
#   make deps    install what a fresh Debian 12 machine lacks (idempotent)
#   make linux   Debian's stock kernel under tandem on a hardware-like KVM (QEMU TCG + SVM)

CARGO ?= cargo
GUEST_OUT := $(CURDIR)/target/guests
TANDEM := target/release/tandem

.PHONY: all deps guests build demo test lint clean fuzz bench chaos linux linux-boot

all: build guests

deps:
	@./scripts/deps.sh

guests: deps
	$(MAKE) -C guest-images OUT=$(GUEST_OUT)

build: deps
	$(CARGO) build --release --locked

# A protected VM survives a hung primary (kill -USR1) and is re-protected
# (scripts/demo.sh, all inside a network namespace it creates and deletes).
demo: build guests
	./scripts/demo.sh

# The integration tests find the guests in target/guests and the release
# binary in target/release (built above), so they run the same binary a user runs.
test: build guests
	$(CARGO) test --release --locked --workspace --all-targets

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
	$(MAKE) -C guest-images OUT=$(GUEST_OUT) clean

# Benchmarks (not tests: nothing here fails on a timing). Writes
# bench/results.json and regenerates the tables in BENCHMARKS.md.
# BENCH_QUICK=1 make bench: fewer repetitions, smaller sizes (< 2 minutes).
bench: build guests
	./bench/setup.sh
	$(CARGO) build --release --locked -p tandem-bench
	./target/release/tandem-bench

# Fault injection on a protected pair (CHAOS_STORAGE=mirrored: with
# mirrored storage; CHAOS_ARBITER=etcd: arbitrated by a 3-member etcd
# cluster; CHAOS_CRASH_POLICY=restart-checkpoint: with checkpoints and
# output held for them): CHAOS_ROUNDS random faults (default
# 200; `make test` runs one of each kind), each followed by re-protection,
# with the invariants checked; writes RELIABILITY.md. CHAOS_SEED=N replays
# a series. Then CHAOS_SPIN_ROUNDS (default 32) rounds with a guest that
# never sleeps (netecho spin=1, CHAOS_GUEST=spin), SPIN_REPS (default 20) failovers of each kind (USR1 and
# kill -9, received and replayed) under guests that never sleep in HLT, and
# JOIN_REPS (default 20) joins of a replacement secondary under a client
# with a 2 s timeout. CHAOS_POSITION=auto runs all of these with the
# position counter placing kick stops (`[ft] position`).
chaos: build guests
	CHAOS_ROUNDS=$${CHAOS_ROUNDS:-200} CHAOS_REPORT=$(CURDIR)/RELIABILITY.md \
		$(CARGO) test --release --locked --test chaos -- --nocapture
	CHAOS_GUEST=spin CHAOS_ROUNDS=$${CHAOS_SPIN_ROUNDS:-32} \
		$(CARGO) test --release --locked --test chaos -- --nocapture
	SPIN_REPS=$${SPIN_REPS:-20} $(CARGO) test --release --locked --test spin_failover -- --nocapture --test-threads=1
	JOIN_REPS=$${JOIN_REPS:-20} $(CARGO) test --release --locked --test join_gap -- --nocapture
	TANDEM_LOG=info $(CARGO) test --release --locked --test pair -- --ignored --nocapture

# Long randomized runs of everything that parses input it does not control:
# the log decoder (bit flips, truncation, random frames), the pair file
# parser, the virtio rings and registers (guest memory as input) and the
# legacy device registers. cargo fuzz needs a nightly toolchain, which this
# project's machines do not have; the same targets run as proptests with many
# cases (FUZZ_CASES each; `make test` runs them with the default 256).
# The summary goes to target/fuzz-report.md, which `make chaos` copies into
# RELIABILITY.md.
fuzz: deps
	@start=$$(date +%s); cases=$${FUZZ_CASES:-1000000}; \
	PROPTEST_CASES=$$cases $(CARGO) test --release --locked -p tandem-replay --test log_damage -- never_panic && \
	PROPTEST_CASES=$$cases $(CARGO) test --release --locked -p tandem-devices -- fuzz && \
	PROPTEST_CASES=$$cases $(CARGO) test --release --locked --bin tandem -- fuzz && \
	echo "- fuzzing (\`make fuzz\`, $$(date -u +%F)): $$cases cases for each proptest target (log decoder: random tails, payloads with valid CRCs, mutated logs; devices: legacy registers, virtio rings and registers; pair file: any text, damaged files; replication messages: any header and payload, any byte stream, any stream before authentication within its 4 KiB limit; sealed messages: any bytes fail to open, encrypted or not; the witness's handshake: any lines before authentication are refused; disk-sync messages: any replica state, chunk and done payload), $$(( $$(date +%s) - start )) s in all on this machine, no crash (a crash fails the run; proptest keeps its seed in proptest-regressions/ for \`make test\`)" > target/fuzz-report.md && cat target/fuzz-report.md

# Debian's stock kernel as a tandem guest, on a hardware-like KVM: an L1
# Debian kernel in QEMU TCG with an emulated AMD SVM CPU loads kvm_amd and
# runs tandem (scripts/linux/harness.sh). `make linux`: boot, record at the
# default settings, replay (one result line each; LINUX_LIMIT_S bounds each
# tandem run inside L1). `make linux-boot`: the boot alone (CI runs it).
linux: build
	./scripts/linux/harness.sh run record replay pair

linux-boot: build
	./scripts/linux/harness.sh run
