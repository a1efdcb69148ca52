"""Table registries shipped with tidesync (today: ``demo``, the demo EMR)."""

from __future__ import annotations

from tidesync.errors import SchemaMismatchError
from tidesync.registry import Registry

NAMES = ("demo",)


def registry_named(name: str) -> Registry:
    """The shipped registry called ``name``."""
    if name == "demo":
        from tidesync.schemas.demo import REGISTRY

        return REGISTRY
    raise SchemaMismatchError(f"unknown schema {name!r}; shipped schemas: {', '.join(NAMES)}")
