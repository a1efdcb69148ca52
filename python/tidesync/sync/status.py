"""``tidesync status``: what a node or the central server looks like right now."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tidesync.registry import Registry
from tidesync.store import open_store
from tidesync.sync.client import PULL_CURSOR, PUSH_CURSOR, SETTING_LAST_CYCLE, SETTING_URL


def _is_central(store: Any) -> bool:
    from tidesync.pg import PostgresStore

    if not isinstance(store, PostgresStore):
        return False
    with store.connection.cursor() as cur:
        cur.execute("SELECT to_regclass('tidesync.sessions') IS NOT NULL")
        return bool(cur.fetchone()[0])


def node_status(db: str, registry: Registry) -> dict[str, Any]:
    """A plain dict (JSON-ready) describing the database at ``db``."""
    with open_store(db, registry) as store:  # type: ignore[attr-defined]
        info: dict[str, Any] = {"node": store.node_id()}
        if _is_central(store):
            from tidesync.sync import central

            info["role"] = "central"
            info["nodes"] = central.nodes(store).to_pylist()
            sessions = central.sessions(store).to_pylist()
            for s in sessions:
                s["phases"] = json.loads(s["phases"])
            info["sessions"] = sessions
        else:
            info["role"] = "node"
            info["central"] = store.get_setting(SETTING_URL)
            push = store.get_cursor(PUSH_CURSOR)
            info["cursors"] = {"push": push, "pull": store.get_cursor(PULL_CURSOR)}
            pending = store.read_window(push, peer="central", tables=[s.name for s in registry if s.direction.pushes])
            info["pending"] = {name: t.num_rows for name, t in pending.tables.items() if t.num_rows}
            last = store.get_setting(SETTING_LAST_CYCLE)
            info["last_cycle"] = json.loads(last) if last else None
        info["conflicts"] = store.conflicts().num_rows
        info["quarantined"] = store.quarantine(status="held").num_rows
        return info


def render(info: dict[str, Any]) -> None:
    console = Console()
    console.print(f"[bold]{info['role']}[/] node [bold]{info['node']}[/]: "
                  f"{info['conflicts']} conflicts logged, {info['quarantined']} rows quarantined")  # fmt: skip
    if info["role"] == "central":
        nodes = Table("node", "kind", "facility", "last sync", "clock", title="nodes")
        for n in info["nodes"]:
            nodes.add_row(n["node"], n["kind"], n["facility_id"], str(n["last_sync"] or "never"),
                          clock_cell(n["clock_skew_ms"], n["clock_warning"]))  # fmt: skip
        console.print(nodes)
        for n in info["nodes"]:
            if n["clock_warning"]:
                console.print(f"[bold red]clock off:[/] {escape(n['clock_warning'])}", highlight=False)
        sessions = Table("opened", "node", "status", "rows in", "rows out", "conflicts", "clamped", "error",
                         title="recent sessions")  # fmt: skip
        for s in info["sessions"]:
            sessions.add_row(str(s["opened_at"])[:19], s["node"], s["status"], str(s["rows_in"]), str(s["rows_out"]),
                             str(s["conflicts"]), str(s["clamped"]), (s["error"] or "")[:60])  # fmt: skip
        console.print(sessions)
        return
    console.print(f"central: {info['central'] or 'not configured (tidesync node init)'}")
    console.print(f"cursors: push {info['cursors']['push']}, pull {info['cursors']['pull']}")
    pending = info["pending"]
    console.print("changes waiting to push: " + (", ".join(f"{k} {v}" for k, v in pending.items()) or "none"))
    last = info["last_cycle"]
    if last:
        state = "ok" if last.get("ok") else f"failed ({last.get('error')})"
        console.print(f"last sync: {state}; pushed {last['pushed_rows']}, pulled {last['pulled_rows']} rows "
                      f"in {last['seconds']:.2f} s")  # fmt: skip
        skew, warning = last.get("clock_skew_ms"), last.get("clock_warning")
        console.print(f"clock against central: {clock_cell(skew, warning)}", highlight=False)
        if warning:
            console.print(f"[bold red]clock off:[/] {escape(warning)}", highlight=False)
    else:
        console.print("last sync: never")


def clock_cell(skew_ms: int | None, warning: str | None) -> str:
    """A node's clock in a few words: 'ok', '+3d 2h ahead', '-40 min behind'."""
    from tidesync.sync.central import span

    if skew_ms is None:
        return "not measured"
    if not warning:
        return "ok"
    return f"{'+' if skew_ms > 0 else '-'}{span(abs(skew_ms))} {'ahead' if skew_ms > 0 else 'behind'}"
