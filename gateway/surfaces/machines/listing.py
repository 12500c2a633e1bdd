"""`GET /v1/apps?org_slug=...` for app-scoped tokens: the upstream's list cut to the token's apps."""

from __future__ import annotations

import json
from typing import Any

from gateway.core.authorizer import Authorizer
from gateway.core.tokens import Claims
from gateway.errors import GatewayError

LISTING_LIMIT = 32 * 1024 * 1024


def filter_app_listing(listing: bytes, claims: Claims, authorizer: Authorizer) -> dict[str, Any]:
    """The upstream's app list cut down to the apps the token may read; never the unfiltered list."""
    try:
        document = json.loads(listing)
        apps = document["apps"]
        if not isinstance(apps, list):
            raise TypeError("apps is not a list")
    except (ValueError, KeyError, TypeError):
        raise GatewayError("the upstream app list has an unexpected shape; it cannot be filtered, so it is withheld") \
            from None
    kept = []
    for item in apps:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            continue
        if authorizer.decide(claims, [authorizer.check("apps:read", name)]).allowed:
            kept.append(item)
    document["apps"] = kept
    if "total_apps" in document:
        document["total_apps"] = len(kept)
    return dict(document)
