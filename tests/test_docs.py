"""Consistency guards: every action the routes or the gateway can produce is documented."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.core.rules import GATEWAY_ACTIONS
from gateway.surfaces.graphql.operations import OperationMap
from gateway.surfaces.graphql.surface import load_schema
from gateway.surfaces.registry.surface import produced_actions as registry_actions
from gateway.surfaces.routes import RouteTable

REPO = Path(__file__).resolve().parent.parent


def test_every_route_action_is_documented() -> None:
    documented = set(re.findall(r"^\| `([a-z-]+:[a-z-]+)` \|", (REPO / "docs/actions.md").read_text(), re.M))
    routes = RouteTable.load([REPO / "policies/routes/fly-machines.yaml", REPO / "policies/routes/fly-api.yaml"])
    graphql = {p.action for p in OperationMap.load(REPO / "policies/routes/fly-graphql.yaml",
                                                   load_schema()).produced_actions()}
    produced = routes.actions() | graphql | {p.action for p in registry_actions()}
    assert produced - documented == set()
    assert documented - produced == set()


def test_gateway_actions_are_named_in_the_docs() -> None:
    text = (REPO / "docs/actions.md").read_text()
    for action in GATEWAY_ACTIONS:
        assert f"`{action}`" in text
