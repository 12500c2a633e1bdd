"""Where the gateway's CPU goes, by layer, from a py-spy collapsed-stack profile.

`bench/run --profile` records the gateway under load with py-spy (`--format raw`: one line per
stack, `frame;frame;... count`). This script charges every sample to the layer of its innermost
frame (its *own* time: the code that was running), so the shares add up to 100%:

    python bench/profile_layers.py bench/results/gateway-profile-<time>.txt [--json]

Layers are the gateway's parts (decision core, surfaces, upstream connections, server protocol,
audit, metrics) and the libraries under them (uvicorn, aiohttp, the event loop, ...).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

# (substring of a frame's file, layer), first match wins: specific before general.
LAYERS = (
    ("uvicorn/", "uvicorn (HTTP server and ASGI cycle)"),
    ("aiohttp/", "aiohttp client"), ("yarl/", "aiohttp client"), ("multidict/", "aiohttp client"),
    ("gateway/core/audit", "audit record"), ("gateway/metrics", "metrics"), ("prometheus_client/", "metrics"),
    ("gateway/server", "server protocol and cycle (gateway/server*.py)"),
    ("gateway/frame", "request frame"), ("gateway/surfaces/http", "surface HTTP plumbing"),
    ("gateway/core/", "decision core"), ("gateway/surfaces/", "surfaces (route, decide, forward)"),
    ("gateway/upstream/", "upstream client (gateway/upstream/)"), ("gateway/app", "ASGI dispatch"),
    ("jwt/", "token verification"), ("nacl/", "token verification"), ("cryptography/", "token verification"),
    ("json/", "json"), ("asyncio/", "event loop"), ("uvloop", "event loop"), ("<string>", "event loop"),
)


def layer_of(frame: str) -> str:
    where = frame[frame.rfind("(") + 1:]
    for needle, layer in LAYERS:
        if needle in where:
            return layer
    return "other"


def shares(profile: Path) -> tuple[int, list[tuple[str, float]]]:
    """Samples in all, and each layer's share of them (largest first)."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in profile.read_text().splitlines():
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        counts[layer_of(stack.split(";")[-1])] += int(count)
    return total, [(layer, n / total) for layer, n in counts.most_common()] if total else []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path, help="a py-spy raw (collapsed) profile")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    total, by_layer = shares(args.profile)
    if not total:
        print(f"{args.profile}: no samples", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"samples": total, "shares": dict(by_layer)}, indent=2))
    else:
        for layer, share in by_layer:
            print(f"{share * 100:5.1f}%  {layer}")
        print(f"({total} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
