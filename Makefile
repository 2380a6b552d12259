# Developer entry points. `make test` is the README's test command and what CI runs.
CARGO ?= cargo

.PHONY: run test lint fmt bench-store migrate

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

## Store benchmarks (criterion): batch insert and lease+complete of 100 jobs per backend.
bench-store:
	$(CARGO) bench -p keel-store --bench store

## Apply migrations to KEEL_DATABASE_URL (default sqlite://keel.db).
migrate:
	$(CARGO) run --release -- migrate
