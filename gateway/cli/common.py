"""Helpers shared by the CLI's command modules."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from gateway.config import Config, load_config
from gateway.durations import parse_duration
from gateway.errors import ConfigError


class UsageError(Exception):
    """The command line asks for something unclear or impossible (an ambiguous name, a command
    that cannot run in this mode); the CLI exits 2 with the message."""


def add_config(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", help="config file (default: $SCOPEGATE_CONFIG, else built-in defaults)")
    return parser


def add_json(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def config_from(args: argparse.Namespace) -> Config:
    explicit = args.config is not None or bool(os.environ.get("SCOPEGATE_CONFIG"))
    config = load_config(args.config)
    if not explicit and config.source != "(defaults)":
        print(f"scopegate: using {config.source} (found in the current folder; --config or SCOPEGATE_CONFIG "
              "choose another)", file=sys.stderr)
    return config


def duration_arg(text: str | None, flag: str, *, allow_zero: bool = False) -> int | None:
    if text is None:
        return None
    try:
        return parse_duration(text, allow_zero=allow_zero)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
