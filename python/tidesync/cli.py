"""The ``tidesync`` command line: ``tidesync bench``, ``tidesync demo``, ``tidesync version``.

Kept small: the work lives in ``tidesync.bench`` and ``tidesync.demo``. Errors print one
line on stderr and exit with status 1 (2 for usage errors, as click does).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from tidesync.errors import SyncError


_BENCH_DEPS = {"duckdb", "polars", "xxhash", "blake3", "numpy"}


class _Failure(click.ClickException):
    """A one-line error on stderr and exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"tidesync: error: {self.format_message()}", err=True)


class _Group(click.Group):
    """Turns tidesync's own errors (and a missing optional dependency) into a one-line failure."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SyncError as exc:
            raise _Failure(f"{type(exc).__name__}: {exc}") from exc
        except ModuleNotFoundError as exc:
            hint = "; install the bench extra: pip install 'tidesync[bench]'" if exc.name in _BENCH_DEPS else ""
            raise _Failure(f"missing module {exc.name!r}{hint}") from exc


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """tidesync: offline-first sync for health records."""


@main.command()
def version() -> None:
    """Print the tidesync version."""
    from tidesync import __version__

    click.echo(f"tidesync {__version__}")


@main.command()
@click.option("--rows", type=click.IntRange(min=10), default=1_000_000, show_default=True, help="Rows per table.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs (medians).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@click.option(
    "--only",
    type=click.Choice(["diff", "merge", "digest", "hlc"]),
    multiple=True,
    help="Run only this benchmark (repeatable).",
)
def bench(rows: int, repeats: int, as_json: bool, only: tuple[str, ...]) -> None:
    """Time the native core against DuckDB, polars, pyarrow, xxhash/blake3 and the Python reference."""
    from rich.console import Console

    from tidesync.bench.core_bench import machine_info, run_core_bench

    console = Console(stderr=as_json)
    results = run_core_bench(rows, repeats, console, only=only or None, show_table=not as_json)
    if as_json:
        out = {"rows": rows, "repeats": repeats, "machine": machine_info(), "results": results}
        click.echo(json.dumps(out, indent=2))


@main.command()
@click.option("--patients", type=click.IntRange(min=1), default=20_000, show_default=True, help="Rows per copy.")
@click.option("--facilities", type=click.IntRange(min=1), default=2, show_default=True, help="Offline nodes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def demo(patients: int, facilities: int, as_json: bool) -> None:
    """Run the end-to-end sync demo (capture, merge, pull, verify by digest)."""
    from tidesync.demo import run_demo

    summary = run_demo(patients=patients, facilities=facilities, json_output=as_json)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
