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


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOCUMENTS = ["README.md", "SECURITY.md", "CHANGELOG.md", "bench/README.md", *sorted(
    str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]


def broken_links(name: str, text: str) -> list[str]:
    """Links in a document that a clone of the repository cannot follow: outside the repository
    (`../shared/...`, the workspace the project was built in) or to a file that does not exist."""
    broken = []
    folder = (REPO / name).parent
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # https:, mailto:, an anchor in the same page
        path = (folder / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(REPO) or "../shared/" in target:
            broken.append(f"{name}: {target} is outside the repository")
        elif not path.exists():
            broken.append(f"{name}: {target} does not exist")
    return broken


def test_documents_link_only_to_files_a_clone_has() -> None:
    broken = [b for name in DOCUMENTS if (REPO / name).exists()
              for b in broken_links(name, (REPO / name).read_text())]
    assert broken == []


def test_a_link_into_the_shared_workspace_is_caught() -> None:
    assert broken_links("README.md", "see [the spec](../shared/upstream/ENDPOINTS.md)") == [
        "README.md: ../shared/upstream/ENDPOINTS.md is outside the repository"]
    assert broken_links("docs/clients.md", "[x](../../shared/upstream/FLYCTL.md)")
    assert broken_links("README.md", "[gone](docs/nothing-here.md)") == [
        "README.md: docs/nothing-here.md does not exist"]
    assert broken_links("README.md", "[ok](docs/clients.md#flyctl) [web](https://fly.io/docs/)") == []


def test_the_readme_says_what_works_with_flyctl_today() -> None:
    text = " ".join((REPO / "README.md").read_text().split())
    assert "flyctl v0.4.87" in text
    for command in ("fly deploy --image", "fly status", "fly machine run", "fly secrets set", "fly releases",
                    "fly logs", "fly scale count", "fly apps create"):
        assert f"`{command}" in text, command
    assert "github.com/superfly/flyctl" in text and "module proxy" in text  # why CI cannot run those tests
    assert "WireGuard" in text and "remote builder" in text
