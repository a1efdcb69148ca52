# Everyday commands. The README's two commands and .ci/run call into these.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
HYPOTHESIS_PROFILE ?= dev
export HYPOTHESIS_PROFILE

.PHONY: install install-test build-dev test test-rust test-python test-slow bench lint demo clean

install:            ## build the native module (release) and install tidesync with its CLI
	$(PIP) install "maturin>=1.9,<2"
	$(PIP) install --no-build-isolation -e .

install-test:       ## install + test and benchmark dependencies
	$(PIP) install "maturin>=1.9,<2"
	$(PIP) install --no-build-isolation -e ".[test]"

build-dev:          ## rebuild the native module after changing Rust
	$(PIP) install --no-build-isolation --no-deps -e .

test: test-rust test-python  ## every test: Rust core, then Python (unit, property, benchmark smoke)

test-rust:
	cargo test --release --locked -p tidesync-core

test-python:
	$(PYTHON) -m pytest -q
	$(PYTHON) -m pytest -q benches --benchmark-disable

test-slow:          ## long randomized runs
	HYPOTHESIS_PROFILE=soak $(PYTHON) -m pytest -q tests/property

bench:              ## all benchmarks: criterion for the core, then `tidesync bench`
	cargo bench --locked -p tidesync-core
	tidesync bench

lint:
	cargo clippy --locked --all-targets -- -D warnings
	$(PYTHON) -m mypy
	$(PYTHON) -m mypy.stubtest tidesync._core

demo:
	tidesync demo

clean:
	cargo clean
