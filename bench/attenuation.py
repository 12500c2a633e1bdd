"""Issue 17's budget: Machines API req/s through the gateway with `upstream.attenuate: apps`, as a
ratio of the same gateway without it (>= 0.95x), measured in one run.

Two gateways (`scopegate serve`, one worker each) share one fast upstream (bench/upstream_server.py,
which also answers the numeric-id lookup) and one token; rounds alternate which is measured first,
and the ratio is the median of the ratios paired within a round.

    bench/attenuation.py [--seconds 5] [--rounds 3] [--concurrency 1 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import yaml  # noqa: E402

import bench  # noqa: E402

BUDGET = 0.95


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 10])
    args = parser.parse_args()

    from gateway.dev.sandbox_macaroon import issue, new_root_key

    os.environ[bench.CREDENTIAL_ENV] = issue(new_root_key())
    with tempfile.TemporaryDirectory(prefix="sg-attenuation-") as tmp:
        folder = Path(tmp)
        procs = bench.Processes(folder)
        try:
            return run(args, procs, folder)
        finally:
            procs.stop_all()


def run(args: argparse.Namespace, procs: bench.Processes, folder: Path) -> int:
    """Start the upstream and both gateways in `folder`, measure, print; 1 when the budget is missed."""
    _, upstream_url, kind = bench.start_upstream(procs, folder, use_nginx=False)
    urls, servers, token = {}, {}, ""
    for mode in ("none", "apps"):
        sub = folder / mode
        sub.mkdir()
        config = bench.write_gateway_config(sub, upstream_url)
        document = yaml.safe_load(config.read_text())
        document["upstream"].update({"auth_scheme": "FlyV1", "attenuate": mode})
        config.write_text(yaml.safe_dump(document))
        if mode == "none":
            token, _ = bench.mint_tokens(config, 0)
            keyring = (sub / "keyring.json").read_bytes()
            store = (sub / "state.db").read_bytes()
        else:  # the same keyring and store: one token for both
            (sub / "keyring.json").write_bytes(keyring)
            (sub / "state.db").write_bytes(store)
        servers[mode], urls[mode] = bench.start_gateway(procs, f"gateway-{mode}", config, 1)
    bench.log(f"upstream: {kind}")
    ratios: dict[int, list[float]] = {c: [] for c in args.concurrency}
    rps: dict[str, dict[int, list[float]]] = {m: {c: [] for c in args.concurrency} for m in urls}
    for round_index in range(args.rounds):
        for c in args.concurrency:
            order = ["none", "apps"] if round_index % 2 == 0 else ["apps", "none"]
            got = {}
            for mode in order:
                result = bench.check(bench.measure(servers[mode], urls[mode] + bench.PATH, concurrency=c,
                                                   seconds=args.seconds, token=token,
                                                   use_wrk=bench.wrk_available()), f"{mode} c={c}")
                got[mode] = result.rps
                rps[mode][c].append(result.rps)
                bench.log(f"  round {round_index + 1}/{args.rounds} attenuate={mode:4s} c={c:<3d} "
                          f"{result.rps:9,.0f} req/s  p50 {result.p50_us / 1000:6.3f} ms")
            ratios[c].append(got["apps"] / got["none"])
    print(f"\n{'conc':>4}  {'attenuate: none':>16}  {'attenuate: apps':>16}  {'apps / none':>11}  budget")
    worst = min(statistics.median(values) for values in ratios.values())
    for c in args.concurrency:
        ratio = statistics.median(ratios[c])
        print(f"c={c:<2d}  {statistics.median(rps['none'][c]):14,.0f}/s  {statistics.median(rps['apps'][c]):14,.0f}/s"
              f"  {ratio:10.2f}x  >= {BUDGET}x {'met' if ratio >= BUDGET else 'NOT MET'}")
    print(f"(medians over {args.rounds} rounds; ratios paired within a round; upstream {upstream_url})")
    return 0 if worst >= BUDGET else 1


if __name__ == "__main__":
    sys.exit(main())
