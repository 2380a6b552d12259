# Developer entry points. `make test` is the README's test command and what CI runs.
CARGO ?= cargo

.PHONY: run test lint fmt bench bench-store migrate

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

## Store benchmarks (criterion): batch insert and lease+complete of 100 jobs per backend.
bench-store:
	$(CARGO) bench -p keel-store --bench store

## Apply migrations to KEEL_DATABASE_URL (default sqlite://keel.db).
migrate:
	$(CARGO) run --release -- migrate
