"""`scopegate policy check|explain|test`: the policy files, checked and exercised offline.

`check` loads model, policy, constraint and route files and their cross-references, roles
included (exit 2 naming the offending line, with a did-you-mean). `explain` dry-runs one request
for a token or a grant set (through the admin API when SCOPEGATE_ADDR/SCOPEGATE_TOKEN are set).
`test FILE` runs a YAML list of cases `{name?, grants, method, path, body?, expect: allow|deny}`
and exits 1 on any mismatch (2 on a case naming a role or environment the policy lacks). Both dry
runs take the request path's decision, body constraints included (docs/policy.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from gateway.cli.backend import dry_run_rules, open_backend
from gateway.cli.common import add_config, add_json, config_from
from gateway.cli.output import console, print_json, print_mapping, print_table
from gateway.core.grants import GrantError, parse_grants
from gateway.core.registry import unknown_name
from gateway.errors import ConfigError
from gateway.surfaces.machines.explain import explain

EXPLAIN_KEYS = ("allowed", "status", "error", "method", "path", "operation", "action", "app", "env", "grant",
                "rule", "constraints", "constraint", "reason")


def register(sub: Any) -> None:
    policy = sub.add_parser("policy", help="check, explain and test the policy files")
    actions = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = add_json(add_config(actions.add_parser("check", help="validate model, policy and route files")))
    check.set_defaults(handler=check_policy)

    exp = add_json(add_config(actions.add_parser("explain", help="would this request be allowed, and why")))
    who = exp.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", help="an sgt_ token to explain for")
    who.add_argument("--grant", action="append", metavar="ROLE@SCOPE", help="a grant set to explain for")
    exp.add_argument("method")
    exp.add_argument("path", help="e.g. /v1/apps/web-staging/machines (with ?query if any)")
    exp.add_argument("--body", help="JSON body, for routes that read it (POST /v1/apps)")
    exp.set_defaults(handler=explain_request)

    test = add_json(add_config(actions.add_parser("test", help="run a YAML file of policy test cases")))
    test.add_argument("file")
    test.set_defaults(handler=test_policy)


def check_policy(args: argparse.Namespace) -> int:
    config = config_from(args)
    routes, rules, _ = dry_run_rules(config)
    policy = rules.policy
    roles = sorted(policy.roles())
    summary = {"ok": True, "routes": len(routes.routes), "policy_lines": len(policy.policy_lines()),
               "roles": roles, "model": str(config.policy_model),
               "policy": str(config.policy_policy), "route_files": [str(p) for p in config.routes]}
    if args.json:
        print_json(summary)
    else:
        console().print(f"policy ok: {summary['routes']} routes, {summary['policy_lines']} policy lines, "
                        f"roles {', '.join(roles)}")
    return 0


async def explain_request(args: argparse.Namespace) -> int:
    body = None
    if args.body is not None:
        try:
            body = json.loads(args.body)
        except ValueError:
            raise ConfigError("--body must be JSON, e.g. '{\"name\": \"web-pr-1\"}'") from None
    backend = open_backend(args)
    try:
        result = await backend.explain(args.method, args.path, body, token=args.token, grants=args.grant)
    finally:
        await backend.close()
    if args.json:
        print_json(result)
    else:
        # Constraint names hold spaces and commas: one list item per "; ".
        print_mapping({**result, "allowed": "yes" if result["allowed"] else "no",
                       "constraints": "; ".join(result.get("constraints") or ())}, EXPLAIN_KEYS)
    return 0 if result["allowed"] else 1


def _cases(path: Path, roles: set[str], environments: frozenset[str]) -> list[dict[str, Any]]:
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"policy test file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"policy test file {path} is not valid YAML: {exc}") from None
    if isinstance(document, dict) and "cases" in document:
        document = document["cases"]
    if not isinstance(document, list) or not document:
        raise ConfigError(f"policy test file {path} must be a non-empty list of cases")
    for index, case in enumerate(document):
        where = f"{path}: case {index + 1}"
        if not isinstance(case, dict):
            raise ConfigError(f"{where} must be a mapping")
        extra = set(case) - {"name", "grants", "method", "path", "body", "expect"}
        if extra:
            raise ConfigError(f"{where} has unknown keys {sorted(extra)}")
        if case.get("expect") not in ("allow", "deny"):
            raise ConfigError(f"{where}: expect must be allow or deny")
        if not isinstance(case.get("method"), str) or not isinstance(case.get("path"), str):
            raise ConfigError(f"{where}: method and path are required strings")
        grants = case.get("grants")
        if isinstance(grants, str):
            case["grants"] = [grants]
        try:
            grants = parse_grants(case["grants"] if isinstance(case.get("grants"), list) else [])
        except GrantError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        for grant in grants:
            # A role or environment the policy lacks would make the case "deny" for a typo's sake.
            problem = unknown_name(grant, roles, environments)
            if problem is not None:
                raise ConfigError(f"{where}: {problem}")
    return document


async def test_policy(args: argparse.Namespace) -> int:
    config = config_from(args)
    routes, rules, environments = dry_run_rules(config)
    rows = []
    for index, case in enumerate(_cases(Path(args.file), rules.policy.roles(), config.environment_names)):
        body = case.get("body")
        raw = None if body is None else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        result = await explain(parse_grants(case["grants"]), case["method"], case["path"], raw, routes=routes,
                               rules=rules, environments=environments, org_slug=config.upstream_org_slug,
                               token_name=case.get("name") or "test")
        got = "allow" if result.allowed else "deny"
        rows.append({"case": str(index + 1), "name": case.get("name") or "", "grants": case["grants"],
                     "request": f"{case['method'].upper()} {case['path']}", "expect": case["expect"], "got": got,
                     "ok": "ok" if got == case["expect"] else "FAIL", "reason": result.reason,
                     "constraint": result.constraint or ""})
    failures = [r for r in rows if r["ok"] != "ok"]
    if args.json:
        print_json({"passed": len(rows) - len(failures), "failed": len(failures), "cases": rows})
    else:
        print_table(rows, ("case", "name", "grants", "request", "expect", "got", "ok"))
        for row in failures:
            console().print(f"case {row['case']} {row['request']}: {row['reason']}")
        console().print(f"{len(rows) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0
