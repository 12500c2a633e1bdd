"""The import rules of docs/architecture.md, checked on the source of gateway/.

Every `import` counts: at module level, inside functions and under `if TYPE_CHECKING:` alike, so a
rule cannot be dodged by moving an import somewhere mypy or a reader would not look.

- the decision core (gateway/core/) imports no HTTP stack and nothing of the surfaces, the API,
  the CLI, dev mode or the composition root: it answers questions, it does not serve requests;
- nothing a running gateway serves with imports the CLI (gateway/cli/);
- production code never imports dev mode (gateway/dev/); the one way in is `scopegate serve --dev`
  (gateway/cli/serve_cmd.py), and serving for real does not load it (checked in a fresh process);
- there are no import cycles;
- no module is over 400 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "gateway"
HTTP_STACKS = ("starlette", "aiohttp", "uvicorn", "httptools", "httpx", "uvloop", "yarl", "multidict")
NOT_FOR_THE_CORE = ("gateway.surfaces", "gateway.api", "gateway.console", "gateway.cli", "gateway.dev", "gateway.app",
                    "gateway.server", "gateway.services", "gateway.watch", "gateway.frame", "gateway.upstream",
                    "gateway.oidc")
DEV_DOOR = frozenset({("gateway.cli.serve_cmd", "gateway.dev.mode")})
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports, absolute names (`from a import b` counts as a and a.b)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: {i for i in imports_of(path, name) if i in modules and i != name} | {
        i for i in imports_of(path, name) if not i.startswith("gateway")} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next((c for c in children if c in edges), None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


EDGES = graph()


def within(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_the_graph_is_read() -> None:
    assert "gateway.core.authorizer" in EDGES and "gateway.surfaces.machines.surface" in EDGES
    assert "gateway.core.policy" in EDGES["gateway.core.authorizer"]
    assert "starlette.requests" in EDGES["gateway.api.endpoint"] or "starlette" in str(EDGES["gateway.api.endpoint"])


def violations(importers: list[str], forbidden: tuple[str, ...],
               allowed: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
    return [f"{name} -> {i}" for name in sorted(importers) for i in sorted(EDGES[name])
            if within(i, *forbidden) and (name, i) not in allowed]


# Who may import whom (docs/architecture.md's table): for each package or module, the parts of the
# gateway it may import besides itself. `gateway.store` alone is the store's protocol (records);
# its backends are the composition root's business.
ALLOWED: dict[str, set[str]] = {
    "gateway.core": {"gateway.errors", "gateway.durations", "=gateway.store"},
    "gateway.surfaces": {"gateway.core", "gateway.errors", "gateway.durations", "gateway.frame", "gateway.metrics",
                         "gateway.upstream", "=gateway.store"},
    "gateway.upstream": {"gateway.errors"},
    "gateway.oidc": {"gateway.core", "gateway.errors", "gateway.durations", "=gateway.store"},
    "gateway.store": {"gateway.core", "gateway.errors", "gateway.config"},
    "gateway.frame": {"gateway.core", "gateway.errors", "gateway.metrics"},
    "gateway.metrics": set(),
    "gateway.errors": set(),
    "gateway.durations": set(),
    "gateway.server": {"gateway.errors", "gateway.server_cycle", "gateway.server_workers"},
    "gateway.server_cycle": set(),
    "gateway.server_workers": set(),
    "gateway.config": {"=gateway", "gateway.config_values", "gateway.durations", "gateway.errors",
                       "gateway.oidc.rules"},
    "gateway.config_values": {"gateway.durations"},
    "gateway.watch": {"gateway.config", "gateway.core", "gateway.errors", "gateway.metrics", "gateway.store",
                      "gateway.surfaces"},
    "gateway.services": {"gateway.config", "gateway.core", "gateway.errors", "gateway.metrics", "gateway.oidc",
                         "gateway.store", "gateway.surfaces", "gateway.upstream", "gateway.watch"},
    "gateway.api": {"gateway", "gateway.core", "gateway.durations", "gateway.errors", "gateway.frame", "gateway.oidc",
                    "gateway.services", "gateway.surfaces"},
    "gateway.console": {"gateway.api", "gateway.core", "gateway.durations", "gateway.errors", "gateway.frame",
                        "gateway.services", "=gateway.store", "gateway.surfaces"},
    "gateway.app": {"gateway.api", "gateway.config", "gateway.console", "gateway.errors", "gateway.server",
                    "gateway.services"},
}


def test_every_import_is_one_the_architecture_allows() -> None:
    breaches = []
    for name, imports in EDGES.items():
        rule = max((p for p in ALLOWED if within(name, p)), key=len, default=None)
        if rule is None:
            continue  # gateway.cli and gateway.dev: the rules below
        for imported in imports:
            if not imported.startswith("gateway") or within(imported, rule):
                continue
            if not any(imported == a[1:] if a.startswith("=") else within(imported, a) for a in ALLOWED[rule]):
                breaches.append(f"{name} -> {imported}")
    assert breaches == [], "imports the table in docs/architecture.md does not allow"


def test_the_decision_core_knows_nothing_of_http_or_surfaces() -> None:
    core = [n for n in EDGES if within(n, "gateway.core")]
    assert len(core) > 10
    # The core answers (app, action) checks; serving requests is the surfaces' and the API's job.
    assert violations(core, HTTP_STACKS + NOT_FOR_THE_CORE) == []


def test_nothing_a_gateway_serves_with_imports_the_cli() -> None:
    assert violations([n for n in EDGES if not within(n, "gateway.cli", "gateway.dev")], ("gateway.cli",)) == []


def test_production_code_never_imports_dev_mode() -> None:
    # Only `scopegate serve --dev` may load the sandbox.
    assert violations([n for n in EDGES if not within(n, "gateway.dev")], ("gateway.dev",), DEV_DOOR) == []


def test_the_table_catches_a_breach() -> None:
    edges = dict(EDGES)
    try:
        EDGES["gateway.core.policy"] = EDGES["gateway.core.policy"] | {"gateway.metrics"}
        with pytest.raises(AssertionError):
            test_every_import_is_one_the_architecture_allows()
    finally:
        EDGES.clear()
        EDGES.update(edges)


def test_the_rules_catch_a_breach() -> None:
    assert violations(["gateway.api.endpoint"], ("starlette",)) != []
    assert violations(["gateway.cli.serve_cmd"], ("gateway.dev",)) == ["gateway.cli.serve_cmd -> gateway.dev.mode"]
    assert violations(["gateway.cli.serve_cmd"], ("gateway.dev",), DEV_DOOR) == []


def test_serving_for_real_does_not_load_dev_mode() -> None:
    code = ("import sys, gateway.app, gateway.cli.main, gateway.cli.serve, gateway.services; "
            "loaded = sorted(m for m in sys.modules if m.startswith('gateway.dev')); "
            "print(','.join(loaded)); sys.exit(1 if loaded else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, f"loaded: {result.stdout.strip()} {result.stderr[-500:]}"


def test_there_are_no_import_cycles() -> None:
    assert cycles(EDGES) == []


def test_the_cycle_finder_finds_cycles() -> None:
    # The check above must be able to fail: a two-module cycle, a three-module one, a self-contained tail.
    edges = {"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}, "f": {"a"}, "g": set()}
    assert sorted(cycles(edges)) == [["a", "b"], ["c", "d", "e"]]


def test_no_module_is_over_400_lines() -> None:
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {path: lines for path, lines in sizes.items() if lines > MAX_LINES} == {}, "split these by concern"
