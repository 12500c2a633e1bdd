"""API surfaces: one package per upstream API the gateway fronts (the Machines API first).

A surface knows one API's wire shape: how a request turns into the `(app, action)` checks the
decision core answers, how an allowed request is forwarded, and how an answer is filtered. The
modules at this level are shared by every surface (request-target canonicalization, route maps,
HTTP plumbing). docs/architecture.md says how to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.core.rules import ProducedAction


@dataclass(frozen=True)
class SurfaceLoad:
    """A surface's route map, read and checked but not yet served: the actions it produces (for
    the policy's cross-reference check) and `install`, which starts serving it."""

    produced: list[ProducedAction]
    install: Callable[[], None]


class Surface(Protocol):
    """One upstream API the gateway fronts. The composition root (services.py) builds it, loads
    its route map together with the policy (`load`, then `install` once both are good), and the
    ASGI app (app.py) hands it the requests whose path it `serves`."""

    name: str
    prefixes: tuple[str, ...]  # every path it serves starts with one of these ("" : any path)

    def serves(self, path: str) -> bool: ...

    def load(self) -> SurfaceLoad:
        """Read the surface's own files (route maps); raises ConfigError; changes nothing."""
        ...

    def ready(self) -> bool: ...

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None: ...
