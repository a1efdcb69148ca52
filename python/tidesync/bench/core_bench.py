"""Time the native core against general-purpose baselines, in one process.

Every figure is the MEDIAN of ``repeats`` timed runs (after one untimed warm-up run),
and tidesync and its baselines run interleaved (A, B, A, B, ...) so that a noisy
neighbour on a shared machine slows both alike. Results are reported as rows per second
and as ratios against the baselines measured in the same run:

``ratio`` = baseline time per row / tidesync time per row, i.e. how many times faster
tidesync is (above 1: tidesync is faster).

- **diff** — ``tidesync.diff`` vs a DuckDB ``FULL OUTER JOIN`` and a polars ``join(how="full")``
  over the same Arrow tables, each producing the same information (inserted and deleted
  keys, and for matched keys with some change a per-column "differs" flag, nulls compared
  as values), fully materialized. Rows counted: rows of the new table.
- **merge** — ``tidesync.merge`` in record and field mode on ``rows`` local + ``rows``
  incoming versions, vs the plain-Python ``tidesync.reference.merge`` timed on a
  proportional subsample and extrapolated per row. Rows counted: incoming versions.
- **digest** — ``tidesync.digest`` (1024 buckets over key, ``_hlc``, ``_node``) vs one
  streaming ``xxh3_64`` pass, and one ``blake3`` pass, over the raw Arrow buffers of the
  same three columns.
- **hlc** — ``tidesync.logical_order`` of a change log vs ``pyarrow.compute.sort_indices``
  on the same columns.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

import tidesync
from tidesync.bench import data

SECTIONS: tuple[str, ...] = ("diff", "merge", "digest", "hlc")

#: Targets (from the project's requirements).
MERGE_MIN_SPEEDUP_VS_REFERENCE = 50.0
MERGE_RECORD_MIN_ROWS_PER_S = 5_000_000.0
DIGEST_MAX_SLOWDOWN_VS_XXH3 = 2.0

DIGEST_BUCKETS = 1024
#: A digest of 1M rows takes a few milliseconds, where one descheduled thread on a
#: shared host moves a single timing by half: its median is taken over at least
#: this many rounds (each round times tidesync and both baselines in turn).
DIGEST_MIN_REPEATS = 21
LOGICAL_ORDER_BY: tuple[str, ...] = ("_hlc", "_node", "_table", data.KEY)

Row = dict[str, Any]


# --------------------------------------------------------------------------- timing


def _measure(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run the functions round-robin; ``warmup`` untimed rounds, then ``repeats`` timed ones."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            out = fn()
            elapsed = time.perf_counter() - start
            del out
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def _median(runs: Sequence[float]) -> float:
    return float(statistics.median(runs))


class _Reporter:
    """Rich progress on ``console`` (if any): one bar over the benchmark's steps."""

    def __init__(self, console: Console | None, total: int) -> None:
        self._progress: Progress | None = None
        self._task: Any = None
        if console is not None:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            self._task = self._progress.add_task("tidesync bench", total=total)

    @contextmanager
    def running(self) -> Iterator[_Reporter]:
        if self._progress is None:
            yield self
            return
        with self._progress:
            yield self

    @contextmanager
    def step(self, description: str) -> Iterator[None]:
        if self._progress is not None:
            self._progress.update(self._task, description=description)
        yield
        if self._progress is not None:
            self._progress.advance(self._task)


# --------------------------------------------------------------------------- result rows


def _row(
    *,
    benchmark: str,
    baseline: str,
    rows: int,
    ts_runs: list[float],
    base_runs: list[float] | None,
    base_rows: int | None = None,
    target: str = "—",
    target_met: bool | None = None,
    check: str = "—",
    note: str = "",
    higher_base_is_better: bool = True,
) -> Row:
    ts = _median(ts_runs)
    row: Row = {
        "benchmark": benchmark,
        "baseline": baseline,
        "rows": rows,
        "tidesync_s": ts,
        "tidesync_rows_per_s": rows / ts if ts > 0 else None,
        "tidesync_runs": ts_runs,
        "baseline_rows": base_rows if base_rows is not None else rows,
        "baseline_s": None,
        "baseline_rows_per_s": None,
        "baseline_runs": base_runs,
        "baseline_extrapolated_s": None,
        "ratio": None,
        "target": target,
        "target_met": target_met,
        "check": check,
        "note": note,
    }
    if base_runs:
        b = _median(base_runs)
        b_rows = row["baseline_rows"]
        row["baseline_s"] = b
        row["baseline_rows_per_s"] = b_rows / b if b > 0 else None
        if b_rows != rows:
            row["baseline_extrapolated_s"] = b * rows / b_rows
        # time per row of the baseline over time per row of tidesync
        row["ratio"] = (b / b_rows) / (ts / rows) if ts > 0 and b_rows else None
    return row


# --------------------------------------------------------------------------- diff


def _duckdb_diff_sql(key: str, columns: Sequence[str]) -> str:
    def q(name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    flags = ",\n  ".join(f"o.{q(c)} IS DISTINCT FROM n.{q(c)} AS {q(c)}" for c in columns)
    changed = " OR ".join(q(c) for c in columns)
    return (
        f"SELECT * FROM (\n"
        f"  SELECT coalesce(n.{q(key)}, o.{q(key)}) AS {q(key)},\n"
        f"  o.{q(key)} IS NULL AS _inserted, n.{q(key)} IS NULL AS _deleted,\n  {flags}\n"
        f"  FROM old_t o FULL OUTER JOIN new_t n ON o.{q(key)} = n.{q(key)}\n"
        f") WHERE _inserted OR _deleted OR {changed}"
    )


def _diff_counts_tidesync(d: tidesync.Diff, columns: Sequence[str]) -> dict[str, int]:
    counts = {"inserted": d.inserted.num_rows, "deleted": d.deleted.num_rows, "updated": d.updated.num_rows}
    for c in columns:
        counts[c] = int(pc.sum(d.updated.column(c)).as_py() or 0)
    return counts


def _diff_counts_baseline(result: pa.Table, columns: Sequence[str]) -> dict[str, int]:
    ins = result.column("_inserted")
    dele = result.column("_deleted")
    upd = result.filter(pc.invert(pc.or_(ins, dele)))
    counts = {
        "inserted": int(pc.sum(ins).as_py() or 0),
        "deleted": int(pc.sum(dele).as_py() or 0),
        "updated": upd.num_rows,
    }
    for c in columns:
        counts[c] = int(pc.sum(upd.column(c)).as_py() or 0)
    return counts


def _compare_counts(expected: dict[str, int], got: dict[str, int]) -> str:
    bad = [f"{k}: {got.get(k)} vs {v}" for k, v in expected.items() if got.get(k) != v]
    return "ok" if not bad else "MISMATCH " + "; ".join(bad[:3])


def duckdb_diff(old: pa.Table, new: pa.Table, key: str) -> Callable[[], pa.Table]:
    """A DuckDB baseline of ``diff`` over these two tables (registered zero-copy once):
    returns a function running the full outer join and materializing the result as a
    pyarrow Table ``{key, _inserted, _deleted, <col>: differs}`` of changed keys only."""
    import duckdb

    columns = [c for c in old.schema.names if c != key]
    con = duckdb.connect()
    con.register("old_t", old)
    con.register("new_t", new)
    sql = _duckdb_diff_sql(key, columns)

    def run() -> pa.Table:
        return con.sql(sql).to_arrow_table()

    return run


def polars_diff(old: pa.Table, new: pa.Table, key: str) -> Any:
    """The polars baseline of ``diff``: ``pl.from_arrow`` both tables, full join on the key,
    ``ne_missing`` per column, keep changed keys; returns the collected DataFrame
    ``{key, _inserted, _deleted, <col>: differs}``."""
    import polars as pl

    columns = [c for c in old.schema.names if c != key]
    o = pl.from_arrow(old)
    n = pl.from_arrow(new)
    assert isinstance(o, pl.DataFrame) and isinstance(n, pl.DataFrame)
    flags = [pl.col(c).ne_missing(pl.col(f"{c}_new")).alias(c) for c in columns]
    return (
        o.lazy()
        .join(n.lazy(), on=key, how="full", suffix="_new", coalesce=False)
        .select(
            pl.coalesce(pl.col(f"{key}_new"), pl.col(key)).alias(key),
            pl.col(key).is_null().alias("_inserted"),
            pl.col(f"{key}_new").is_null().alias("_deleted"),
            *flags,
        )
        .filter(pl.col("_inserted") | pl.col("_deleted") | pl.any_horizontal(columns))
        .collect()
    )


def _bench_diff(old: pa.Table, new: pa.Table, repeats: int, label: str, rep: _Reporter) -> list[Row]:
    key = data.KEY
    columns = [c for c in old.schema.names if c != key]
    run_duckdb = duckdb_diff(old, new, key)

    def run_tidesync() -> object:
        return tidesync.diff(old, new, key)

    def run_polars() -> object:
        return polars_diff(old, new, key)

    with rep.step(f"diff{label}: checking results agree"):
        expected = _diff_counts_tidesync(tidesync.diff(old, new, key), columns)
        check_duck = _compare_counts(expected, _diff_counts_baseline(run_duckdb(), columns))
        check_pl = _compare_counts(expected, _diff_counts_baseline(polars_diff(old, new, key).to_arrow(), columns))
    with rep.step(f"diff{label}: timing tidesync, DuckDB, polars ×{repeats}"):
        t = _measure({"tidesync": run_tidesync, "duckdb": run_duckdb, "polars": run_polars}, repeats)
    note = (
        f"{old.num_rows:,} old vs {new.num_rows:,} new rows, {len(columns)} compared columns; "
        f"{expected['updated']:,} updated, {expected['inserted']:,} inserted, {expected['deleted']:,} deleted. "
        "tidesync also returns row indices and keeps new's row order; the baselines do not."
    )
    rows = new.num_rows
    return [
        _row(benchmark=f"diff{label}", baseline="DuckDB full join", rows=rows, ts_runs=t["tidesync"],
             base_runs=t["duckdb"], check=check_duck, note=note),
        _row(benchmark=f"diff{label}", baseline="polars full join", rows=rows, ts_runs=t["tidesync"],
             base_runs=t["polars"], check=check_pl, note=note),
    ]


# --------------------------------------------------------------------------- merge


def rows_by_key(result: Any, key: str) -> tuple[pa.Table, pa.Array]:
    """A merge result's rows and ``inserted`` flags in key order.

    Row order is not the same in tidesync and the reference (record mode writes rows in
    incoming order of the version written, the reference in order of first appearance:
    docs/semantics.md), and keys are unique in a merge's output, so sorting by key makes
    two results comparable row for row.
    """
    rows = pa.table(result.rows)
    inserted = result.inserted
    inserted = inserted.combine_chunks() if isinstance(inserted, pa.ChunkedArray) else pa.array(inserted)
    order = pc.sort_indices(rows.column(key))
    return rows.take(order), inserted.take(order)


def _merge_check(a: tidesync.MergeResult, b: Any, key: str) -> str:
    """Compare tidesync's merge with the reference's on the same input."""
    problems = []
    (a_rows, a_inserted), (b_rows, b_inserted) = rows_by_key(a, key), rows_by_key(b, key)
    same_rows = a_rows.schema.names == b_rows.schema.names and all(
        a_rows.column(i).equals(b_rows.column(i)) for i in range(a_rows.num_columns)
    )
    if not same_rows:
        problems.append(f"rows differ ({a_rows.num_rows} vs {b_rows.num_rows} rows)")
    if not a_inserted.equals(b_inserted):
        problems.append("inserted differs")
    if a.conflicts.num_rows != b.conflicts.num_rows:
        problems.append(f"{a.conflicts.num_rows} vs {b.conflicts.num_rows} conflicts")
    return "ok" if not problems else "MISMATCH vs reference: " + "; ".join(problems)


@contextmanager
def _threads(n: int) -> Iterator[None]:
    """Run the core with at most ``n`` threads (0 = one per core) inside the block."""
    previous = tidesync.max_threads()
    tidesync.set_max_threads(n)
    try:
        yield
    finally:
        tidesync.set_max_threads(previous)


def _bench_merge(
    local: pa.Table,
    incoming: pa.Table,
    mode: tidesync.MergeMode,
    repeats: int,
    reference_rows: int,
    rep: _Reporter,
    threads: int = 0,
) -> Row:
    key = data.KEY
    rows = incoming.num_rows
    label = f"merge {mode}" + (" (1 core)" if threads == 1 else "")
    with rep.step(f"{label}: timing tidesync ×{repeats}"), _threads(threads):
        result = tidesync.merge(local, incoming, key, mode)
        t = _measure({"tidesync": lambda: tidesync.merge(local, incoming, key, mode)}, repeats)
    ts_rps = rows / _median(t["tidesync"])
    base_runs: list[float] | None = None
    sub_rows: int | None = None
    check = "—"
    ref_repeats = max(1, min(repeats, 3))
    with rep.step(f"{label}: timing the Python reference on a subsample ×{ref_repeats}"):
        try:
            from tidesync import reference
        except ImportError as exc:
            check = f"reference unavailable ({exc})"
        else:
            sub_local, sub_in = data.subsample_merge(local, incoming, reference_rows)
            sub_rows = sub_in.num_rows
            check = _merge_check(
                tidesync.merge(sub_local, sub_in, key, mode), reference.merge(sub_local, sub_in, key, mode), key
            )
            base_runs = _measure({"reference": lambda: reference.merge(sub_local, sub_in, key, mode)}, ref_repeats, warmup=0)[
                "reference"
            ]
    conflicts = result.conflicts.num_rows
    note = (
        f"{local.num_rows:,} local + {rows:,} incoming versions → {result.rows.num_rows:,} rows written "
        f"({int(pc.sum(result.inserted).as_py() or 0):,} new), {conflicts:,} conflict rows."
    )
    if sub_rows is not None and sub_rows != rows:
        note += (
            f" Reference timed on a {sub_rows:,}-row proportional subsample (median of {ref_repeats}); "
            "its per-row throughput is extrapolated to the full size."
        )
    row = _row(benchmark=label, baseline="Python reference", rows=rows, ts_runs=t["tidesync"],
               base_runs=base_runs, base_rows=sub_rows, check=check, note=note)
    ratio = row["ratio"]
    speedup_ok = ratio is not None and ratio >= MERGE_MIN_SPEEDUP_VS_REFERENCE
    if mode == "record" and threads == 1:
        # The absolute target is for one core.
        row["target"] = f"≥{MERGE_MIN_SPEEDUP_VS_REFERENCE:.0f}× and ≥{MERGE_RECORD_MIN_ROWS_PER_S / 1e6:.0f}M rows/s"
        rate_ok = ts_rps >= MERGE_RECORD_MIN_ROWS_PER_S
        row["target_met"] = speedup_ok and rate_ok
        if not rate_ok:
            row["note"] += f" Missed the {MERGE_RECORD_MIN_ROWS_PER_S / 1e6:.0f}M rows/s target."
    else:
        row["target"] = f"≥{MERGE_MIN_SPEEDUP_VS_REFERENCE:.0f}×"
        row["target_met"] = speedup_ok
    if ratio is None:
        row["target_met"] = None
    return row


# --------------------------------------------------------------------------- digest


def arrow_buffers(table: pa.Table, columns: Sequence[str]) -> list[memoryview]:
    """The raw Arrow buffers (validity, offsets, values) of some columns, zero-copy."""
    out: list[memoryview] = []
    for name in columns:
        col = table.column(name)
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        out.extend(memoryview(b) for b in arr.buffers() if b is not None)
    return out


def xxh3_pass(buffers: Sequence[memoryview]) -> int:
    """Baseline: one streaming xxh3_64 over the concatenation of the buffers."""
    import xxhash

    h = xxhash.xxh3_64()
    for b in buffers:
        h.update(b)
    return h.intdigest()


def blake3_pass(buffers: Sequence[memoryview]) -> bytes:
    """Baseline: one streaming blake3 (single-threaded) over the concatenation of the buffers."""
    import blake3

    h = blake3.blake3()
    for b in buffers:
        h.update(b)
    return h.digest()


def _bench_digest(batch: pa.Table, repeats: int, rep: _Reporter) -> list[Row]:
    key = data.KEY
    bufs = arrow_buffers(batch, (key, "_hlc", "_node"))
    nbytes = sum(b.nbytes for b in bufs)

    def run_tidesync() -> pa.Table:
        return tidesync.digest(batch, key, DIGEST_BUCKETS)

    def run_xxh3() -> int:
        return xxh3_pass(bufs)

    def run_blake3() -> bytes:
        return blake3_pass(bufs)

    repeats = max(repeats, DIGEST_MIN_REPEATS)
    with rep.step(f"digest: timing tidesync, xxh3, blake3 ×{repeats}"):
        d = run_tidesync()
        counted = int(pc.sum(d.column("rows")).as_py() or 0)
        check = "ok" if counted == batch.num_rows and d.num_rows == DIGEST_BUCKETS else (
            f"MISMATCH: {d.num_rows} buckets holding {counted} rows"
        )
        t = _measure({"tidesync": run_tidesync, "xxh3": run_xxh3, "blake3": run_blake3}, repeats)
    note = (
        f"{batch.num_rows:,} rows, {DIGEST_BUCKETS} buckets; the baselines hash the {nbytes / 2**20:.1f} MiB of "
        "key/_hlc/_node Arrow buffers in one streaming pass (no per-row hashing, no bucketing)."
    )
    rows = batch.num_rows
    xrow = _row(benchmark="digest", baseline="xxh3_64 pass", rows=rows, ts_runs=t["tidesync"],
                base_runs=t["xxh3"], check=check, note=note,
                target=f"within {DIGEST_MAX_SLOWDOWN_VS_XXH3:.0f}× (≥{1 / DIGEST_MAX_SLOWDOWN_VS_XXH3:.1f}×)")
    if xrow["ratio"] is not None:
        xrow["target_met"] = xrow["ratio"] >= 1 / DIGEST_MAX_SLOWDOWN_VS_XXH3
    brow = _row(benchmark="digest", baseline="blake3 pass", rows=rows, ts_runs=t["tidesync"],
                base_runs=t["blake3"], check=check, note=note)
    return [xrow, brow]


# --------------------------------------------------------------------------- hlc


def pyarrow_order(changes: pa.Table, by: Sequence[str] = LOGICAL_ORDER_BY) -> pa.Array:
    """Baseline of ``logical_order``: ``pyarrow.compute.sort_indices``, nulls first."""
    # pyarrow >= 25 takes null placement per sort key (and deprecates the global option)
    if int(pa.__version__.split(".")[0]) >= 25:
        options = pc.SortOptions([(c, "ascending", "at_start") for c in by])
    else:
        options = pc.SortOptions([(c, "ascending") for c in by], null_placement="at_start")
    return pc.sort_indices(changes, options=options)


def _bench_hlc(changes: pa.Table, repeats: int, rep: _Reporter) -> Row:
    def run_tidesync() -> pa.Array:
        return tidesync.logical_order(changes, LOGICAL_ORDER_BY)

    def run_pyarrow() -> pa.Array:
        return pyarrow_order(changes)

    with rep.step(f"hlc: timing logical_order, pyarrow sort_indices ×{repeats}"):
        got = run_tidesync().cast(pa.uint64())
        check = "ok" if got.equals(run_pyarrow()) else "MISMATCH: different order than pyarrow"
        t = _measure({"tidesync": run_tidesync, "pyarrow": run_pyarrow}, repeats)
    note = (
        f"{changes.num_rows:,} changes from several nodes' logs, ordered by {', '.join(LOGICAL_ORDER_BY)} "
        "(int64, utf8, utf8, utf8)."
    )
    return _row(benchmark="hlc logical_order", baseline="pyarrow sort_indices", rows=changes.num_rows,
                ts_runs=t["tidesync"], base_runs=t["pyarrow"], check=check, note=note)


# --------------------------------------------------------------------------- driver


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "tidesync": tidesync.__version__,
        "pyarrow": pa.__version__,
    }
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = int(f.readline().split()[1])
        info["memory_gib"] = round(kib / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    for dist in ("duckdb", "polars", "xxhash", "blake3", "numpy"):
        try:
            info[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info


def run_core_bench(
    rows: int = 1_000_000,
    repeats: int = 5,
    console: Console | None = None,
    *,
    only: Sequence[str] | None = None,
    reference_rows: int = 20_000,
    diff_key_types: Sequence[data.KeyType] = ("string", "uuid16"),
    show_table: bool = True,
    seed: int = 0,
) -> list[Row]:
    """Run the core benchmarks; returns one dict per (benchmark, baseline) pair.

    ``console``: where the progress bar and (with ``show_table``) the result table
    go; None runs silently. ``only``: a subset of ``SECTIONS``.
    """
    unknown = set(only or ()) - set(SECTIONS)
    if unknown:
        raise tidesync.InvalidInputError(f"unknown benchmark(s) {sorted(unknown)}; choose from {list(SECTIONS)}")
    if rows < 10 or repeats < 1:
        raise tidesync.InvalidInputError("need rows >= 10 and repeats >= 1")
    sections = [s for s in SECTIONS if only is None or s in only]
    steps = {"diff": 3 * len(diff_key_types), "merge": 7, "digest": 1, "hlc": 2}
    total = sum(steps[s] for s in sections) + (0 if sections == ["hlc"] else 1)
    rep = _Reporter(console, total)
    results: list[Row] = []
    with rep.running():
        base = pa.table({})
        if sections != ["hlc"]:
            with rep.step(f"generating {rows:,} EMR rows"):
                base = data.make_table(rows, seed=seed)
        if "diff" in sections:
            for kt in diff_key_types:
                label = "" if kt == "string" else f" ({kt} key)"
                with rep.step(f"diff{label}: deriving the changed table"):
                    old = base if kt == "string" else data.make_table(rows, seed=seed, key_type=kt)
                    new = data.derive_changed(old, seed=seed + 1)
                results += _bench_diff(old, new, repeats, label, rep)
                del old, new
        if "merge" in sections:
            with rep.step("merge: generating incoming versions (record and field mode)"):
                incoming = data.make_incoming(base, seed=seed + 2)
                local_f = data.make_table(rows, seed=seed + 5, field_stamps=True)
                incoming_f = data.make_incoming(local_f, seed=seed + 2)
            results.append(_bench_merge(base, incoming, "record", repeats, reference_rows, rep))
            results.append(_bench_merge(base, incoming, "record", repeats, reference_rows, rep, threads=1))
            results.append(_bench_merge(local_f, incoming_f, "field", repeats, reference_rows, rep))
            del incoming, local_f, incoming_f
        if "digest" in sections:
            results += _bench_digest(base, repeats, rep)
        if "hlc" in sections:
            with rep.step(f"hlc: generating {rows:,} changes"):
                changes = data.make_changes(rows, seed=seed + 4)
            results.append(_bench_hlc(changes, repeats, rep))
    if console is not None and show_table:
        console.print(render_table(results, repeats=repeats))
        for line in render_notes(results):
            console.print(line, highlight=False, markup=False)
    return results


# --------------------------------------------------------------------------- output


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_rate(r: float | None) -> str:
    if r is None:
        return "—"
    if r >= 1e6:
        return f"{r / 1e6:.2f}M rows/s"
    if r >= 1e3:
        return f"{r / 1e3:.1f}k rows/s"
    return f"{r:.0f} rows/s"


def _cell(rate: float | None, seconds: str) -> str:
    return "—" if rate is None else f"{_fmt_rate(rate)} ({seconds})"


def _fmt_ratio(r: float | None) -> str:
    if r is None:
        return "—"
    return f"{r:.1f}×" if r >= 10 else f"{r:.2f}×"


def format_cells(row: Row) -> dict[str, str]:
    """The display strings of one result row (shared by the rich table and the docs)."""
    base = _fmt_s(row["baseline_s"])
    if row["baseline_extrapolated_s"] is not None:
        base = f"≈{_fmt_s(row['baseline_extrapolated_s'])} extrap."
    met = row["target_met"]
    result = "—" if met is None else ("PASS" if met else "FAIL")
    if str(row["check"]).startswith("MISMATCH"):
        result += " (results differ!)"
    elif str(row["check"]).startswith("reference unavailable"):
        result = "n/a (no reference)"
    return {
        "benchmark": row["benchmark"],
        "baseline": row["baseline"],
        "tidesync": _cell(row["tidesync_rows_per_s"], _fmt_s(row["tidesync_s"])),
        "baseline_median": _cell(row["baseline_rows_per_s"], base),
        "ratio": _fmt_ratio(row["ratio"]),
        "target": row["target"],
        "result": result,
    }


def render_table(results: Sequence[Row], *, repeats: int | None = None) -> Table:
    title = "tidesync benchmarks" + (f" (medians of {repeats} runs)" if repeats else "")
    table = Table(title=title, caption="ratio = how many times faster tidesync is per row than the baseline")
    table.add_column("benchmark")
    table.add_column("baseline")
    table.add_column("tidesync median", justify="right")
    table.add_column("baseline median", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("target")
    table.add_column("result")
    for row in results:
        cells = format_cells(row)
        style = {"PASS": "green", "FAIL": "red"}.get(cells["result"][:4], "")
        table.add_row(
            cells["benchmark"],
            cells["baseline"],
            cells["tidesync"],
            cells["baseline_median"],
            cells["ratio"],
            cells["target"],
            f"[{style}]{cells['result']}[/]" if style else cells["result"],
        )
    return table


def render_notes(results: Sequence[Row]) -> list[str]:
    seen: set[tuple[str, str]] = set()
    lines = []
    for row in results:
        for text in (row["note"], row["check"] if row["check"] not in ("ok", "—") else ""):
            if text and (row["benchmark"], text) not in seen:
                seen.add((row["benchmark"], text))
                lines.append(f"• {row['benchmark']}: {text}")
    return lines


def render_markdown(results: Sequence[Row]) -> str:
    """The result table as GitHub markdown (for docs/benchmarks.md)."""
    head = "| benchmark | baseline | tidesync median | baseline median | ratio | target | result |"
    lines = [head, "|---|---|---:|---:|---:|---|---|"]
    for row in results:
        c = format_cells(row)
        lines.append(
            f"| {c['benchmark']} | {c['baseline']} | {c['tidesync']} | {c['baseline_median']} | "
            f"{c['ratio']} | {c['target']} | {c['result']} |"
        )
    return "\n".join(lines)
