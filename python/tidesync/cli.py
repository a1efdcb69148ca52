"""The ``tidesync`` command line: ``schema install|uninstall|status``, ``bench``, ``demo``, ``version``.

Kept small: the work lives in ``tidesync.pg``, ``tidesync.sqlite``, ``tidesync.bench`` and
``tidesync.demo``. Errors print one
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
    type=click.Choice(["diff", "merge", "digest", "hlc", "window", "apply", "triggers"]),
    multiple=True,
    help="Run only this benchmark (repeatable).",
)
@click.option("--db", default=None, help="PostgreSQL DSN for the store benchmarks (default: a throwaway cluster).")
def bench(rows: int, repeats: int, as_json: bool, only: tuple[str, ...], db: str | None) -> None:
    """Time the core and the PostgreSQL store against DuckDB, polars, COPY, MERGE and the Python reference."""
    from rich.console import Console

    from tidesync.bench import core_bench, store_bench

    console = Console(stderr=as_json)
    core = [s for s in only if s in core_bench.SECTIONS] if only else list(core_bench.SECTIONS)
    store = [s for s in only if s in store_bench.SECTIONS] if only else list(store_bench.SECTIONS)
    results = []
    if core:
        results += core_bench.run_core_bench(rows, repeats, console, only=core, show_table=not as_json)
    if store:
        results += store_bench.run_store_bench(rows, repeats, console, only=store, dsn=db, show_table=not as_json)
    if as_json:
        out = {"rows": rows, "repeats": repeats, "machine": core_bench.machine_info(), "results": results}
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


SCHEMAS = ("demo",)


def _registry(name: str) -> Any:
    if name == "demo":
        from tidesync.schemas.demo import REGISTRY

        return REGISTRY
    raise click.BadParameter(f"unknown schema {name!r}", param_hint="--schema")  # pragma: no cover


def open_store(db: str, registry: Any) -> Any:
    """A store for ``db``: a PostgreSQL DSN (postgres:// or postgresql://) or a SQLite file path."""
    if db.startswith(("postgres://", "postgresql://")) or "host=" in db or "dbname=" in db:
        from tidesync.pg import PostgresStore

        return PostgresStore(db, registry)
    from tidesync.sqlite import SQLiteStore

    return SQLiteStore(db, registry)


_db_option = click.option(
    "--db", required=True, envvar="TIDESYNC_DB", help="PostgreSQL DSN (postgresql://...) or SQLite file path."
)
_schema_option = click.option(
    "--schema", "schema_name", type=click.Choice(SCHEMAS), default="demo", show_default=True,
    help="Which table registry to install.",
)  # fmt: skip


@main.group()
def schema() -> None:
    """Install, inspect or remove tidesync's metadata in a node database."""


@schema.command("install")
@_db_option
@_schema_option
@click.option("--node-id", required=True, help="This node's id (stamped on every version it writes).")
@click.option(
    "--create-tables", is_flag=True,
    help="First create the schema's application tables (for the demo schema; real applications own their DDL).",
)  # fmt: skip
def schema_install(db: str, schema_name: str, node_id: str, create_tables: bool) -> None:
    """Add metadata columns, capture triggers, tombstones and bookkeeping. Idempotent."""
    registry = _registry(schema_name)
    with open_store(db, registry) as store:
        if create_tables:
            store.create_app_tables()
        store.install(node_id)
        click.echo(f"tidesync installed: {len(registry)} synced tables, node {node_id!r}")


@schema.command("uninstall")
@_db_option
@_schema_option
def schema_uninstall(db: str, schema_name: str) -> None:
    """Remove everything install added; application data is left as it is."""
    with open_store(db, _registry(schema_name)) as store:
        store.uninstall()
        click.echo("tidesync uninstalled; application tables and rows are untouched")


@schema.command("status")
@_db_option
@_schema_option
def schema_status(db: str, schema_name: str) -> None:
    """Show the node id, pending changes per table, conflicts and quarantined rows."""
    with open_store(db, _registry(schema_name)) as store:
        node = store.node_id()
        window = store.read_window(0)
        click.echo(f"node {node!r}")
        for name, table in window.tables.items():
            click.echo(f"  {name:<26} {table.num_rows:>10} versions")
        click.echo(f"conflicts logged: {store.conflicts().num_rows}; quarantined rows: {store.quarantine().num_rows}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
