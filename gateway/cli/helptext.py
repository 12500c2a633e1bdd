"""What `scopegate ... --help` says besides the options: a description and examples per command.

Kept in one table (applied by main.build_parser after every command module registered) so the
wording reads as one voice; `tests/test_cli_ux.py` walks the parser and requires an example on
every command.
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Iterator

# command path -> (description, examples)
HELP: dict[str, tuple[str, tuple[str, ...]]] = {
    "": ("Scopegate: scoped tokens in front of Fly.io's APIs. Local mode works on the config's keyring and "
         "store; with SCOPEGATE_ADDR and SCOPEGATE_TOKEN set, token commands go through that gateway.",
         ("scopegate serve --dev", "scopegate token list", "scopegate whoami", "scopegate COMMAND --help")),
    "serve": ("Run the gateway (see config.example.yaml for every key); --dev runs an ephemeral one with a "
              "sandbox upstream, for trying Scopegate only.",
              ("scopegate serve --config scopegate.yaml", "scopegate serve --dev --port 8080")),
    "init": ("Create the keyring and the store if missing, and print a token-admin@gateway token once (stdout; "
             "keep it secret).",
             ("scopegate init --config scopegate.yaml",)),
    "token": ("Mint, list, show, revoke, rotate and attenuate tokens. Tokens are named by jti, a unique jti "
              "prefix or their name.",
              ("scopegate token mint --grant deployer@app:web-staging --ttl 30d --name web-ci",
               "scopegate token list --app web-staging", "scopegate token revoke web-ci --reason leaked")),
    "token mint": ("Mint a token and print only the token (stdout), or its record too with --json.",
                   ("scopegate token mint --grant deployer@app:web-staging --ttl 30d --name web-ci",
                    "scopegate token mint --grant viewer@env:staging --grant deployer@app:web-pr-* --json")),
    "token list": ("List token records, never token strings. The default table fits 80 columns; -o wide shows "
                   "every field, --field F one raw value per token for scripts.",
                   ("scopegate token list --state active", "scopegate token list --app web-prod -o wide",
                    "scopegate token list --subject 'ci:github:acme/*' -o yaml",
                    "scopegate token list --state expired --field jti")),
    "token show": ("Show one token record (never the token string).",
                   ("scopegate token show web-ci", "scopegate token show 8pM8clar -o yaml",
                    "scopegate token show web-ci --field exp")),
    "token revoke": ("Revoke a token and every token attenuated from it (not its rotation successor); a running "
                     "gateway refuses them within a second.",
                     ("scopegate token revoke web-ci --reason 'laptop lost'", "scopegate token revoke -- -xY3abcd")),
    "token rotate": ("Mint a replacement with the same grants, name and lifetime; the old token keeps working for "
                     "--grace, then expires. Prints only the new token.",
                     ("scopegate token rotate web-ci --grace 1h", "scopegate token rotate 8pM8clar --grace 0s")),
    "token attenuate": ("Narrow a token you hold into a child with a subset of its grants and a life no longer "
                        "than its own. The parent is --token, else $SCOPEGATE_PARENT_TOKEN, else $SCOPEGATE_TOKEN; "
                        "no admin token is needed. With SCOPEGATE_ADDR the gateway mints the child.",
                        ("SCOPEGATE_PARENT_TOKEN=$CI_TOKEN scopegate token attenuate --grant deployer@app:web-pr-42 "
                         "--ttl 15m", "scopegate token attenuate --token - --grant viewer@app:web < parent.txt")),
    "whoami": ("Describe your own token: name, subject, grants, expiry, parent, state and what its grants may do. "
               "The token is --token or $SCOPEGATE_TOKEN; with SCOPEGATE_ADDR the gateway answers, else the "
               "config's keyring and store verify it. The token itself is never printed.",
               ("SCOPEGATE_ADDR=https://gw.example.com SCOPEGATE_TOKEN=$TOKEN scopegate whoami",
                "scopegate whoami --config scopegate.yaml --token - --json < token.txt")),
    "keys": ("List, rotate and retire the signing keys in the keyring file (local only); a running gateway "
             "picks changes up within a second.", ("scopegate keys rotate --config scopegate.yaml",)),
    "keys list": ("List the keyring's keys (never private material).", ("scopegate keys list --json",)),
    "keys rotate": ("Add a new active signing key; the old one keeps verifying until its tokens expire.",
                    ("scopegate keys rotate --config scopegate.yaml",)),
    "keys retire": ("Stop accepting tokens signed with KID (rotate first if it is the active key).",
                    ("scopegate keys retire Qm3xv9RzT1aLw0cB   # a kid `keys list` shows",)),
    "policy": ("Check, explain and test the policy files offline.",
               ("scopegate policy check", "scopegate policy explain --grant deployer@app:web-prod POST "
                                          "/v1/apps/web-prod/secrets")),
    "policy check": ("Validate the model, policy and route files and their cross-references; exit 2 naming the "
                     "offending line.", ("scopegate policy check --config scopegate.yaml",)),
    "policy explain": ("Would this token or grant set be allowed METHOD PATH, and why (exit 0 allowed, 1 denied). "
                       "Goes through the gateway when SCOPEGATE_ADDR is set.",
                       ("scopegate policy explain --grant deployer@app:web-staging POST "
                        "/v1/apps/web-staging/machines",
                        "scopegate policy explain --token \"$TOKEN\" POST /v1/apps --body '{\"name\": \"web-pr-1\"}'")),
    "policy test": ("Run a YAML file of cases {name, grants, method, path, body, expect: allow|deny}; exit 1 on "
                    "any mismatch.", ("scopegate policy test policies/tests.yaml",)),
    "audit": ("Read audit records (JSON lines).", ("scopegate audit tail -n 50", "scopegate audit export --since 1h")),
    "audit tail": ("Print the last audit records, and keep printing with --follow.",
                   ("scopegate audit tail -n 50 --follow",)),
    "audit export": ("Print the audit records since a time or a duration ago.",
                     ("scopegate audit export --since 2026-11-26T10:00:00Z > audit.jsonl",
                      "scopegate audit export --since 24h")),
    "oidc": ("CI OIDC token exchange: check an id token against oidc.trust, offline.",
             ("scopegate oidc check id_token.jwt",)),
    "oidc check": ("Which oidc.trust rule would accept a CI id token, and why each other would not (claims "
                   "decoded only; nothing verified or fetched). Exit 0 when a rule matches, 1 when none does.",
                   ("scopegate oidc check id_token.jwt", "echo \"$ID_TOKEN\" | scopegate oidc check - --json")),
    "store": ("Move token records between stores; check the configured store (local only).",
              ("scopegate store info", "scopegate store migrate --from sqlite:///./.scopegate/state.db "
                                       "--to redis://10.0.0.5:6379/0")),
    "store migrate": ("Copy token records and revocations from one store to another; idempotent, never widens a "
                      "token.", ("scopegate store migrate --from sqlite:///./.scopegate/state.db --to "
                                 "redis://10.0.0.5:6379/0",)),
    "store info": ("The configured store: backend, record counts, change-feed cursor (local only; a missing "
                   "SQLite store is an error, never created).", ("scopegate store info --config scopegate.yaml",)),
    "completion": ("Print a shell completion script for bash, zsh or fish.",
                   ("source <(scopegate completion bash)            # bash, in ~/.bashrc",
                    "scopegate completion zsh > \"${fpath[1]}/_scopegate\"   # zsh",
                    "scopegate completion fish > ~/.config/fish/completions/scopegate.fish")),
}


def subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (command path, parser) below `parser`, itself first as ''."""
    yield "", parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                for path, grandchild in subcommands(child):
                    yield (f"{name} {path}".strip(), grandchild)


def decorate(parser: argparse.ArgumentParser) -> None:
    for path, command in subcommands(parser):
        entry = HELP.get(path)
        if entry is None:
            continue
        description, examples = entry
        command.description = textwrap.fill(description, width=78)
        command.epilog = "Examples:\n" + "\n".join(f"  {line}" for line in examples)
        command.formatter_class = argparse.RawDescriptionHelpFormatter
