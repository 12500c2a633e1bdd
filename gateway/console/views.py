"""What the token pages show, computed from records: filters and paging, lineage trees, cascades,
and what a token's grants allow per app. Pure functions over `TokenRecord`s (no HTTP)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from gateway.core.authorizer import Authorizer, Check
from gateway.core.rules import GATEWAY_ACTIONS
from gateway.core.tokens import Claims
from gateway.store import TokenRecord

PAGE_SIZE = 50
STATES = ("all", "active", "revoked", "expired")
LAST_USED = {"any": None, "never": -1, "1d": 86400, "7d": 7 * 86400, "30d": 30 * 86400}


def state_of(record: TokenRecord, now: int) -> str:
    if record.revoked_at is not None:
        return "revoked"
    return "expired" if record.exp <= now else "active"


@dataclass(frozen=True)
class ListQuery:
    state: str = "all"
    grant: str = ""
    name: str = ""
    unused: str = "any"  # "never", or not used for this long
    page: int = 1

    @classmethod
    def parse(cls, params: dict[str, str]) -> ListQuery:
        state = params.get("state", "all")
        unused = params.get("unused", "any")
        try:
            page = max(1, min(int(params.get("page", "1")), 1_000_000))
        except ValueError:
            page = 1
        return cls(state if state in STATES else "all", params.get("grant", "").strip()[:200],
                   params.get("name", "").strip()[:200], unused if unused in LAST_USED else "any", page)

    def link(self, page: int) -> dict[str, str]:
        return {"state": self.state, "grant": self.grant, "name": self.name, "unused": self.unused, "page": str(page)}


@dataclass(frozen=True)
class ListPage:
    rows: list[TokenRecord]
    total: int
    page: int
    pages: int


def filter_page(records: Sequence[TokenRecord], query: ListQuery, now: int) -> ListPage:
    """The records `query` selects (newest first, as given), cut to its page."""
    grant, name = query.grant.lower(), query.name.lower()
    horizon = LAST_USED[query.unused]
    state = query.state
    selected: Iterable[TokenRecord] = records
    if state == "active":
        selected = (r for r in selected if r.revoked_at is None and r.exp > now)
    elif state == "revoked":
        selected = (r for r in selected if r.revoked_at is not None)
    elif state == "expired":
        selected = (r for r in selected if r.revoked_at is None and r.exp <= now)
    if name:
        selected = (r for r in selected if name in r.name.lower())
    if grant:
        selected = (r for r in selected if any(grant in g.lower() for g in r.grants))
    if horizon == -1:
        selected = (r for r in selected if r.last_used_at is None)
    elif horizon is not None:
        cutoff = now - horizon
        selected = (r for r in selected if r.last_used_at is None or r.last_used_at < cutoff)
    chosen = selected if isinstance(selected, list) else list(selected)
    pages = max(1, -(-len(chosen) // PAGE_SIZE))
    page = min(query.page, pages)
    start = (page - 1) * PAGE_SIZE
    return ListPage(list(chosen[start:start + PAGE_SIZE]), len(chosen), page, pages)


@dataclass
class Node:
    record: TokenRecord
    how: str  # "root", "attenuated" (a child), "rotated" (a rotation's successor)
    children: list[Node] = field(default_factory=list)


def lineage(record: TokenRecord, records: dict[str, TokenRecord], *, limit: int = 200) -> Node:
    """The tree `record` belongs to: from its topmost ancestor (by parent and by rotation), each
    token's attenuated children and rotation successors below it."""
    top, seen = record, {record.jti}
    while True:
        up = top.parent or top.rotated_from
        if up is None or up in seen or up not in records:
            break
        seen.add(up)
        top = records[up]
    children: dict[str, list[TokenRecord]] = {}
    successors: dict[str, list[TokenRecord]] = {}
    for other in records.values():
        if other.rotated_from is not None:
            successors.setdefault(other.rotated_from, []).append(other)
        elif other.parent is not None:
            children.setdefault(other.parent, []).append(other)
    budget = [limit]

    def grow(node: Node, depth: int) -> Node:
        below = [("rotated", r) for r in successors.get(node.record.jti, [])] + \
                [("attenuated", r) for r in children.get(node.record.jti, [])]
        for how, child in sorted(below, key=lambda item: item[1].iat):
            if budget[0] <= 0 or depth > 20:
                break
            budget[0] -= 1
            node.children.append(grow(Node(child, how), depth + 1))
        return node

    return grow(Node(top, "root"), 0)


def cascade(jti: str, records: dict[str, TokenRecord]) -> list[TokenRecord]:
    """What revoking `jti` revokes: it and every token attenuated from it, transitively, not yet
    revoked (rotation successors are not derived from it and stay alive)."""
    children: dict[str, list[TokenRecord]] = {}
    for other in records.values():
        if other.parent is not None:
            children.setdefault(other.parent, []).append(other)
    out, queue, seen = [], [jti], {jti}
    while queue:
        current = queue.pop(0)
        record = records.get(current)
        if record is not None and record.revoked_at is None:
            out.append(record)
        for child in children.get(current, []):
            if child.jti not in seen:
                seen.add(child.jti)
                queue.append(child.jti)
    return out


@dataclass(frozen=True)
class Allowance:
    grant: str
    target: str  # what the grant covers, as people say it
    env: str | None
    allowed: list[str]
    denied: list[str]


def allowances(claims: Claims, authorizer: Authorizer, actions: Iterable[str]) -> list[Allowance]:
    """For each grant of the token: the actions the policy allows it (and refuses it) on what it
    covers, decided as requests are (with its ancestors' grants for a derived token)."""
    known = sorted(set(actions))
    out = []
    for grant in claims.grants:
        alone = replace(claims, grants=(grant,))
        if grant.kind == "gateway":
            gateway_actions = sorted(GATEWAY_ACTIONS)
            allowed = [a for a in gateway_actions if authorizer.decide_gateway(alone, a).allowed]
            out.append(Allowance(str(grant), "the gateway's admin API and console", None, allowed,
                                 [a for a in gateway_actions if a not in allowed]))
            continue
        if grant.kind == "env":
            app, env, target = "*", grant.pattern, f"every app in environment {grant.pattern}"
        else:
            app, env = grant.pattern, authorizer.environment(grant.pattern)
            target = f"app {grant.pattern}" if not any(c in grant.pattern for c in "*?") else \
                f"apps matching {grant.pattern}"
        checks = [Check(action, app, env) for action in known]
        allowed = [c.action for c in checks if authorizer.decide(alone, [c]).allowed]
        out.append(Allowance(str(grant), target, env, allowed, [a for a in known if a not in allowed]))
    return out
