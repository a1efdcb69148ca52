"""The ``tidesync`` command line: ``schema install|uninstall|status``, ``central``, ``node``, ``seed``,
``sync``, ``status``, ``verify``, ``conflicts``, ``quarantine``, ``import``, ``export``, ``bench``, ``demo``,
``version``.

Kept small: the work lives in ``tidesync.pg``, ``tidesync.sqlite``, ``tidesync.sync``, ``tidesync.seed``,
``tidesync.datasets``, ``tidesync.bench`` and ``tidesync.demo``. Errors print one line on stderr and exit
with status 1 (2 for usage errors, as click does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import click
from rich.console import Console

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
    from tidesync.memory import prefer_jemalloc

    prefer_jemalloc()


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
    type=click.Choice(["diff", "merge", "digest", "hlc", "window", "apply", "triggers", "sync", "incremental", "load",
                       "seed"]),
    multiple=True,
    help="Run only this benchmark (repeatable).",
)
@click.option("--db", default=None, help="PostgreSQL DSN for the store benchmarks (default: a throwaway cluster).")
def bench(rows: int, repeats: int, as_json: bool, only: tuple[str, ...], db: str | None) -> None:
    """Time the core and the PostgreSQL store against DuckDB, polars, COPY, MERGE and the Python reference."""

    from tidesync.bench import core_bench, seed_bench, store_bench, sync_bench

    console = Console(stderr=as_json)
    core = [s for s in only if s in core_bench.SECTIONS] if only else list(core_bench.SECTIONS)
    store = [s for s in only if s in store_bench.SECTIONS] if only else list(store_bench.SECTIONS)
    network = [s for s in only if s in sync_bench.SECTIONS] if only else list(sync_bench.SECTIONS)
    seeding = "seed" in only or not only
    results = []
    if core:
        results += core_bench.run_core_bench(rows, repeats, console, only=core, show_table=not as_json)
    if store:
        results += store_bench.run_store_bench(rows, repeats, console, only=store, dsn=db, show_table=not as_json)
    if network:
        results += sync_bench.run_sync_bench(rows, repeats, console, only=network, dsn=db, show_table=not as_json)
    if seeding:
        results += seed_bench.run_seed_bench(rows, repeats, console, dsn=db, show_table=not as_json)
    if as_json:
        out = {"rows": rows, "repeats": repeats, "machine": core_bench.machine_info(), "results": results}
        click.echo(json.dumps(out, indent=2))


@main.command()
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Directory for the mobile device's SQLite file (kept); default: a temporary directory, removed.")
@click.option("--patients", type=click.IntRange(min=50), default=5_000, show_default=True,
              help="Synthetic patients (each with encounters and vitals).")
@click.option("--facilities", type=click.IntRange(min=2), default=2, show_default=True,
              help="Facility servers (PostgreSQL databases).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout (progress on stderr).")
def demo(workdir: str | None, patients: int, facilities: int, as_json: bool) -> None:
    """Run a whole sync network here: central, facilities and a mobile device, over HTTP.

    Starts a throwaway PostgreSQL, generates patients, walks through initial sync,
    field-wise merge of offline edits, an offline facility catching up, a patient
    moving facility and an outreach device, then verifies every node's scope and
    prints per-cycle timings. Cleans up after itself.
    """
    from tidesync.demo import DemoCheckFailed, run_demo

    try:
        summary = run_demo(patients=patients, facilities=facilities, workdir=workdir, json_output=as_json)
    except DemoCheckFailed as exc:
        if as_json:
            click.echo(json.dumps(exc.summary, indent=2, default=str))
        raise
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))


SCHEMAS = ("demo",)


def _registry(name: str) -> Any:
    from tidesync.schemas import registry_named

    return registry_named(name)


def open_store(db: str, registry: Any, *, create: bool = False) -> Any:
    from tidesync.store import open_store as _open

    return _open(db, registry, create=create)


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
    with open_store(db, registry, create=True) as store:
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
        statuses = store.quarantine().column("status").to_pylist()
        held = statuses.count("held")
        resolved = f" ({len(statuses) - held} retried or discarded)" if len(statuses) > held else ""
        click.echo(f"conflicts logged: {store.conflicts().num_rows}; quarantined rows held: {held}{resolved}")


# ----------------------------------------------------------------------------- central server


@main.group("central")
def central_group() -> None:
    """Set up and run the central server."""


@central_group.command("init")
@click.option("--db", required=True, envvar="TIDESYNC_DB", help="PostgreSQL DSN of the central database.")
@_schema_option
def central_init(db: str, schema_name: str) -> None:
    """Make a PostgreSQL database the central server (idempotent)."""
    from tidesync.pg import PostgresStore
    from tidesync.sync import central

    with PostgresStore(db, _registry(schema_name)) as store:
        central.init(store)
    click.echo("central server database ready; register nodes with `tidesync central add-node`")


@central_group.command("add-node")
@click.option("--db", required=True, envvar="TIDESYNC_DB", help="PostgreSQL DSN of the central database.")
@click.option("--name", required=True, help="The node's name, which is also its node id.")
@click.option("--kind", type=click.Choice(["facility", "mobile"]), required=True)
@click.option("--facility", "facility_id", required=True, help="The facility (uuid) the node belongs to.")
@_schema_option
def central_add_node(db: str, name: str, kind: str, facility_id: str, schema_name: str) -> None:
    """Register a node; prints its token on the last line (shown once, stored only as a hash)."""
    from tidesync.pg import PostgresStore
    from tidesync.sync import central

    with PostgresStore(db, _registry(schema_name)) as store:
        token = central.add_node(store, name, kind, facility_id)
    click.echo(f"node {name!r} ({kind}, facility {facility_id}) registered; its token:", err=True)
    click.echo(token)


@central_group.command("serve")
@click.option("--db", required=True, envvar="TIDESYNC_DB", help="PostgreSQL DSN of the central database.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8700, show_default=True)
@click.option("--cert", type=click.Path(exists=True, dir_okay=False), help="TLS certificate (PEM).")
@click.option("--key", type=click.Path(exists=True, dir_okay=False), help="TLS private key (PEM).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Worker processes.")
@click.option("--max-drift-ms", type=click.IntRange(min=0), default=None, help="Clamp stamps this far ahead.")
@click.option("--max-page-bytes", type=click.IntRange(min=1024), default=None, help="Largest page accepted.")
@click.option("--page-rows", type=click.IntRange(min=1), default=None, help="Rows per page (both directions).")
@click.option("--seed-dir", type=click.Path(file_okay=False), default=None,
              help="Where seed files for nodes are made (default: tidesync-seeds in the temp directory).")
@_schema_option
def central_serve(db: str, host: str, port: int, cert: str | None, key: str | None, workers: int,
                  max_drift_ms: int | None, max_page_bytes: int | None, page_rows: int | None,
                  seed_dir: str | None, schema_name: str) -> None:  # fmt: skip
    """Serve the sync protocol over HTTP(S) until interrupted."""
    from tidesync.pg import PostgresStore
    from tidesync.sync import central
    from tidesync.sync.client import is_loopback
    from tidesync.sync.serve import serve

    registry = _registry(schema_name)
    with PostgresStore(db, registry) as store, store.connection.cursor() as cur:
        central._require_central(cur)
    if cert is None and not is_loopback(host):
        click.echo(f"tidesync: warning: serving plain HTTP on {host}; nodes will refuse it unless they pass "
                   "--allow-http. Use --cert and --key.", err=True)  # fmt: skip
    defaults = central.Settings()
    settings = central.Settings(
        max_drift_ms=defaults.max_drift_ms if max_drift_ms is None else max_drift_ms,
        max_page_bytes=defaults.max_page_bytes if max_page_bytes is None else max_page_bytes,
        page_rows=defaults.page_rows if page_rows is None else page_rows,
        seed_dir=seed_dir,
    )
    serve(db, registry, host=host, port=port, certfile=cert, keyfile=key, workers=workers, settings=settings)


# ----------------------------------------------------------------------------- nodes


_F = TypeVar("_F", bound=Callable[..., Any])


def _central_options(
    *, required: bool, token_help: str = "The node's token from `tidesync central add-node`."
) -> Callable[[_F], _F]:
    """--central, --token, --ca and --allow-http: how a node reaches its central server."""

    def apply(f: _F) -> _F:
        for option in reversed([
            click.option("--central", "url", required=required, help="The central server's URL (https://...)."),
            click.option("--token", required=required, help=token_help),
            click.option("--ca", type=click.Path(exists=True, dir_okay=False), help="CA bundle to verify the server with."),
            click.option("--allow-http", is_flag=True, help="Allow plain HTTP to a non-loopback address."),
        ]):  # fmt: skip
            f = option(f)
        return f

    return apply


@main.group("node")
def node_group() -> None:
    """Set up a facility server or mobile device as a sync node."""


@node_group.command("init")
@_db_option
@_central_options(required=True)
@click.option("--seed", "with_seed", is_flag=True,
              help="Then load the node's whole scope from central in bulk (faster than a first sync).")
@click.option("--spool", type=click.Path(file_okay=False), default=None,
              help="Where a --seed download waits (default: a tidesync folder in the temp directory).")
@_schema_option
def node_init(db: str, url: str, token: str, ca: str | None, allow_http: bool, with_seed: bool, spool: str | None,
              schema_name: str) -> None:  # fmt: skip
    """Install tidesync in the node's database and remember its central server."""
    from tidesync.sync.client import init_node

    registry = _registry(schema_name)
    with open_store(db, registry, create=True) as store:
        if registry.name == "demo":
            store.create_app_tables()  # the demo's DDL is idempotent (IF NOT EXISTS)
        node_id = init_node(store, url, token, ca=ca, allow_http=allow_http)
        if with_seed:
            _seed_over_network(store, spool)
    click.echo(f"node {node_id!r} ready; run `tidesync sync --db {db}`")


@node_group.command("restore")
@_db_option
@_central_options(required=True, token_help="The lost node's token (or a new one from `central add-node`).")
@click.option("--spool", type=click.Path(file_okay=False), default=None, help="Where the seed download waits.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_schema_option
def node_restore(db: str, url: str, token: str, ca: str | None, allow_http: bool, spool: str | None, as_json: bool,
                 schema_name: str) -> None:  # fmt: skip
    """Rebuild a lost facility server (or device) from central's copy and resume syncing.

    Everything the node had synced comes back; edits it made after its last good sync
    are gone with it (docs/operations.md, "Failover").
    """
    from tidesync.sync.client import init_node, sync_once, client_for

    registry = _registry(schema_name)
    with open_store(db, registry, create=True) as store:
        if registry.name == "demo":
            store.create_app_tables()
        init_node(store, url, token, ca=ca, allow_http=allow_http)
        report = _seed_over_network(store, spool, quiet=as_json)
        with client_for(store) as client:
            cycle = sync_once(store, client)
    if as_json:
        click.echo(json.dumps({"seed": dataclasses.asdict(report), "first_sync": cycle.as_dict()}))
    else:
        click.echo(f"node {report.node!r} restored: {sum(report.rows.values()):,} rows from central in "
                   f"{report.seconds:.1f} s, then a sync pulled {cycle.pulled_rows:,} newer rows; syncing as usual "
                   "from here (edits made there after its last good sync are not recoverable)")  # fmt: skip


def _seed_over_network(store: Any, spool: str | None, *, quiet: bool = False) -> Any:
    import tempfile

    from tidesync import seed
    from tidesync.sync.client import client_for

    folder = spool or str(Path(tempfile.gettempdir()) / "tidesync-seed")
    with client_for(store) as client, _rows_progress(Console(stderr=True), quiet) as step:
        report = seed.seed_from_central(store, client, folder, progress=step)
    if not quiet:
        click.echo(f"seeded {sum(report.rows.values()):,} rows in {report.seconds:.1f} s "
                   f"(watermark {report.watermark})", err=True)  # fmt: skip
    return report


# ----------------------------------------------------------------------------- seeds


@main.group("seed")
def seed_group() -> None:
    """Seed files: a node's whole scope as one signed file, for places without bandwidth."""


@seed_group.command("export")
@click.option("--db", required=True, envvar="TIDESYNC_DB", help="PostgreSQL DSN of the central database.")
@click.option("--node", "node_name", required=True, help="The node the seed is for (its scope is exported).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The seed file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@_schema_option
def seed_export(db: str, node_name: str, out: str, overwrite: bool, as_json: bool, schema_name: str) -> None:
    """Write a node's scope at central as one signed, checksummed file."""
    from tidesync import seed
    from tidesync.pg import PostgresStore

    start = time.perf_counter()
    with PostgresStore(db, _registry(schema_name)) as store, _rows_progress(Console(stderr=True), as_json) as step:
        manifest = seed.export_seed(store, node_name, out, overwrite=overwrite, progress=step)
        key = seed.public_key_text(seed.signing_key(store))
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(manifest), "id": manifest.id, "key": key}))
        return
    size = Path(out).stat().st_size
    click.echo(f"{out}: {manifest.rows:,} rows for node {node_name!r} ({size / 2**20:,.1f} MiB, "
               f"{time.perf_counter() - start:.1f} s), watermark {manifest.watermark}")  # fmt: skip
    click.echo(f"load it with: tidesync seed import {out} --db NODE_DB --key {key}")


@seed_group.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@_db_option
@click.option("--key", "public_key", default=None,
              help="Central's seed key (`tidesync seed key`); default: the one the node already knows.")
@_central_options(required=False, token_help="The node's token: with --central, also set the node up to sync.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_schema_option
def seed_import(file: str, db: str, public_key: str | None, url: str | None, token: str | None, ca: str | None,
                allow_http: bool, as_json: bool, schema_name: str) -> None:  # fmt: skip
    """Load a seed file into a new node (rerun to resume an interrupted load)."""
    from tidesync import seed
    from tidesync.sync.client import init_node

    if (url is None) != (token is None):
        raise click.UsageError("--central and --token go together")
    registry = _registry(schema_name)
    with open_store(db, registry, create=True) as store:
        if registry.name == "demo":
            store.create_app_tables()
        with _rows_progress(Console(stderr=True), as_json) as step:
            report = seed.import_seed(store, file, public_key=public_key, progress=step)
        if url is not None and token is not None:
            if token.rsplit(".", 1)[0] != report.node:
                raise SyncError(f"the token is for node {token.rsplit('.', 1)[0]!r}, the seed for {report.node!r}")
            init_node(store, url, token, ca=ca, allow_http=allow_http)
    if as_json:
        click.echo(json.dumps(dataclasses.asdict(report)))
        return
    resumed = f" ({len(report.resumed)} tables were already loaded)" if report.resumed else ""
    click.echo(f"node {report.node!r}: {sum(report.rows.values()):,} rows loaded in {report.seconds:.1f} s{resumed}; "
               f"its next sync catches up from the seed's watermark {report.watermark}")  # fmt: skip


@seed_group.command("key")
@click.option("--db", required=True, envvar="TIDESYNC_DB", help="PostgreSQL DSN of the central database.")
@_schema_option
def seed_key(db: str, schema_name: str) -> None:
    """Print central's public seed key (what `seed import --key` checks files against)."""
    from tidesync import seed
    from tidesync.pg import PostgresStore

    with PostgresStore(db, _registry(schema_name)) as store:
        click.echo(seed.public_key_text(seed.signing_key(store)))


@main.command("sync")
@_db_option
@click.option("--watch", is_flag=True, help="Keep syncing every --interval seconds.")
@click.option("--interval", type=click.FloatRange(min=0.1), default=None,
              help="Seconds between cycles with --watch (default: 60 on PostgreSQL, 300 on SQLite).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per cycle on stdout.")
@_schema_option
def sync_cmd(db: str, watch: bool, interval: float | None, as_json: bool, schema_name: str) -> None:
    """Sync with the central server: one cycle, or forever with --watch."""
    from rich.console import Console

    from tidesync.sync import client as sync_client

    console = Console(stderr=True)
    with open_store(db, _registry(schema_name)) as store, sync_client.client_for(store) as central:

        def show(report: Any, error: BaseException | None) -> None:
            if as_json:
                data = report.as_dict() if report is not None else {"ok": False, "error": f"{type(error).__name__}: {error}"}
                click.echo(json.dumps(data))
            elif report is not None:
                console.print(
                    f"synced: pushed {report.pushed_rows} rows, pulled {report.pulled_rows} rows, "
                    f"{report.conflicts} conflicts, {report.quarantined} quarantined, "
                    f"{report.seconds:.2f} s"
                )
            else:
                console.print(f"[red]sync failed:[/] {type(error).__name__}: {error}; will retry")

        if not watch:
            with _progress(console, as_json) as progress:
                report = sync_client.sync_once(store, central, progress=progress)
            show(report, None)
            return
        kind = "postgres" if type(store).__name__ == "PostgresStore" else "sqlite"
        every = interval if interval is not None else sync_client.DEFAULT_INTERVAL_S[kind]
        try:
            sync_client.watch(store, central, every, on_cycle=show)
        except KeyboardInterrupt:
            console.print("stopped")


@contextlib.contextmanager
def _progress(console: Any, quiet: bool) -> Any:
    """A rich progress bar for pages pushed and pulled (nothing when printing JSON)."""
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:  # fmt: skip
        tasks: dict[str, Any] = {}

        def step(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(f"{what} pages", total=total)
            bar.update(tasks[what], completed=done, total=total)

        yield step


@contextlib.contextmanager
def _rows_progress(console: Any, quiet: bool, units: Mapping[str, str] | None = None) -> Any:
    """Rich progress bars for work counted in rows, bytes or steps: done/total, rate, ETA
    (a total of 0 means not known yet: the bar then just counts). ``units``: the unit of
    each kind of work by its name (default: bytes for downloads and checks, else rows)."""
    if quiet:
        yield lambda what, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    unit_of = {"download": "B", "check": "B", **(units or {})}
    rate = TextColumn("{task.fields[rate]}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), rate, TimeRemainingColumn(),
                  console=console, transient=True) as bar:  # fmt: skip
        tasks: dict[str, Any] = {}

        def step(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total or None, rate="")
            task = tasks[what]
            speed = bar.tasks[task].speed  # rich's own moving average
            unit = unit_of.get(what, "rows")
            bar.update(task, completed=done, total=total or None, rate=f"{speed:,.0f} {unit}/s" if speed else "")

        yield step


@main.command("status")
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_schema_option
def status_cmd(db: str, as_json: bool, schema_name: str) -> None:
    """What a node (cursors, pending changes, conflicts, quarantine) or the central server
    (nodes, recent sessions) looks like."""
    from tidesync.sync.status import node_status, render

    info = node_status(db, _registry(schema_name))
    if as_json:
        click.echo(json.dumps(info, default=str))
    else:
        render(info)


@main.group("conflicts")
def conflicts_group() -> None:
    """The conflict log: the losing values of every concurrent edit, kept for review."""


@conflicts_group.command("list")
@_db_option
@click.option("--table", default=None, help="Only this table's conflicts.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="The newest this many.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_schema_option
def conflicts_list(db: str, table: str | None, limit: int, as_json: bool, schema_name: str) -> None:
    """The newest conflicts: table, key, the fields that lost, both stamps."""
    from rich.console import Console
    from rich.table import Table

    from tidesync.review import list_conflicts

    with open_store(db, _registry(schema_name)) as store:
        items = list_conflicts(store, table, limit)
    if as_json:
        click.echo(json.dumps(items, default=str))
        return
    out = Table(title=f"conflicts ({len(items)} newest)")
    for col in ("id", "table", "key", "lost fields", "winner", "loser", "recorded"):
        out.add_column(col, no_wrap=col in ("id", "key"))
    for c in items:
        out.add_row(str(c["id"]), c["table"], c["key"], ", ".join(c["lost_columns"]) or "—",
                    f"{c['winner']['node']} {c['winner']['at']}", f"{c['loser']['node']} {c['loser']['at']}",
                    str(c["recorded_at"])[:19])  # fmt: skip
    Console().print(out)


@conflicts_group.command("show")
@_db_option
@click.argument("conflict_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_schema_option
def conflicts_show(db: str, conflict_id: int, as_json: bool, schema_name: str) -> None:
    """One conflict: the losing version beside the row as it is now, and why the winner won."""
    from rich.console import Console
    from rich.table import Table

    from tidesync.review import show_conflict

    with open_store(db, _registry(schema_name)) as store:
        c = show_conflict(store, conflict_id)
    if as_json:
        click.echo(json.dumps(c, default=str))
        return
    console = Console()
    console.print(f"conflict {c['id']} on {c['table']} {c['key']}, recorded {str(c['recorded_at'])[:19]}"
                  + (f" (from {c['peer']})" if c["peer"] else ""), highlight=False)  # fmt: skip
    console.print(f"won: {c['winner']['node']} at {c['winner']['at']}; lost: {c['loser']['node']} at "
                  f"{c['loser']['at']}", highlight=False)  # fmt: skip
    console.print(f"why: {c['why']}", highlight=False)
    out = Table()
    out.add_column("field")
    out.add_column("losing value")
    out.add_column(f"now ({c['row_now']})")
    for f in c["fields"]:
        mark = "[bold red]" if f["lost"] else ""
        out.add_row(f"{mark}{f['column']}", repr(f["loser"]), repr(f["now"]))
    console.print(out)
    console.print("fields in red lost to the winner; the others did not conflict", highlight=False)


@main.group("quarantine")
def quarantine_group() -> None:
    """Versions the database refused: review them, retry once the cause is fixed, or discard with a note."""


@quarantine_group.command("list")
@_db_option
@click.option("--table", default=None, help="Only this table's entries.")
@click.option("--status", type=click.Choice(["held", "retried", "discarded", "all"]), default="held",
              show_default=True, help="Which entries.")  # fmt: skip
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="The newest this many.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_schema_option
def quarantine_list(db: str, table: str | None, status: str, limit: int, as_json: bool, schema_name: str) -> None:
    """The newest quarantine entries: table, key, why the database refused the version, its stamp."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from tidesync.quarantine import list_entries, short_reason

    with open_store(db, _registry(schema_name)) as store:
        items = list_entries(store, table, status, limit)
    if as_json:
        click.echo(json.dumps(items, default=str))
        return
    out = Table(title=f"quarantine: {len(items)} newest {'' if status == 'all' else status + ' '}entries")
    for col in ("id", "table", "key", "reason", "stamp", "peer", "attempts", "recorded", "status"):
        out.add_column(col, no_wrap=col in ("id", "key"))
    for q in items:
        stamp = f"{q['stamp']['node']} {q['stamp']['at']}" if q["stamp"] else "—"
        cells = [str(q["id"]), q["table"], q["key"] or "—", short_reason(q["reason"]), stamp, q["peer"] or "—",
                 str(q["attempts"]), str(q["recorded_at"])[:19], q["status"]]  # fmt: skip
        out.add_row(*(Text(c) for c in cells))  # values from the database, not markup
    Console().print(out)


@quarantine_group.command("show")
@_db_option
@click.argument("entry_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@_schema_option
def quarantine_show(db: str, entry_id: int, as_json: bool, schema_name: str) -> None:
    """One entry: the refused version field by field with its stamps, the reason, its history, the row here now."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from tidesync.quarantine import short_reason, show_entry

    with open_store(db, _registry(schema_name)) as store:
        q = show_entry(store, entry_id)
    if as_json:
        click.echo(json.dumps(q, default=str))
        return
    console = Console()

    def say(text: str) -> None:
        console.print(text, markup=False, highlight=False)  # values from the database, not markup

    v = q["version"]
    say(f"quarantine entry {q['id']} on {q['table']} {q['key'] or '(no key)'}: {q['status']}, "
        f"{q['attempts']} attempt(s)")
    say(f"reason: {short_reason(q['reason'])}")
    if q["version_error"]:
        say(f"version: {q['version_error']}")
    elif v is None:
        say("version: not kept (quarantined by an older tidesync), so it cannot be retried")
    else:
        base = f", derived from {v['base_at']}" if v["base_at"] else ""
        say(f"version: {'a deletion ' if v['deleted'] else ''}by {v['node']} at {v['at']}{base}")
    out = Table()
    out.add_column("field")
    out.add_column("value")
    stamps = v is not None and bool(v["fields"])
    if stamps:
        out.add_column("field stamp")
    for name, value in q["row"].items():
        cells = [name, repr(value)] + ([v["fields"].get(name, {}).get("at") or "—"] if stamps else [])
        out.add_row(*(Text(c) for c in cells))
    console.print(out)
    for e in q["history"]:
        when = str(e["at"])[:19] + " " if e["at"] is not None else ""
        say(f"{when}{e['event']}" + (f": {e['note']}" if e["note"] else ""))
    now = q["now"]
    say("the row here now: " + ("absent" if now is None else
                                f"{'deleted' if now['deleted'] else 'present'}, by {now['node']} at {now['at']}"))


@quarantine_group.command("retry")
@_db_option
@click.argument("entry_ids", nargs=-1, type=int)
@click.option("--all", "retry_all", is_flag=True, help="Every held entry (of --table).")
@click.option("--table", default=None, help="With --all: only this table's entries.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcomes as JSON.")
@_schema_option
def quarantine_retry(db: str, entry_ids: tuple[int, ...], retry_all: bool, table: str | None, as_json: bool,
                     schema_name: str) -> None:  # fmt: skip
    """Apply held entries again, once the cause is fixed: all of them in one transaction.

    Each version merges with the row as it is now (a newer local version wins as it
    would have). Exits with status 1 if any entry is still held.
    """
    import dataclasses

    from tidesync.quarantine import CANNOT_RETRY, short_reason

    if bool(entry_ids) == retry_all:
        raise click.UsageError("give entry ids, or --all (optionally with --table)")
    if table is not None and not retry_all:
        raise click.UsageError("--table goes with --all")
    with open_store(db, _registry(schema_name)) as store:
        outcomes = store.retry_quarantined(None if retry_all else list(entry_ids), table=table)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(o) for o in outcomes]))
    elif not outcomes:
        click.echo("nothing held" + (f" in {table}" if table else ""))
    for o in [] if as_json else outcomes:
        if o.applied:
            what = o.note
        elif o.note.startswith(CANNOT_RETRY):
            what = f"still held: {o.note}"
        else:
            what = f"still held (attempt {o.attempts}): {short_reason(o.reason)}"
        click.echo(f"{o.id} {o.table} {o.key or '(no key)'}: {what}")
    held = [o for o in outcomes if not o.applied]
    if held:
        raise _Failure(f"{len(held)} of {len(outcomes)} entries still held: fix the cause and retry them, or "
                       "discard them with `tidesync quarantine discard ID... --note TEXT`")  # fmt: skip


@quarantine_group.command("discard")
@_db_option
@click.argument("entry_ids", nargs=-1, type=int, required=True)
@click.option("--note", required=True, help="Who decided and why, e.g. \"duplicate of P-123, confirmed with ward\".")
@_schema_option
def quarantine_discard(db: str, entry_ids: tuple[int, ...], note: str, schema_name: str) -> None:
    """Mark held entries discarded, with a note; they stay in the log (see --status discarded)."""
    with open_store(db, _registry(schema_name)) as store:
        done = store.discard_quarantined(list(entry_ids), note)
    click.echo(f"discarded {len(done)} entr{'y' if len(done) == 1 else 'ies'} ({', '.join(map(str, done))}): {note}")




# ----------------------------------------------------------------------------- national import and export


@main.command("import")
@click.option("--db", required=True, envvar="TIDESYNC_DB",
              help="PostgreSQL DSN of the database to load (usually the central server's).")  # fmt: skip
@click.option("--table", required=True, help="The synced table to load the file into.")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_schema_option
def import_cmd(db: str, table: str, file: str, as_json: bool, schema_name: str) -> None:
    """Load a national dataset (.parquet or .csv) into one table, stamped so the next pull carries it.

    The file is checked against the table first; a bad file is refused with the row and
    column at fault, and nothing is loaded (one transaction). Importing the same file
    again changes nothing.
    """
    from rich.console import Console as _Console

    from tidesync.datasets import import_table

    # A SQLite path is refused by import_table with a clear message (import writes to PostgreSQL).
    with open_store(db, _registry(schema_name)) as store, _rows_progress(_Console(stderr=True), as_json) as step:
        report = import_table(store, table, file, progress=step)
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    click.echo(f"{report.table}: {report.rows:,} rows from {report.path}: {report.inserted:,} inserted, "
               f"{report.updated:,} updated, {report.unchanged:,} unchanged ({report.seconds:.1f} s); stamped as "
               f"node {report.node!r}, so the next pull carries them")  # fmt: skip


@main.command("export")
@_db_option
@click.option("--to", "to", required=True, type=click.Path(),
              help="out.parquet (one table: that file; several: a directory of <table>.parquet) or out.duckdb.")
@click.option("--tables", default=None, help="Comma-separated tables to export (default: every synced table).")
@click.option("--with-metadata", is_flag=True, help="Keep tidesync's columns (_hlc, _node, ...) too.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_schema_option
def export_cmd(db: str, to: str, tables: str | None, with_metadata: bool, overwrite: bool, as_json: bool,
               schema_name: str) -> None:  # fmt: skip
    """Write a consistent snapshot of synced tables to Parquet or DuckDB, for reporting.

    All tables come from one REPEATABLE READ snapshot; live rows only (no tombstones).
    """
    from rich.console import Console as _Console

    from tidesync.datasets import export_snapshot

    names = None if tables is None else [t.strip() for t in tables.split(",") if t.strip()]
    with open_store(db, _registry(schema_name)) as store, _rows_progress(_Console(stderr=True), as_json) as step:
        report = export_snapshot(store, to, tables=names, with_metadata=with_metadata, overwrite=overwrite,
                                 progress=step)  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.as_dict()))
        return
    for name, count in report.tables.items():
        click.echo(f"{name}: {count:,} rows")
    click.echo(f"wrote {report.path} ({report.format}, one snapshot, {report.seconds:.1f} s)")


# ----------------------------------------------------------------------------- verify


@main.command("verify")
@_db_option
@click.option("--repair", is_flag=True, help="Write central's versions over the rows that differ (one transaction).")
@click.option("--table", "tables", multiple=True, help="Only this table (repeatable; default: every table central sends).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout (progress on stderr).")
@click.option("--central", "url", default=None,
              help="The central server's URL, if not the one `node init` saved (the node's token is used).")
@click.option("--fresh", is_flag=True,
              help="Make central read its copy again even where it could reuse a recent read it proves unchanged.")
@_schema_option
def verify_cmd(db: str, repair: bool, tables: tuple[str, ...], as_json: bool, url: str | None, fresh: bool,
               schema_name: str) -> None:  # fmt: skip
    """Compare this node's data with the central server's copy by range digests, and list
    the rows that differ; --repair rewrites exactly those from central's copy.

    Changes not synced yet (on either side) are left out; rows of patients no longer in
    this node's scope are listed as out of scope, not as differences. Exit status 1
    while differences remain (docs/operations.md, "Verify and repair")."""
    from tidesync.sync import client as sync_client
    from tidesync.sync.verify import verify_node

    console = Console(stderr=True)
    with open_store(db, _registry(schema_name)) as store, sync_client.client_for(store, url=url) as central:
        with _rows_progress(console, as_json, {"tables": "tables", "repair": "steps"}) as step:
            report = verify_node(store, central, repair=repair, progress=step, tables=list(tables) or None,
                                 fresh=fresh)  # fmt: skip
    if as_json:
        click.echo(json.dumps(report.as_dict(), default=str))
    else:
        _show_verify(report)
    if report.unrepaired:
        hint = "" if repair else ": run again with --repair to rewrite them from central's copy"
        raise _Failure(f"{report.unrepaired} difference(s) with central's copy remain{hint}")


def _show_verify(report: Any, shown: int = 20) -> None:
    """The human form of a verify report: what differs, per table, and what a repair did."""
    from rich.markup import escape

    console = Console()
    rows = sum(t.rows_here for t in report.tables)
    moved = (report.bytes_up + report.bytes_down) / 1024
    console.print(f"verify [bold]{escape(report.node)}[/] against central: {len(report.tables)} tables, "
                  f"{rows:,} rows here, {moved:,.1f} KiB moved, {report.seconds:.2f} s")  # fmt: skip
    names = {"differs": "differs", "missing_here": "missing here", "only_here": "only here"}
    for t in report.tables:
        for kind, label in names.items():
            diffs = [d for d in t.differences if d.kind == kind]
            if not diffs:
                continue
            console.print(f"  [bold]{t.table}[/]: {len(diffs)} {label}")
            for d in diffs[:shown]:
                central = "" if kind != "only_here" else f" (central: {d.central})"
                done = f" -> {d.repair}" if d.repair else ""
                console.print(f"    {d.key}{central}{escape(done)}")
            if len(diffs) > shown:
                console.print(f"    ... and {len(diffs) - shown} more (--json lists them all)")
        outside = [d for d in t.differences if d.kind == "out_of_scope"]
        if outside:
            console.print(f"  {t.table}: {len(outside)} rows out of this node's scope (patients no longer "
                          "marked here): not an error, left as they are")  # fmt: skip
        if t.refused:
            console.print(f"  [red]{t.table}: {t.refused} of central's versions refused by this database[/] "
                          "(held in the quarantine: `tidesync quarantine list`)")  # fmt: skip
    if report.clean:
        console.print("no differences: this node's copy matches central's")
    elif report.repair:
        written = sum(t.written for t in report.tables)
        deleted = sum(t.deleted for t in report.tables)
        kept = [i for t in report.tables for i in t.quarantine_ids]
        console.print(f"repaired: {written} rows written from central's copy, {deleted} deleted as central "
                      f"deleted them, {len(kept)} kept in the quarantine and removed"
                      + (f" (entries {', '.join(map(str, kept))})" if kept else ""))  # fmt: skip


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
