"""The node side of sync: talk to the central server, run cycles, retry, keep going.

One cycle (:func:`sync_once`):

1. **open** a session, telling the central server where this node's last pull ended;
2. **push** this node's own changes since its push cursor, as pages, then ask the
   central server to merge them (one transaction there); only then does the push
   cursor move (and push-then-delete rows leave the node);
3. **pull** the pages the central server prepared, and apply them all in one
   transaction here together with the new pull cursor;
4. **end** the session with a report of what happened and how long each phase took.

Every request is safe to repeat, so a dropped connection is retried (with exponential
backoff and jitter) and resumes where it stopped. A node that cannot reach the central
server at all keeps working locally; its changes wait in its database for the next
cycle, however long that takes.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import random
import ssl
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pyarrow as pa
import pyarrow.compute as pc

from tidesync.changes import ApplyOptions
from tidesync.errors import ProtocolError, SyncError
from tidesync.registry import DELETED, Direction
from tidesync.store import Store
from tidesync.sync.protocol import (
    CENTRAL_PEER,
    CONTENT_TYPE,
    ERRORS,
    PAGE_ROWS,
    PROTOCOL_VERSION,
    UnavailableError,
    decode_page,
    fingerprint,
    split_pages,
)

#: Settings a node keeps in its own database (``tidesync node init``).
SETTING_URL = "central_url"
SETTING_TOKEN = "central_token"
SETTING_CA = "central_ca"
SETTING_ALLOW_HTTP = "central_allow_http"
SETTING_LAST_CYCLE = "last_cycle"
#: Set while a seed is being loaded (see :mod:`tidesync.seed`).
SETTING_SEED_IN_PROGRESS = "seed_in_progress"
#: Cursor names in the node's database.
PUSH_CURSOR = "push"
PULL_CURSOR = "pull"

log = logging.getLogger("tidesync.sync")


@dataclass(frozen=True)
class Retry:
    """Exponential backoff with full jitter for retryable failures."""

    attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 20.0

    def delays(self) -> list[float]:
        return [random.uniform(0, min(self.cap_s, self.base_s * 2**i)) for i in range(self.attempts - 1)]


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class CentralClient:
    """HTTP calls to the central server, with authentication, TLS checks and retries."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        ca: str | None = None,
        allow_http: bool = False,
        timeout_s: float = 120.0,
        retry: Retry = Retry(),
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise SyncError(f"central URL {url!r} must start with https:// (or http:// on loopback)")
        if parts.scheme == "http" and not is_loopback(parts.hostname) and not allow_http:
            raise SyncError(
                f"refusing plain HTTP to {parts.hostname}: records would cross the network unencrypted; "
                "use https://, or pass --allow-http if this network is otherwise protected"
            )
        self.url = url.rstrip("/")
        self.retry = retry
        self._http = httpx.Client(
            base_url=self.url,
            headers={"authorization": f"Bearer {token}"},
            verify=ssl.create_default_context(cafile=ca) if ca else True,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            transport=transport,
        )
        self.bytes_up = 0
        self.bytes_down = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> CentralClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, path: str, *, json: Any = None, content: bytes | None = None) -> httpx.Response:
        """One request, repeated on network errors and server errors (every call is idempotent)."""
        last: Exception | None = None
        for delay in [*self.retry.delays(), None]:
            try:
                if content is not None:
                    resp = self._http.request(method, path, content=content, headers={"content-type": CONTENT_TYPE})
                    self.bytes_up += len(content)
                else:
                    resp = self._http.request(method, path, json=json)
            except httpx.TransportError as exc:
                last = UnavailableError(f"cannot reach the central server at {self.url}: {exc or type(exc).__name__}")
            else:
                if resp.status_code < 400:
                    self.bytes_down += len(resp.content)
                    return resp
                err = _error_of(resp)
                if resp.status_code < 500 and not isinstance(err, UnavailableError):
                    raise err
                last = err
            if delay is None:
                break
            time.sleep(delay)
        assert last is not None
        raise last


def _error_of(resp: httpx.Response) -> SyncError:
    kind, message = None, resp.text[:500]
    try:
        body = resp.json()
        kind, message = body["error"]["type"], body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        pass
    if kind in ERRORS:
        return ERRORS[kind][1](message)
    for name, (status, cls) in ERRORS.items():
        if status == resp.status_code and name != "SchemaMismatchError":
            return cls(f"HTTP {resp.status_code}: {message}")
    if resp.status_code >= 500:
        return UnavailableError(f"central server error (HTTP {resp.status_code}): {message}")
    return ProtocolError(f"HTTP {resp.status_code}: {message}")


@dataclass
class CycleReport:
    """What one sync cycle did (``tidesync sync --json`` prints this)."""

    node: str
    session: str | None = None
    ok: bool = False
    pushed_rows: int = 0
    pushed_pages: int = 0
    pulled_rows: int = 0
    pulled_pages: int = 0
    conflicts: int = 0
    quarantined: int = 0
    clamped: int = 0
    forgotten: int = 0
    #: How far this node's database clock runs ahead of central's (negative: behind),
    #: as central measured it at open; ``None`` if central did not measure it.
    clock_skew_ms: int | None = None
    #: Central's warning when that skew is beyond its drift tolerance.
    clock_warning: str | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    phases: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def seconds(self) -> float:
        return round(sum(self.phases.values()), 4)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seconds": self.seconds}


class _Timer:
    def __init__(self, report: CycleReport) -> None:
        self.report = report

    def __call__(self, name: str) -> _Phase:
        return _Phase(self.report, name)


class _Phase:
    def __init__(self, report: CycleReport, name: str) -> None:
        self.report, self.name = report, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.report.phases[self.name] = round(time.perf_counter() - self.start, 4)


Progress = Callable[[str, int, int], None]


def client_for(store: Store, *, retry: Retry = Retry(), url: str | None = None) -> CentralClient:
    """The central client configured in a node's database by ``tidesync node init``
    (``url``: reach the same central server at another address, with the node's token)."""
    store.node_id()  # NotInstalledError (with what to run) when this is no node at all
    url, token = url or store.get_setting(SETTING_URL), store.get_setting(SETTING_TOKEN)
    if not url or not token:
        raise SyncError("this database is not set up as a node: run `tidesync node init --central URL --token TOKEN`")
    return CentralClient(
        url, token, ca=store.get_setting(SETTING_CA) or None,
        allow_http=store.get_setting(SETTING_ALLOW_HTTP) == "1", retry=retry,
    )  # fmt: skip


def init_node(store: Store, url: str, token: str, *, ca: str | None = None, allow_http: bool = False) -> str:
    """Install tidesync in a node database under the id its token names, and remember the central server."""
    CentralClient(url, token, ca=ca, allow_http=allow_http).close()  # validates the URL rule early
    if "." not in token:
        raise SyncError("a node token looks like '<node id>.<secret>' (printed by `tidesync central add-node`)")
    node_id = token.rsplit(".", 1)[0]
    store.install(node_id)
    store.set_setting(SETTING_URL, url)
    store.set_setting(SETTING_TOKEN, token)
    store.set_setting(SETTING_CA, ca or "")
    store.set_setting(SETTING_ALLOW_HTTP, "1" if allow_http else "0")
    return node_id


def sync_once(store: Store, client: CentralClient, *, progress: Progress | None = None) -> CycleReport:
    """One full cycle: open, push, pull, apply atomically, end. Raises on failure
    (after recording it at the central server when it can be reached)."""
    report = CycleReport(node=store.node_id())
    if store.get_setting(SETTING_SEED_IN_PROGRESS):
        # Half a seed is a consistent prefix of tables, but the pull cursor has not
        # moved: a sync now would pull the whole scope again, the slow way.
        raise SyncError("a seed is half-loaded in this database: finish it first (run the same "
                        "`tidesync seed import` or `tidesync node init --seed` again; it resumes)")  # fmt: skip
    phase = _Timer(report)
    step = progress or (lambda what, done, total: None)
    up0, down0 = client.bytes_up, client.bytes_down
    try:
        with phase("open"):
            hello = {
                "protocol": PROTOCOL_VERSION,
                "registry": store.registry.name,
                "fingerprint": fingerprint(store.registry),
                "pull_cursor": store.get_cursor(PULL_CURSOR),
                # The clock this node's stamps come from, read last: central compares it with its own.
                "node_clock_ms": store.clock_ms(),
            }
            opened = client.call("POST", "/v1/sessions", json=hello).json()
            sid = report.session = str(opened["session"])
            _note_clock(report, opened)
            page_rows = int(opened.get("page_rows") or PAGE_ROWS)
        base = f"/v1/sessions/{sid}"
        _push(store, client, base, report, phase, step, page_rows)
        _pull(store, client, base, report, phase, step)
        report.ok = True
    except SyncError as exc:
        report.error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report.bytes_up, report.bytes_down = client.bytes_up - up0, client.bytes_down - down0
        with contextlib.suppress(Exception):  # for `tidesync status`; never fails a cycle
            store.set_setting(SETTING_LAST_CYCLE, json.dumps({**report.as_dict(), "at": time.time()}))
        if report.session is not None:
            try:
                with phase("end"):
                    client.call("POST", f"/v1/sessions/{report.session}/end", json=report.as_dict())
            except SyncError:
                if report.ok:
                    raise
    return report


def _note_clock(report: CycleReport, opened: dict[str, Any]) -> None:
    """Keep central's measure of this node's clock; say so loudly when it is off."""
    skew = opened.get("clock_skew_ms")
    report.clock_skew_ms = None if skew is None else int(skew)
    report.clock_warning = opened.get("clock_warning") or None
    if report.clock_warning:
        log.warning("clock skew: %s", report.clock_warning)


def _push(store: Store, client: CentralClient, base: str, report: CycleReport, phase: _Timer, step: Progress,
          page_rows: int) -> None:  # fmt: skip
    with phase("push_read"):
        cursor = store.get_cursor(PUSH_CURSOR)
        pushable = [s.name for s in store.registry if s.direction.pushes]
        window = store.read_window(cursor, peer=CENTRAL_PEER, tables=pushable)
        pages = [p for name, rows in window.tables.items() for p in split_pages(name, rows, page_rows)]
    with phase("push_send"):
        for n, page in enumerate(pages):
            client.call("PUT", f"{base}/push/{n}", content=page)
            step("push", n + 1, len(pages))
    with phase("push_merge"):
        done = client.call("POST", f"{base}/push/complete", json={"pages": len(pages)}).json()
    report.pushed_rows, report.pushed_pages = window.rows, len(pages)
    report.conflicts += int(done.get("conflicts", 0))
    report.clamped += int(done.get("clamped", 0))
    with phase("push_commit"):
        # The central server has it: attachments leave this node, then the cursor moves.
        for spec in store.registry:
            if spec.direction is Direction.PUSH_THEN_DELETE and spec.name in window.tables:
                rows = window.tables[spec.name]
                keys = rows.filter(pc.invert(rows.column(DELETED))).column(spec.key)
                report.forgotten += store.forget(spec.name, keys.combine_chunks(), below=window.watermark)
        store.set_cursor(PUSH_CURSOR, window.watermark)


def _pull(store: Store, client: CentralClient, base: str, report: CycleReport, phase: _Timer,
          step: Progress) -> None:  # fmt: skip
    with phase("pull_prepare"):
        plan = client.call("POST", f"{base}/pull", json={}).json()
        pages, watermark = int(plan["pages"]), int(plan["watermark"])
    # Pages wait on disk, still compressed, and are decoded one at a time as the apply
    # takes them: the node's memory stays flat however large the pull (a first sync).
    with tempfile.TemporaryDirectory(prefix="tidesync-pull-") as spool:
        files = [Path(spool) / f"{n:06d}.arrows" for n in range(pages)]
        with phase("pull_fetch"):
            for n, path in enumerate(files):
                path.write_bytes(client.call("GET", f"{base}/pull/{n}").content)
                step("pull", n + 1, pages)
        report.pulled_pages = pages

        def parts() -> Iterator[tuple[str, pa.Table]]:
            # A page that does not decode fails the apply, and with it everything:
            # one transaction, nothing half-applied.
            for path in files:
                name, rows = decode_page(path.read_bytes(), store.registry)
                report.pulled_rows += rows.num_rows
                yield name, rows

        with phase("pull_apply"):
            result = store.apply_parts(
                parts(), peer=CENTRAL_PEER, cursor=(PULL_CURSOR, watermark),
                options=ApplyOptions(own_node=store.node_id()),
            )  # fmt: skip
    report.conflicts += result.total("conflicts")
    report.quarantined += result.total("quarantined")


def watch(
    store: Store,
    client: CentralClient,
    interval_s: float,
    *,
    on_cycle: Callable[[CycleReport | None, BaseException | None], None],
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Run cycles every ``interval_s`` (with jitter) until ``stop()``; a failed cycle
    is reported and the node simply tries again next time."""
    while not stop():
        started = time.monotonic()
        try:
            on_cycle(sync_once(store, client), None)
        except SyncError as exc:
            on_cycle(None, exc)
        wait = max(0.0, interval_s * random.uniform(0.9, 1.1) - (time.monotonic() - started))
        end = time.monotonic() + wait
        while not stop() and time.monotonic() < end:
            time.sleep(min(0.5, end - time.monotonic()))


#: Default cycle intervals: a facility every minute, a mobile device every five.
DEFAULT_INTERVAL_S = {"postgres": 60.0, "sqlite": 300.0}
