"""Running the central server: in the foreground (``tidesync central serve``) or on a
background thread (the demo, the tests and the benchmarks).

uvicorn serves the app. TLS is uvicorn's (a certificate and key file); the node
client verifies the certificate. Several worker processes can serve one database,
since the app keeps no state between requests.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

import uvicorn

from tidesync.errors import SyncError
from tidesync.registry import Registry
from tidesync.sync.central import Settings
from tidesync.sync.server import create_app

_ENV_DSN, _ENV_SCHEMA = "TIDESYNC_CENTRAL_DSN", "TIDESYNC_CENTRAL_SCHEMA"
_ENV_DRIFT, _ENV_PAGE = "TIDESYNC_CENTRAL_MAX_DRIFT_MS", "TIDESYNC_CENTRAL_MAX_PAGE_BYTES"
_ENV_ROWS = "TIDESYNC_CENTRAL_PAGE_ROWS"


def _app_from_env() -> Any:
    """The app factory for multi-worker serving (each worker process builds its own)."""
    from tidesync.memory import prefer_jemalloc
    from tidesync.schemas import registry_named

    prefer_jemalloc()  # a fresh worker process: as the `tidesync` command does
    settings = Settings(max_drift_ms=int(os.environ[_ENV_DRIFT]), max_page_bytes=int(os.environ[_ENV_PAGE]),
                        page_rows=int(os.environ[_ENV_ROWS]))  # fmt: skip
    return create_app(os.environ[_ENV_DSN], registry_named(os.environ[_ENV_SCHEMA]), settings)


def serve(
    dsn: str,
    registry: Registry,
    *,
    host: str = "127.0.0.1",
    port: int = 8700,
    certfile: str | None = None,
    keyfile: str | None = None,
    workers: int = 1,
    settings: Settings | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted."""
    if (certfile is None) != (keyfile is None):
        raise SyncError("TLS needs both --cert and --key")
    settings = settings or Settings()
    tls = {"ssl_certfile": certfile, "ssl_keyfile": keyfile} if certfile else {}
    if workers > 1:
        os.environ.update({_ENV_DSN: dsn, _ENV_SCHEMA: registry.name, _ENV_DRIFT: str(settings.max_drift_ms),
                           _ENV_PAGE: str(settings.max_page_bytes), _ENV_ROWS: str(settings.page_rows)})  # fmt: skip
        uvicorn.run("tidesync.sync.serve:_app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, http="httptools", **tls)  # type: ignore[arg-type]  # fmt: skip
        return
    uvicorn.run(create_app(dsn, registry, settings), host=host, port=port, log_level=log_level, http="httptools",
                **tls)  # type: ignore[arg-type]


class BackgroundServer:
    """The central server on a thread, listening on 127.0.0.1 (an ephemeral port by default).

    ``with BackgroundServer(dsn, registry) as server: server.url``. Stops on exit.
    """

    def __init__(
        self,
        dsn: str,
        registry: Registry,
        *,
        port: int = 0,
        settings: Settings | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
    ) -> None:
        self.app = create_app(dsn, registry, settings)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", port))
        self.port = self._sock.getsockname()[1]
        self.url = f"{'https' if certfile else 'http'}://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5,
                                http="httptools", ssl_certfile=certfile, ssl_keyfile=keyfile)  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def start(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise SyncError("the central server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
