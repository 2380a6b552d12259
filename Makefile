# Developer entry points. `make test` is the README's test command and what CI runs.
CARGO ?= cargo

.PHONY: run test lint fmt bench bench-store migrate profile-cpu profile-heap tasks fuzz

## Run Keel on the embedded SQLite default (./keel.db), API on 127.0.0.1:8080.
run:
	$(CARGO) run --release -- serve

## Run the whole test suite. Postgres-backed tests run when KEEL_TEST_DATABASE_URL is set
## (e.g. postgres://postgres@127.0.0.1:5432/postgres) and are skipped loudly otherwise.
test:
	$(CARGO) test --workspace

## Formatting and lints, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

fmt:
	$(CARGO) fmt --all

## keel bench (SPEC §7, docs/benchmarks.md): W1-W5, 3 runs, medians, on SQLite; then on
## Postgres with the pgbench reference when BENCH_DATABASE_URL (or KEEL_TEST_DATABASE_URL)
## is set. Tables on stdout, JSON in bench/results/. Extra options: BENCH_ARGS="--quick".
BENCH_DATABASE_URL ?= $(KEEL_TEST_DATABASE_URL)
bench:
	$(CARGO) run --release -- bench $(BENCH_ARGS)
	@if [ -n "$(BENCH_DATABASE_URL)" ]; then \
		echo "$(CARGO) run --release -- bench --database-url <BENCH_DATABASE_URL> $(BENCH_ARGS)"; \
		$(CARGO) run --release -- bench --database-url "$(BENCH_DATABASE_URL)" $(BENCH_ARGS); \
	else \
		echo "make bench: BENCH_DATABASE_URL / KEEL_TEST_DATABASE_URL not set: Postgres skipped"; \
	fi

## Fuzz the parsers of outside input (docs/security.md#fuzzing): each cargo-fuzz target in
## fuzz/ for FUZZ_SECONDS on nightly, without a sanitizer (safe Rust: panics and failed
## assertions are the findings) and with debug assertions. The corpus grows in FUZZ_CORPUS,
## outside the clone, from the seeds in fuzz/seeds; crashes land in fuzz/artifacts.
FUZZ_SECONDS ?= 600
FUZZ_TARGETS ?= job_body query_string cron config idempotency_key
FUZZ_HOME ?= $(HOME)/.cache/keel-fuzz
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@for t in $(FUZZ_TARGETS); do \
		mkdir -p $(FUZZ_HOME)/corpus/$$t; \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s"; \
		$(CARGO) +nightly fuzz run -s none -a --target-dir $(FUZZ_HOME)/target $$t \
			$(FUZZ_HOME)/corpus/$$t fuzz/seeds/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
			|| exit 1; \
	done

## Store benchmarks (criterion): batch insert and lease+complete of 100 jobs per backend.
bench-store:
	$(CARGO) bench -p keel-store --bench store

## Apply migrations to KEEL_DATABASE_URL (default sqlite://keel.db).
migrate:
	$(CARGO) run --release -- migrate

## Diagnostics of a running Keel through its admin listener (docs/operations.md). ADMIN is
## the listener's URL; with KEEL_ADMIN_TOKEN set (a non-loopback listener) it is sent as a
## bearer token. Files land in profiles/ (git-ignored), named by time.
ADMIN ?= http://127.0.0.1:9000
PROFILE_SECONDS ?= 30
PROFILES ?= profiles
ADMIN_CURL = curl -sS --fail-with-body $(if $(KEEL_ADMIN_TOKEN),-H "Authorization: Bearer $(KEEL_ADMIN_TOKEN)")

## CPU profile over PROFILE_SECONDS (pprof protobuf, for `go tool pprof`/`pprof`), then a
## flamegraph SVG over the next PROFILE_SECONDS (one profile runs at a time, so the two
## windows follow each other; open the SVG in a browser).
profile-cpu:
	@mkdir -p $(PROFILES)
	@ts=$$(date +%Y%m%d-%H%M%S); \
	echo "CPU profile: $(PROFILE_SECONDS) s from $(ADMIN) ..."; \
	$(ADMIN_CURL) -o $(PROFILES)/cpu-$$ts.pb.gz "$(ADMIN)/debug/pprof/profile?seconds=$(PROFILE_SECONDS)" && \
	echo "saved $(PROFILES)/cpu-$$ts.pb.gz  (go tool pprof -top $(PROFILES)/cpu-$$ts.pb.gz, or -http=: for a UI)" && \
	echo "flamegraph: another $(PROFILE_SECONDS) s ..." && \
	$(ADMIN_CURL) -o $(PROFILES)/cpu-$$ts.svg "$(ADMIN)/debug/pprof/profile?seconds=$(PROFILE_SECONDS)&format=flamegraph" && \
	echo "saved $(PROFILES)/cpu-$$ts.svg"

## Heap profile of live memory (sampling is on from the start; if someone switched it off,
## this switches it on again and says the profile holds only what was allocated since). From the
## second run on, prints what grew since the previous profile (-symbolize=none: Keel's
## profiles are already symbolized, with full Rust paths).
profile-heap:
	@mkdir -p $(PROFILES)
	@ts=$$(date +%Y%m%d-%H%M%S); \
	prev=$$(ls -t $(PROFILES)/heap-*.pb.gz 2>/dev/null | head -n 1); \
	status=$$($(ADMIN_CURL) -X POST "$(ADMIN)/debug/pprof/heap/activate") || { echo "$$status"; exit 1; }; \
	case "$$status" in *'"changed":true'*) \
		echo "heap profiling had been switched off and is on again: this profile holds only allocations from now on; run make profile-heap again later to see growth"; \
		prev="";; \
	esac; \
	$(ADMIN_CURL) -o $(PROFILES)/heap-$$ts.pb.gz "$(ADMIN)/debug/pprof/heap" && \
	echo "saved $(PROFILES)/heap-$$ts.pb.gz" && \
	if [ -n "$$prev" ]; then \
		echo "growth since $$prev:"; \
		if command -v pprof >/dev/null 2>&1; then \
			pprof -symbolize=none -top -diff_base "$$prev" $(PROFILES)/heap-$$ts.pb.gz | head -n 25; \
		elif command -v go >/dev/null 2>&1; then \
			go tool pprof -symbolize=none -top -diff_base "$$prev" $(PROFILES)/heap-$$ts.pb.gz | head -n 25; \
		else \
			echo "  install pprof (go install github.com/google/pprof@latest) or Go, then:"; \
			echo "  pprof -symbolize=none -top -diff_base $$prev $(PROFILES)/heap-$$ts.pb.gz"; \
		fi; \
	fi

## Task dump: every async task and where it waits (saved), and the grouped summary (printed).
tasks:
	@mkdir -p $(PROFILES)
	@ts=$$(date +%Y%m%d-%H%M%S); \
	$(ADMIN_CURL) -o $(PROFILES)/tasks-$$ts.txt "$(ADMIN)/debug/tasks" && \
	echo "saved $(PROFILES)/tasks-$$ts.txt" && \
	$(ADMIN_CURL) "$(ADMIN)/debug/tasks?summary=1"
