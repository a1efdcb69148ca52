"""Arrow's allocator in tidesync's own processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from tidesync.memory import prefer_jemalloc


def _backend_after_cli(env: dict[str, str]) -> str:
    code = ("from click.testing import CliRunner; import pyarrow as pa; from tidesync.cli import main; "
            "r = CliRunner().invoke(main, ['version']); assert r.exit_code == 0, r.output; "
            "print(pa.default_memory_pool().backend_name)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip()


@pytest.mark.skipif("jemalloc" not in pa.supported_memory_backends(), reason="pyarrow built without jemalloc")
def test_the_command_line_uses_jemalloc_unless_the_environment_chose() -> None:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    assert _backend_after_cli(env) == "jemalloc"
    assert _backend_after_cli({**env, "ARROW_DEFAULT_MEMORY_POOL": "system"}) == "system"


def test_importing_tidesync_leaves_the_allocator_alone() -> None:
    code = "import pyarrow as pa; before = pa.default_memory_pool().backend_name; import tidesync; " \
           "import tidesync.pg, tidesync.sync; print(before == pa.default_memory_pool().backend_name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_prefer_jemalloc_reports_the_backend_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "system")
    before = pa.default_memory_pool()
    assert prefer_jemalloc() == before.backend_name  # the environment's choice is kept
