"""Consistency guards: every action the routes or the gateway can produce is documented."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.core.rules import GATEWAY_ACTIONS
from gateway.surfaces.routes import RouteTable

REPO = Path(__file__).resolve().parent.parent


def test_every_route_action_is_documented() -> None:
    documented = set(re.findall(r"^\| `([a-z-]+:[a-z-]+)` \|", (REPO / "docs/actions.md").read_text(), re.M))
    routes = RouteTable.load([REPO / "policies/routes/fly-machines.yaml"])
    assert routes.actions() - documented == set()
    assert documented - routes.actions() == set()


def test_gateway_actions_are_named_in_the_docs() -> None:
    text = (REPO / "docs/actions.md").read_text()
    for action in GATEWAY_ACTIONS:
        assert f"`{action}`" in text
