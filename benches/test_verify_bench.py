"""pytest-benchmark face of benches/verify_bench.py (verify of two copies that differ in
100 rows, vs a full pull of the same tables; the timed verifies are warm: central's data
does not change between them, so it answers from its kept read).

    python -m pytest benches/test_verify_bench.py --benchmark-only   # TIDESYNC_BENCH_ROWS vitals
    python -m pytest -q benches --benchmark-disable                  # smoke: 2k vitals, each once

The figures of docs/benchmarks.md come from ``python benches/verify_bench.py --rows N``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import verify_bench  # noqa: E402


Copies = tuple[verify_bench.VerifyBench, set[str], int]


@pytest.fixture(scope="module")
def copies(bench_rows: int) -> Iterator[Copies]:
    """Central with ``bench_rows`` vitals of one facility's scope; the facility pulled it
    all (the full pull: its bytes are the third item), then 100 of its vitals (1 % on
    small data) were changed behind the engine's back."""
    with verify_bench.verify_bench(bench_rows) as bench:
        pull = bench.full_pull()
        assert pull["rows"] >= bench.made
        bench.verify()  # the first read of a fresh copy sets hint bits: not what is measured
        yield bench, bench.corrupt(max(1, min(100, bench_rows // 100))), pull["bytes"]


@pytest.mark.benchmark(group="verify")
def test_verify_finds_exactly_the_changed_rows(benchmark: Any, copies: Copies) -> None:
    bench, changed, pulled = copies
    seconds, report = benchmark.pedantic(bench.verify, rounds=3)
    assert report.keys("differs") == changed and report.differences == len(changed)
    assert report.bytes_up + report.bytes_down < pulled


def test_repair_then_clean(copies: Copies) -> None:
    bench, changed, _ = copies
    _, fixed = bench.verify(repair=True)
    assert fixed.unrepaired == 0 and fixed.keys("differs") == changed
    _, after = bench.verify()
    assert after.clean


def test_verify_bench_script_smoke() -> None:
    out = verify_bench.run(2_000, differ=20, repeats=1, say=lambda *_: None)
    assert out["verify"]["exact"] and out["verify_after"]["differences"] == 0
    assert out["verify"]["bytes"] < out["full_pull"]["bytes"]
    # Cold: a restarted central reads its copy; warm: it answers from its kept read.
    assert out["verify"]["tables_reused"] == 0
    assert out["verify_warm"]["exact"] and out["verify_warm"]["tables_reused"] > 0
