"""The central server's HTTP face: a Starlette app, served by uvicorn.

Thin on purpose: each route authenticates the node, hands the request to
:mod:`tidesync.sync.central` on a worker thread (database work blocks), and turns
tidesync errors into JSON errors with the right status. No state is kept between
requests except a pool of database connections.

Routes (all under ``/v1``, all but ``/v1/health`` need ``Authorization: Bearer <token>``):

==========================================  ===========================================
``POST /v1/sessions``                       open: versions, fingerprint, pull cursor
``PUT  /v1/sessions/{id}/push/{n}``         push page ``n`` (Arrow IPC body)
``POST /v1/sessions/{id}/push/complete``    merge all pushed pages in one transaction
``POST /v1/sessions/{id}/pull``             prepare the pull: page count and watermark
``GET  /v1/sessions/{id}/pull/{n}``         pull page ``n`` (Arrow IPC body)
``POST /v1/sessions/{id}/end``              close, with the node's report
``GET  /v1/seed/key``                       central's public seed key
``POST /v1/seed``                           make (or reuse) this node's seed file
``GET  /v1/seed/{id}?offset=&length=``      a byte range of it (resumable download)
``POST /v1/verify/digest``                  central's range digest of a table of the node's scope
``POST /v1/verify/rows``                    central's row hashes of some buckets of it (Arrow IPC)
``POST /v1/verify/keys``                    what central holds now for each key (state, row hash)
``POST /v1/verify/fetch``                   central's versions of keys in scope (Arrow IPC page)
==========================================  ===========================================
"""

from __future__ import annotations

import json
import logging
import tempfile
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tidesync.errors import ProtocolError, SyncError
from tidesync.pg.store import PostgresStore
from tidesync.seed import SeedSpool, public_key_text, signing_key
from tidesync.registry import Registry
from tidesync.sync import central, verify
from tidesync.sync.protocol import CONTENT_TYPE, ERRORS, PayloadTooLargeError, error_type

log = logging.getLogger("tidesync.server")


class StorePool:
    """A small pool of PostgreSQL connections (one per request in flight)."""

    def __init__(self, dsn: str, registry: Registry, size: int = 8) -> None:
        self.dsn, self.registry = dsn, registry
        self._idle: queue.LifoQueue[PostgresStore] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(size)

    @contextmanager
    def store(self) -> Iterator[PostgresStore]:
        with self._slots:
            try:
                s = self._idle.get_nowait()
            except queue.Empty:
                s = PostgresStore(self.dsn, self.registry)
            ok = False
            try:
                yield s
                ok = True
            finally:
                if ok:
                    self._idle.put(s)
                else:  # the connection may be mid-transaction or broken: do not reuse it
                    try:
                        s.close()
                    except Exception:  # noqa: BLE001
                        pass

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return


def _error(exc: SyncError) -> JSONResponse:
    kind = error_type(exc)
    status = ERRORS[kind][0]
    return JSONResponse({"error": {"type": kind, "message": str(exc)}}, status_code=status)


def create_app(dsn: str, registry: Registry, settings: central.Settings | None = None, pool_size: int = 8) -> Starlette:
    """The central server app for the database at ``dsn`` (already ``central init``-ed)."""
    settings = settings or central.Settings()
    pool = StorePool(dsn, registry, pool_size)
    readers = StorePool(dsn, registry, pool_size)  # pull preparation reads on a second connection

    async def call(request: Request, work: Callable[[PostgresStore, central.Node], Any]) -> Any:
        auth = request.headers.get("authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None

        def run() -> Any:
            with pool.store() as store:
                node = central.authenticate(store, token)
                return work(store, node)

        return await run_in_threadpool(run)

    def endpoint(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)  # type: ignore[no-any-return]
            except SyncError as exc:
                return _error(exc)
            except Exception:
                log.exception("internal error on %s %s", request.method, request.url.path)
                return JSONResponse(
                    {"error": {"type": "UnavailableError", "message": "internal server error; see the server log"}},
                    status_code=500,
                )

        return wrapped

    async def body_json(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw:
            return {}
        try:
            value = json.loads(raw)
        except ValueError:
            raise ProtocolError("request body is not JSON") from None
        if not isinstance(value, dict):
            raise ProtocolError("request body must be a JSON object")
        return value

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True})

    async def open_session(request: Request) -> Response:
        hello = await body_json(request)
        return JSONResponse(await call(request, lambda s, n: central.open_session(s, n, hello, settings)))

    async def push_page(request: Request) -> Response:
        declared = int(request.headers.get("content-length") or 0)
        if declared > settings.max_page_bytes:
            raise PayloadTooLargeError(
                f"page is {declared} bytes, above the limit of {settings.max_page_bytes}; send smaller pages"
            )
        data = await request.body()
        sid, n = request.path_params["sid"], request.path_params["page"]
        return JSONResponse(await call(request, lambda s, node: central.receive_page(s, node, sid, n, data, settings)))

    async def complete_push(request: Request) -> Response:
        body = await body_json(request)
        pages = body.get("pages")
        if not isinstance(pages, int) or pages < 0:
            raise ProtocolError("push/complete needs {'pages': <number of pages sent>}")
        sid = request.path_params["sid"]

        def work(s: PostgresStore, node: central.Node) -> Any:
            try:
                return central.complete_push(s, node, sid, pages, settings)
            except SyncError as exc:
                central.fail_session(s, sid, f"{type(exc).__name__}: {exc}")
                raise

        return JSONResponse(await call(request, work))

    async def prepare_pull(request: Request) -> Response:
        sid = request.path_params["sid"]

        def work(s: PostgresStore, node: central.Node) -> Any:
            with readers.store() as reader:
                return central.prepare_pull(s, reader, node, sid, settings)

        return JSONResponse(await call(request, work))

    async def pull_page(request: Request) -> Response:
        sid, n = request.path_params["sid"], request.path_params["page"]
        data = await call(request, lambda s, node: central.pull_page(s, node, sid, n))
        return Response(data, media_type=CONTENT_TYPE)

    async def end(request: Request) -> Response:
        report = await body_json(request)
        sid = request.path_params["sid"]
        return JSONResponse(await call(request, lambda s, node: central.end_session(s, node, sid, report)))

    spool = SeedSpool(settings.seed_dir or Path(tempfile.gettempdir()) / "tidesync-seeds", dsn, registry)

    async def seed_key(request: Request) -> Response:
        return JSONResponse(await call(request, lambda s, node: {"key": public_key_text(signing_key(s))}))

    async def seed_request(request: Request) -> Response:
        return JSONResponse(await call(request, lambda s, node: spool.request(s, node.id)))

    async def seed_chunk(request: Request) -> Response:
        try:
            offset, length = int(request.query_params["offset"]), int(request.query_params["length"])
        except (KeyError, ValueError):
            raise ProtocolError("a seed download needs ?offset=<byte>&length=<bytes>") from None
        length = min(length, settings.max_page_bytes)
        sid = request.path_params["seed"]
        data = await call(request, lambda s, node: spool.read(node.id, sid, offset, length))
        return Response(data, media_type="application/octet-stream")

    async def verify_digest(request: Request) -> Response:
        body = await body_json(request)
        answer = await call(request, lambda s, node: verify.serve_digest(s, node, body))
        return Response(answer, media_type=CONTENT_TYPE)

    async def verify_rows(request: Request) -> Response:
        body = await body_json(request)
        answer = await call(request, lambda s, node: verify.serve_rows(s, node, body))
        return Response(answer, media_type=CONTENT_TYPE)

    async def verify_keys(request: Request) -> Response:
        body = await body_json(request)
        return JSONResponse(await call(request, lambda s, node: verify.serve_keys(s, node, body)))

    async def verify_fetch(request: Request) -> Response:
        body = await body_json(request)
        answer = await call(request, lambda s, node: verify.serve_fetch(s, node, body))
        return Response(answer, media_type=CONTENT_TYPE)

    routes = [
        Route("/v1/health", endpoint(health), methods=["GET"]),
        Route("/v1/verify/digest", endpoint(verify_digest), methods=["POST"]),
        Route("/v1/verify/rows", endpoint(verify_rows), methods=["POST"]),
        Route("/v1/verify/keys", endpoint(verify_keys), methods=["POST"]),
        Route("/v1/verify/fetch", endpoint(verify_fetch), methods=["POST"]),
        Route("/v1/seed/key", endpoint(seed_key), methods=["GET"]),
        Route("/v1/seed", endpoint(seed_request), methods=["POST"]),
        Route("/v1/seed/{seed}", endpoint(seed_chunk), methods=["GET"]),
        Route("/v1/sessions", endpoint(open_session), methods=["POST"]),
        Route("/v1/sessions/{sid}/push/complete", endpoint(complete_push), methods=["POST"]),
        Route("/v1/sessions/{sid}/push/{page:int}", endpoint(push_page), methods=["PUT"]),
        Route("/v1/sessions/{sid}/pull", endpoint(prepare_pull), methods=["POST"]),
        Route("/v1/sessions/{sid}/pull/{page:int}", endpoint(pull_page), methods=["GET"]),
        Route("/v1/sessions/{sid}/end", endpoint(end), methods=["POST"]),
    ]
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        def upgrade() -> None:  # a central made by an older version gets its new session columns
            with pool.store() as store:
                central.upgrade(store)

        await run_in_threadpool(upgrade)
        yield
        pool.close()
        readers.close()

    app = Starlette(routes=routes, lifespan=lifespan, max_body_size=settings.max_page_bytes + 1024)
    app.state.settings = settings
    return app
