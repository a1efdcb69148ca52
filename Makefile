# Everyday commands. The README's two commands and .ci/run call into these.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
HYPOTHESIS_PROFILE ?= dev
export HYPOTHESIS_PROFILE

.PHONY: install install-test build-dev test test-rust test-python typecheck test-slow test-soak bench lint demo clean

install:            ## build the native module (release) and install tidesync with its CLI
	$(PIP) install "maturin>=1.9,<2"
	$(PIP) install --no-build-isolation -e .

install-test:       ## install + test and benchmark dependencies
	$(PIP) install "maturin>=1.9,<2"
	$(PIP) install --no-build-isolation -e ".[test]"

build-dev:          ## rebuild the native module after changing Rust
	$(PIP) install --no-build-isolation --no-deps -e .

test: test-rust test-python typecheck  ## every test: Rust core, Python (unit, property, benchmark smoke), types

test-rust:
	cargo test --release --locked -p tidesync-core

test-python:
	$(PYTHON) -m pytest -q
	$(PYTHON) -m pytest -q benches --benchmark-disable

typecheck:          ## mypy --strict on the package, and the stub checked against the native module
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest tidesync._core

test-slow:          ## long randomized runs
	HYPOTHESIS_PROFILE=soak $(PYTHON) -m pytest -q tests/property

test-soak:          ## the convergence harness, long (TIDESYNC_SOAK_EXAMPLES examples; see docs/reliability.md)
	HYPOTHESIS_PROFILE=soak $(PYTHON) -m pytest -q -s -m soak tests/convergence

bench:              ## all benchmarks: criterion for the core, then `tidesync bench`
	cargo bench --locked -p tidesync-core
	tidesync bench

lint: typecheck
	cargo fmt --all --check
	cargo clippy --locked --all-targets -- -D warnings

demo:
	tidesync demo

clean:
	cargo clean
