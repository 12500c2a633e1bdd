"""`scopegate oidc check ID_TOKEN_FILE`: which trust rule would accept a CI id token, offline.

Nothing is verified and nothing is fetched: the token's claims are decoded and held against
`oidc.trust`, and the output says so. It answers "why was my CI job refused?" without the
gateway: which rule matches (and the grants and ttl the exchange would give), and for every
other rule the first reasons it does not (issuer mismatch, audience mismatch, claim X: expected
Y, got Z). The token's times and algorithm are reported as notes. Exit 0 when a rule matches,
1 when none does, 2 when the file or the config cannot be used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from gateway.cli.common import add_config, add_json, config_from
from gateway.cli.output import print_json
from gateway.durations import format_duration
from gateway.errors import ConfigError

OFFLINE_NOTE = "offline check: claims decoded only; the signature was NOT verified and no keys were fetched"


def register(sub: Any) -> None:
    oidc = sub.add_parser("oidc", help="CI OIDC token exchange: check an id token against oidc.trust")
    actions = oidc.add_subparsers(dest="oidc_command", required=True, metavar="ACTION")
    check = add_json(add_config(actions.add_parser(
        "check", help="which trust rule would accept an id token, and why each other rule would not (offline)")))
    check.add_argument("token_file", metavar="ID_TOKEN_FILE", help="file holding the id token ('-' reads stdin)")
    check.set_defaults(handler=check_token)


def _read_token(path: str) -> str:
    if path == "-":
        return sys.stdin.read().strip()
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot read the id token file {path} ({exc.__class__.__name__})") from None


def check_token(args: argparse.Namespace) -> int:
    from gateway.oidc.rules import ALGORITHMS, decode_unverified, evaluate, key_claims, time_problems

    config = config_from(args)
    token = _read_token(args.token_file)
    try:
        header, claims = decode_unverified(token)
    except ValueError as exc:
        raise ConfigError(f"{args.token_file}: {exc}") from None
    outcome = evaluate(config.oidc_trust, claims)
    notes = time_problems(claims, int(time.time()))
    if header.get("alg") not in ALGORITHMS:
        notes.append(f"alg {header.get('alg')!r} would be refused (only {' and '.join(ALGORITHMS)})")
    if not isinstance(header.get("kid"), str):
        notes.append("the header has no kid; the exchange would refuse it")
    if not config.oidc_trust:
        notes.append("oidc.trust is empty in this config: no issuer is trusted")
    matched = [rule.name for rule in outcome.matched]
    document: dict[str, Any] = {
        "offline": True, "signature_checked": False, "note": OFFLINE_NOTE,
        "issuer": claims.get("iss"), "audience": claims.get("aud"), "claims": key_claims(claims),
        "rules": [{"name": rule.name, "matched": True, "reasons": [], "grants": list(rule.grants),
                   "ttl": format_duration(rule.ttl_s)} for rule in outcome.matched]
                 + [{"name": rule.name, "matched": False, "reasons": list(reasons), "grants": list(rule.grants),
                     "ttl": format_duration(rule.ttl_s)} for rule, reasons in outcome.refused],
        "matched": matched,
        "grants": list(outcome.grants) if matched else [],
        "ttl": format_duration(outcome.ttl_s) if matched else None,
        "notes": notes,
    }
    if args.json:
        print_json(document)
    else:
        _print_human(document, [r.name for r in config.oidc_trust])
    return 0 if matched else 1


def _print_human(document: dict[str, Any], order: list[str]) -> None:
    out = sys.stdout
    out.write(f"{OFFLINE_NOTE}.\n")
    out.write(f"issuer:   {document['issuer']}\naudience: {document['audience']}\n")
    for name, value in document["claims"].items():
        out.write(f"  {name} = {value}\n")
    by_name = {rule["name"]: rule for rule in document["rules"]}
    for name in order:
        rule = by_name[name]
        if rule["matched"]:
            out.write(f"rule {name}: MATCHES -> {' '.join(rule['grants'])} (ttl {rule['ttl']})\n")
        else:
            out.write(f"rule {name}: no match\n")
            for reason in rule["reasons"]:
                out.write(f"  - {reason}\n")
    if document["matched"]:
        out.write(f"result: the exchange would mint {' '.join(document['grants'])} for {document['ttl']} "
                  f"(rules: {', '.join(document['matched'])}; several matching rules give the union of their "
                  "grants and the shortest ttl)\n")
    else:
        out.write("result: no rule matches; the exchange would refuse this token (invalid_grant)\n")
    for note in document["notes"]:
        out.write(f"note: {note}\n")
