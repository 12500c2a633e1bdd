"""Parsers for configuration values: each takes what YAML or an environment variable gave and
returns the typed value, or raises ValueError with a sentence saying what is expected (the
caller adds which key it was)."""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

from gateway.durations import parse_duration


def nonempty(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def whole(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a whole number")
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    if not isinstance(value, int):
        raise ValueError("expected a whole number")
    return value


def positive_int(value: Any) -> int:
    number = whole(value)
    if number <= 0:
        raise ValueError("expected a whole number above 0")
    return number


def non_negative_int(value: Any) -> int:
    number = whole(value)
    if number < 0:
        raise ValueError("expected a whole number, 0 or more")
    return number


def cache_megabytes(value: Any) -> int:
    """A cache budget in MiB: 1 to 65,536 (a larger number is most likely bytes given for MiB)."""
    try:
        number = whole(value)
    except ValueError:
        raise ValueError("expected a whole number of MiB, e.g. 128") from None
    if not 1 <= number <= 65_536:
        raise ValueError(f"expected a whole number of MiB from 1 to 65536 (64 GiB), e.g. 128; got {number} "
                         "(the unit is MiB, not bytes)")
    return number


def port(value: Any) -> int:
    number = whole(value)
    if not 0 <= number <= 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return number


def non_negative_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError("expected a finite number, 0 or more")
    return number


def positive_float(value: Any) -> float:
    number = non_negative_float(value)
    if number <= 0:
        raise ValueError("expected a number above 0")
    return number


def duration(value: Any) -> int:
    return parse_duration(value)


def http_url(value: Any) -> str:
    text = nonempty(value).rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("expected an http:// or https:// URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("expected a plain base URL without credentials, query or fragment")
    return text


def org_slug(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", value):
        raise ValueError("must be a Fly organization slug (lowercase letters, digits and '-'), e.g. acme")
    return value


def auth_scheme(value: Any) -> str:
    text = nonempty(value)
    if text not in ("Bearer", "FlyV1"):
        raise ValueError("expected Bearer or FlyV1")
    return text


def attenuate_mode(value: Any) -> str:
    text = nonempty(value)
    if text not in ("none", "apps"):
        raise ValueError("expected none (forward the credential as it is) or apps (a narrowed Fly macaroon "
                         "per request)")
    return text


def env_var_name(value: Any) -> str:
    text = nonempty(value)
    if not text.replace("_", "").isalnum():
        raise ValueError("expected the name of an environment variable")
    return text


def store_url(value: Any) -> str:
    text = nonempty(value)
    scheme = urlsplit(text).scheme
    if scheme == "sqlite":
        if not text.startswith("sqlite:///") or len(text) <= len("sqlite:///"):
            raise ValueError("expected sqlite:///PATH (three slashes, then a path)")
        return text
    if scheme in ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel"):
        return text
    raise ValueError("expected sqlite:///PATH, redis://HOST:PORT/DB or rediss://HOST:PORT/DB "
                     "(also unix:///PATH?db=N, redis+sentinel://HOST:PORT,.../SERVICE/DB)")


def key_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() for c in value) or len(value) > 64:
        raise ValueError("expected 1 to 64 characters without spaces, e.g. 'scopegate:'")
    return value


def string_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def sinks(value: Any) -> tuple[str, ...]:
    sinks = string_list(value)
    for sink in sinks:
        if sink not in ("stdout", "redis") and not (sink.startswith("file:") and len(sink) > 5):
            raise ValueError(f"unknown sink {sink!r}; expected stdout, file:PATH or redis")
    return sinks


def path_value(value: Any) -> str:
    return nonempty(value)


def optional_path(value: Any) -> str | None:
    # `none` (or an empty value) switches the feature off.
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return nonempty(value)


def boolean(value: Any) -> bool:
    """true/false (YAML), or the words an environment variable spells them with."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError("expected true or false")


def cookie_secure(value: Any) -> str:
    """When the console's session cookie says Secure: `auto` (on a TLS connection), `always`, `never`."""
    if value not in ("auto", "always", "never"):
        raise ValueError("expected auto (Secure on a TLS connection), always (TLS ends at a proxy) or never")
    return str(value)
