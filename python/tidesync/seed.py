"""Seeds: a new or rebuilt node brought to central's state for its scope in one bulk copy.

A seed is **one file**, a ZIP archive whose members are stored as they are (the tables
inside are already zstd-compressed):

- ``tables/NN-<table>.arrows``: the node's scope of each table it pulls, one Arrow IPC
  stream in the table's wire schema, all cut from **one snapshot** at central (one
  snapshot, so a note never arrives without its encounter);
- ``manifest.json``: the format, the registry and its schema fingerprint, the node, the
  snapshot's watermark, and each table's rows, size and SHA-256;
- ``manifest.sig``: an Ed25519 signature of ``manifest.json`` by central's seed key.

Central writes it (``tidesync seed export``, or :func:`prepare_for_node` when a node
asks over the network). A node checks the signature, the fingerprint and every
checksum before it loads anything, then loads table by table through the normal apply
(an empty table takes the bulk path: binary COPY in key order, indexes and foreign
keys rebuilt once; see :mod:`tidesync.pg.bulk_load`). Each table commits with a cursor
that marks it done, so an interrupted seed resumes at the table it stopped in. Last,
the pull cursor moves to the watermark: the first ordinary sync carries exactly what
changed at central while the seed was made, carried and loaded.

The seed key is made on first use and kept in central's settings; ``tidesync seed key``
prints its public half, which the node needs to trust a file that came by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tidesync.changes import ApplyOptions
from tidesync.errors import NotInstalledError, SeedError
from tidesync.store import Store
from tidesync.sync.client import PULL_CURSOR, SETTING_SEED_IN_PROGRESS
from tidesync.sync.protocol import CENTRAL_PEER, PAGE_ROWS, TABLE_KEY, fingerprint

if TYPE_CHECKING:
    from tidesync.pg.store import PostgresStore

#: The seed file format; a reader refuses any other.
FORMAT = "tidesync-seed/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
#: Central's settings: the seed key's private half (raw Ed25519 bytes, base64).
KEY_SETTING = "seed_signing_key"
#: Node settings: central's public seed key (from ``node init``), and the manifest id of
#: a seed being loaded (``sync`` refuses to run until it is finished).
NODE_KEY_SETTING = "central_seed_key"
IN_PROGRESS_SETTING = SETTING_SEED_IN_PROGRESS
#: Rows per Arrow record batch in a seed (a bulk load's parts are this size).
BATCH_ROWS = PAGE_ROWS * 2
KEY_PREFIX = "ed25519:"

Progress = Callable[[str, int, int], None]


def _quiet(what: str, done: int, total: int) -> None:
    pass


# ----------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class SeedTable:
    name: str
    member: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    registry: str
    fingerprint: str
    node: str
    facility: str
    watermark: int
    created_at: float
    tables: list[SeedTable] = field(default_factory=list)
    format: str = FORMAT

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            tables = [SeedTable(**t) for t in raw.pop("tables")]
            return cls(**raw, tables=tables)
        except (ValueError, TypeError, KeyError) as exc:
            raise SeedError(f"{where}: the manifest is not a tidesync seed manifest ({exc})") from None

    @property
    def id(self) -> str:
        """Names this seed (the manifest's own hash): what a half-done load remembers."""
        return hashlib.sha256(self.to_json()).hexdigest()[:16]


# ----------------------------------------------------------------------------- keys


def signing_key(store: PostgresStore) -> Ed25519PrivateKey:
    """Central's seed key, made on first use (two servers racing keep the first one)."""
    from tidesync.pg.install import SCHEMA, ql

    raw = store.get_setting(KEY_SETTING)
    if not raw:
        made = base64.b64encode(Ed25519PrivateKey.generate().private_bytes_raw()).decode()
        with store.connection.cursor() as cur:
            cur.execute(f"INSERT INTO {SCHEMA}.settings (name, value) VALUES ({ql(KEY_SETTING)}, {ql(made)}) "
                        "ON CONFLICT (name) DO NOTHING")  # fmt: skip
        raw = store.get_setting(KEY_SETTING)
        assert raw
    return Ed25519PrivateKey.from_private_bytes(base64.b64decode(raw))


def public_key_text(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """``ed25519:<base64>``: what an operator passes to ``seed import --key``."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return KEY_PREFIX + base64.b64encode(pub.public_bytes_raw()).decode()


def load_public_key(text: str) -> Ed25519PublicKey:
    body = text.strip().removeprefix(KEY_PREFIX)
    try:
        raw = base64.b64decode(body, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise SeedError(
            f"{text!r} is not a seed key: it looks like 'ed25519:<base64>' (run `tidesync seed key` on the central server)"
        ) from None


# ----------------------------------------------------------------------------- export (central)


class _HashingWriter:
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.sha, self.size, self.closed = raw, hashlib.sha256(), 0, False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.raw.write(view)

    def flush(self) -> None:
        self.raw.flush()

    def close(self) -> None:
        self.closed = True

    def tell(self) -> int:
        return self.size


def export_seed(
    store: PostgresStore, node_id: str, out: str | Path, *, overwrite: bool = False, progress: Progress = _quiet
) -> Manifest:
    """Write ``node_id``'s scope at central as a seed file at ``out`` (see the module doc).

    Rows stream from one REPEATABLE READ snapshot into the file (memory stays flat);
    the file appears under its name only when complete.
    """
    from tidesync.pg.capture import snapshot_watermark
    from tidesync.pg.conn import connect, transaction
    from tidesync.sync import central, scope

    out = Path(out)
    if out.exists() and not overwrite:
        raise SeedError(f"{out} already exists: choose another name, or pass --overwrite")
    node = central.find_node(store, node_id)
    key = signing_key(store)
    registry = store.registry
    partial = out.with_name(out.name + ".partial")
    tables: list[SeedTable] = []
    partial.unlink(missing_ok=True)
    partial.touch(mode=0o600)  # patient records: for the owner's eyes only, like a database file
    try:
        with (
            connect(store.dsn) as conn,
            transaction(conn, "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY") as cur,
            zipfile.ZipFile(partial, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
        ):
            watermark = snapshot_watermark(cur)
            specs = [s for s in registry if s.direction.pulls]
            for n, spec in enumerate(specs):
                member = f"tables/{n:02d}-{spec.name}.arrows"
                cur.execute(scope.snapshot_sql(registry, spec, node, watermark))
                schema = spec.wire_schema().with_metadata({TABLE_KEY: spec.name.encode()})
                rows = 0
                with zf.open(member, "w", force_zip64=True) as raw:
                    sink = _HashingWriter(raw)
                    options = pa.ipc.IpcWriteOptions(compression="zstd")
                    with pa.ipc.new_stream(sink, schema, options=options) as writer:
                        for part in central._pages_of(cur.fetch_record_batch(), spec, BATCH_ROWS):
                            writer.write_table(part.replace_schema_metadata(schema.metadata))
                            rows += part.num_rows
                            progress(f"export {spec.name}", rows, 0)
                progress(f"export {spec.name}", rows, rows)
                tables.append(SeedTable(spec.name, member, rows, sink.size, sink.sha.hexdigest()))
            manifest = Manifest(registry.name, fingerprint(registry), node.id, node.facility_id, watermark,
                                time.time(), tables)  # fmt: skip
            data = manifest.to_json()
            zf.writestr(MANIFEST, data)
            zf.writestr(SIGNATURE, key.sign(data))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return manifest


# ----------------------------------------------------------------------------- reading


class SeedFile:
    """An open seed file whose manifest is signed by the expected key.

    Opening checks the container and the signature; :meth:`check` reads every table
    against its checksum (before anything is loaded); :meth:`parts` streams a table.
    """

    def __init__(self, path: str | Path, public_key: str) -> None:
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise SeedError(f"no seed file at {self.path}") from None
        except (zipfile.BadZipFile, OSError) as exc:
            raise SeedError(
                f"{self.path} is not a tidesync seed file, or it is truncated ({exc}): copy it again from the source"
            ) from None
        names = set(self._zip.namelist())
        if MANIFEST not in names or SIGNATURE not in names:
            raise SeedError(f"{self.path} has no signed manifest: it is not a tidesync seed file")
        data, sig = self._zip.read(MANIFEST), self._zip.read(SIGNATURE)
        try:
            load_public_key(public_key).verify(sig, data)
        except InvalidSignature:
            raise SeedError(
                f"{self.path}: the manifest's signature does not match the seed key {public_key}: the file was "
                "altered, or it was made by another central server; do not load it"
            ) from None
        self.manifest = Manifest.from_json(data, str(self.path))
        if self.manifest.format != FORMAT:
            raise SeedError(f"{self.path} is in format {self.manifest.format!r}; this tidesync reads {FORMAT!r}")
        missing = [t.member for t in self.manifest.tables if t.member not in names]
        if missing:
            raise SeedError(f"{self.path} lacks the tables its manifest lists: {missing}")

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> SeedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, progress: Progress = _quiet) -> None:
        """Every table's bytes against the manifest's size and SHA-256."""
        total = sum(t.bytes for t in self.manifest.tables)
        done = 0
        for t in self.manifest.tables:
            sha, size = hashlib.sha256(), 0
            try:
                with self._zip.open(t.member) as f:
                    while chunk := f.read(1 << 20):
                        sha.update(chunk)
                        size += len(chunk)
                        progress("check", done + size, total)
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise SeedError(
                    f"{self.path}: table {t.name} fails its checksum ({exc}): the file is damaged; copy it again"
                ) from None
            if size != t.bytes or sha.hexdigest() != t.sha256:
                raise SeedError(
                    f"{self.path}: table {t.name} fails its checksum: the file is damaged or was altered"
                )
            done += size

    def parts(self, table: SeedTable, on_rows: Callable[[int], None]) -> Iterator[tuple[str, pa.Table]]:
        """The table's rows as record-batch-sized parts (one in memory at a time)."""
        with self._zip.open(table.member) as f:
            try:
                reader = pa.ipc.open_stream(f)
                for batch in reader:
                    on_rows(batch.num_rows)
                    yield table.name, pa.Table.from_batches([batch]).replace_schema_metadata(None)
            except (pa.ArrowInvalid, OSError) as exc:
                raise SeedError(f"{self.path}: table {table.name} is not a readable Arrow stream ({exc})") from None


# ----------------------------------------------------------------------------- import (node)


@dataclass
class SeedReport:
    """What loading a seed did (``--json`` prints this)."""

    node: str
    seed: str
    watermark: int
    rows: dict[str, int] = field(default_factory=dict)
    #: Tables an earlier, interrupted load had already finished.
    resumed: list[str] = field(default_factory=list)
    quarantined: int = 0
    seconds: float = 0.0


def import_seed(store: Store, path: str | Path, *, public_key: str | None = None,
                progress: Progress = _quiet) -> SeedReport:  # fmt: skip
    """Load a seed file into an empty (or half-seeded) node, then point its pull cursor
    at the seed's watermark. The node is installed under the seed's node id if it is not
    a node yet. Nothing is loaded from a file that fails a check."""
    start = time.perf_counter()
    key = public_key
    if not key and _installed(store):
        key = store.get_setting(NODE_KEY_SETTING)
    if not key:
        raise SeedError(
            "no seed key to check the file with: pass --key (printed by `tidesync seed key` on the central server)"
        )
    with SeedFile(path, key) as seed:
        m = seed.manifest
        if m.registry != store.registry.name or m.fingerprint != fingerprint(store.registry):
            raise SeedError(
                f"{path} was made for registry {m.registry!r} (schema {m.fingerprint}); this node runs "
                f"{store.registry.name!r} (schema {fingerprint(store.registry)}): upgrade one side first"
            )
        seed.check(progress)  # the whole file, before the database is touched at all
        _claim(store, m)
        report = SeedReport(node=m.node, seed=m.id, watermark=m.watermark)
        options = ApplyOptions(own_node=m.node)
        for t in m.tables:
            done_cursor = f"seed:{t.name}"
            if store.get_cursor(done_cursor) == m.watermark:
                report.resumed.append(t.name)
                continue
            loaded = 0

            def count(n: int, t: SeedTable = t) -> None:
                nonlocal loaded
                loaded += n
                progress(f"load {t.name}", loaded, t.rows)

            result = store.apply_parts(seed.parts(t, count), peer=CENTRAL_PEER,
                                       cursor=(done_cursor, m.watermark), options=options)  # fmt: skip
            report.rows[t.name] = loaded
            report.quarantined += result.total("quarantined")
        store.set_cursor(PULL_CURSOR, m.watermark)
        store.set_setting(IN_PROGRESS_SETTING, "")
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def _installed(store: Store) -> bool:
    try:
        store.node_id()
    except NotInstalledError:
        return False
    return True


def _claim(store: Store, m: Manifest) -> None:
    """Make this database the seed's node, or check that it is and may take the seed."""
    if not _installed(store):
        store.install(m.node)
    node = store.node_id()
    if node != m.node:
        raise SeedError(f"this seed is for node {m.node!r}; this database is node {node!r}")
    pending = store.get_setting(IN_PROGRESS_SETTING)
    if pending and pending != m.id:
        raise SeedError(
            f"another seed ({pending}) is half-loaded here: finish it with that file, or start again from an "
            "empty database"
        )
    if not pending and store.get_cursor(PULL_CURSOR) > 0:
        raise SeedError(
            f"node {node!r} has synced before (its pull cursor is set): a seed is for a new or rebuilt node; "
            "to check or fix an existing copy use `tidesync verify --repair`"
        )
    store.set_setting(IN_PROGRESS_SETTING, m.id)


def seed_pending(store: Store) -> str | None:
    """The id of a seed this node started loading and did not finish, if any."""
    return store.get_setting(IN_PROGRESS_SETTING) or None


# ----------------------------------------------------------------------------- over the network


@dataclass(frozen=True)
class Prepared:
    """A seed file central made for a node, as the node sees it."""

    id: str
    bytes: int
    sha256: str
    watermark: int
    rows: int
    created_at: float
    #: The seed key and schema it was made under: a file made before either changed is
    #: never handed out (it would fail the node's checks).
    key: str = ""
    fingerprint: str = ""


class SeedSpool:
    """Central's seed files for nodes that ask over the network, one per node.

    A node asks (:meth:`request`); the first ask starts building its file in the
    background and answers "preparing"; later asks answer "ready" with its size and
    hash, and the node downloads it in ranges (:meth:`read`), resuming after a dropped
    connection. A file younger than ``max_age_s`` is handed out again (a node that
    crashed mid-load resumes with the same seed); an older one is rebuilt. A failed
    build is reported to the asking node for a minute, then tried again.

    Files live in a folder of ``root`` named after the central database, so two central
    servers on one machine never hand out each other's files; several server processes
    of one central share it, and a lock file makes one of them the builder.
    """

    FAILURE_SHOWN_S = 60.0

    def __init__(self, root: str | Path, dsn: str, registry: Any, *, max_age_s: float = 3600.0) -> None:
        self.dsn, self.registry, self.max_age_s = dsn, registry, max_age_s
        self.root = Path(root) / hashlib.sha256(dsn.encode()).hexdigest()[:12]
        _private_dir(self.root)

    def _path(self, node: str, suffix: str) -> Path:
        return self.root / f"{node}.{suffix}"

    def _ready(self, node: str) -> Prepared | None:
        meta = self._path(node, "seed.json")
        if not meta.exists() or not self._path(node, "seed").exists():
            return None
        return Prepared(**json.loads(meta.read_text()))

    def request(self, store: PostgresStore, node: str) -> dict[str, Any]:
        key, fp = public_key_text(signing_key(store)), fingerprint(store.registry)
        info = self._ready(node)
        if info is not None and info.key == key and info.fingerprint == fp:
            if time.time() - info.created_at < self.max_age_s:
                return {"status": "ready", **asdict(info)}
        lock, err = self._path(node, "lock"), self._path(node, "error")
        if lock.exists() and time.time() - lock.stat().st_mtime > 6 * 3600:
            lock.unlink(missing_ok=True)  # left by a server that died while building
        if not lock.exists() and err.exists() and time.time() - err.stat().st_mtime < self.FAILURE_SHOWN_S:
            return {"status": "failed", "error": err.read_text()}
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            return {"status": "preparing"}
        os.close(fd)
        err.unlink(missing_ok=True)
        import threading

        threading.Thread(target=self._build, args=(node, key, fp), name=f"seed-{node}", daemon=True).start()
        return {"status": "preparing"}

    def _build(self, node: str, key: str, fp: str) -> None:
        from tidesync.pg.store import PostgresStore

        data, meta = self._path(node, "seed"), self._path(node, "seed.json")
        try:
            meta.unlink(missing_ok=True)
            with PostgresStore(self.dsn, self.registry) as store:
                m = export_seed(store, node, data, overwrite=True)
            sha = hashlib.sha256()
            with data.open("rb") as f:
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
            info = Prepared(m.id, data.stat().st_size, sha.hexdigest(), m.watermark, m.rows, time.time(), key, fp)
            meta.write_text(json.dumps(asdict(info)))
        except Exception as exc:  # noqa: BLE001 - reported to the node on its next ask
            self._path(node, "error").write_text(f"{type(exc).__name__}: {exc}")
        finally:
            self._path(node, "lock").unlink(missing_ok=True)

    def read(self, node: str, seed_id: str, offset: int, length: int) -> bytes:
        info = self._ready(node)
        if info is None or info.id != seed_id:
            raise SeedError(f"seed {seed_id} of node {node!r} is gone (replaced by a newer one): ask again")
        if offset < 0 or length <= 0 or offset > info.bytes:
            raise SeedError(f"bad range {offset}+{length} of a {info.bytes}-byte seed")
        with self._path(node, "seed").open("rb") as f:
            f.seek(offset)
            return f.read(length)


def _private_dir(path: Path) -> None:
    """A folder for seed files, readable by this user only: they hold patient records."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


#: Bytes per download request of a seed: large enough for throughput, small enough that
#: a dropped connection costs little.
CHUNK_BYTES = 8 << 20


def download(client: Any, spool: str | Path, *, progress: Progress = _quiet, poll_s: float = 1.0,
             timeout_s: float = 6 * 3600) -> tuple[Path, str]:  # fmt: skip
    """Ask central for this node's seed, wait while it is made, download it (resuming a
    partial download in ``spool``); returns the file and central's public seed key."""
    key = str(client.call("GET", "/v1/seed/key").json()["key"])
    deadline = time.monotonic() + timeout_s
    wait = 0.05
    while True:
        answer = client.call("POST", "/v1/seed", json={}).json()
        if answer.get("status") == "ready":
            break
        if answer.get("status") == "failed":
            raise SeedError(f"central could not make this node's seed: {answer.get('error')}")
        if time.monotonic() > deadline:
            raise SeedError("central is still making this node's seed; try again later")
        progress("prepare", 0, 0)
        time.sleep(wait)
        wait = min(poll_s, wait * 2)  # a small seed is ready at once; a large one takes minutes
    info = Prepared(**{k: answer[k] for k in Prepared.__dataclass_fields__})
    spool = Path(spool)
    _private_dir(spool)
    path = spool / f"seed-{info.id}.seed"
    partial = path.with_name(path.name + ".part")
    for stale in spool.glob("seed-*.seed*"):  # an older seed's leftovers
        if stale not in (path, partial):
            stale.unlink(missing_ok=True)
    if not path.exists():
        offset = partial.stat().st_size if partial.exists() else 0
        with partial.open("ab") as f:
            while offset < info.bytes:
                length = min(CHUNK_BYTES, info.bytes - offset)
                chunk = client.call("GET", f"/v1/seed/{info.id}?offset={offset}&length={length}").content
                if not chunk:
                    raise SeedError(f"central sent no bytes of the seed at offset {offset}")
                f.write(chunk)
                offset += len(chunk)
                progress("download", offset, info.bytes)
        sha = hashlib.sha256()
        with partial.open("rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
        if sha.hexdigest() != info.sha256:
            partial.unlink()
            raise SeedError("the downloaded seed does not match central's checksum; it was removed, run again")
        partial.replace(path)
    return path, key


def seed_from_central(store: Store, client: Any, spool: str | Path, *, progress: Progress = _quiet) -> SeedReport:
    """Seed an installed node (``node init`` done) over the network: download its seed
    from central and load it. Rerun after any failure: it resumes."""
    path, key = download(client, spool, progress=progress)
    store.set_setting(NODE_KEY_SETTING, key)
    report = import_seed(store, path, public_key=key, progress=progress)
    path.unlink(missing_ok=True)
    return report
