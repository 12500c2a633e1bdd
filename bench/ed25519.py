"""Where an uncached token verification spends its time, and which Ed25519 library to verify with.

Times, on the same key, message and signature (a real `sgt_` token minted by `TokenIssuer`):

- the signature check alone: `cryptography` (OpenSSL, what pyjwt uses) against PyNaCl (libsodium),
  both its `VerifyKey.verify` and the `crypto_sign_open` binding under it;
- the whole uncached verification as the gateway does it, `TokenVerifier._verify_uncached`
  (its own strict compact-JWS parser and PyNaCl), against the path it replaced (pyjwt's
  `get_unverified_header` and `jwt.decode` with cryptography, then the duplicate-claim check
  and `Claims`), rebuilt here step by step;
- the parts of both, to show what pyjwt adds over a raw verify.

Each case runs in interleaved rounds; per case the best round's p50 and its per-op mean are
reported (other work on a shared machine only ever adds time). Without PyNaCl the script says so
and exits 0.

    python bench/ed25519.py [--iterations 3000] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    import nacl
    import nacl.bindings
    import nacl.exceptions
    import nacl.signing
except ImportError:
    # The gateway verifies with PyNaCl (a runtime dependency since this comparison), so without it
    # neither side can be measured here.
    print("bench/ed25519.py: PyNaCl is not installed, so there is nothing to compare `cryptography` with "
          "(and the gateway, which verifies with it, cannot load); install it with "
          "`.venv/bin/pip install pynacl` (or `pip install -e .`) and run again. Nothing measured.")
    sys.exit(0)

import cryptography
import cryptography.exceptions
import jwt

from gateway.core import jws
from gateway.core import tokens as tokens_module
from gateway.core.grants import parse_grants
from gateway.core.keyring import Keyring
from gateway.core.tokens import ALGORITHMS, REQUIRED_CLAIMS, TokenIssuer, TokenVerifier

ISSUER = AUDIENCE = "scopegate-bench"


def measure(cases: dict[str, Callable[[], object]], iterations: int, rounds: int) -> dict[str, dict[str, float]]:
    best: dict[str, dict[str, float]] = {}
    names = list(cases)
    clock = time.perf_counter_ns
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn = cases[name]
            samples = [0] * iterations
            for i in range(iterations):
                t0 = clock()
                fn()
                samples[i] = clock() - t0
            samples.sort()
            p50 = samples[len(samples) // 2] / 1000
            if name not in best or p50 < best[name]["p50_us"]:
                best[name] = {"p50_us": p50, "mean_us": statistics.fmean(samples) / 1000}
    return best


def _b64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def own_parse(raw: str) -> dict[str, Any] | None:
    """The gateway's parsing around the signature check (no crypto): three canonical segments."""
    header_b64, payload_b64, signature_b64 = raw.split(".")
    jws.segment_json(header_b64)
    jws.segment(signature_b64)
    return jws.segment_json(payload_b64)


def reject_duplicate_claims(raw: str) -> None:
    """The duplicate-claim check the pyjwt path needed after `jwt.decode` (pyjwt keeps the last)."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in pairs}) != len(pairs):
            raise ValueError("a claim twice")
        return dict(pairs)

    json.loads(jwt.utils.base64url_decode(raw.split(".")[1].encode("ascii")), object_pairs_hook=no_duplicates)


def pyjwt_path(raw: str, keyring: Keyring, now: float, options: dict[str, Any]) -> object:
    """The uncached verification before issue 19 part 3 (gateway/core/tokens.py at 1252616)."""
    if not tokens_module._COMPACT_JWS.fullmatch(raw):
        raise ValueError("malformed")
    header = jwt.get_unverified_header(raw)
    if header.get("alg") not in ALGORITHMS or any(name in header for name in tokens_module._FORBIDDEN_HEADERS):
        raise ValueError("header")
    key = keyring.verifying_key(header["kid"])
    assert key is not None
    payload = jwt.decode(raw, key.public_key, algorithms=ALGORITHMS, audience=AUDIENCE, issuer=ISSUER,
                         options=options)
    reject_duplicate_claims(raw)
    return tokens_module._claims_from_payload(payload, now, issuer=ISSUER, audience=AUDIENCE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    keyring = Keyring.generate(Path(tempfile.mkdtemp(prefix="sg-ed25519-")) / "keyring.json")
    issuer = TokenIssuer(keyring, ISSUER, AUDIENCE)
    token, _ = issuer.mint(sub="ci:github:acme/web", name="bench-ed25519",
                           grants=parse_grants(["deployer@app:web-staging"]), ttl_s=86400)
    raw = token.removeprefix("sgt_")
    header_b64, payload_b64, signature_b64 = raw.split(".")
    message = f"{header_b64}.{payload_b64}".encode("ascii")
    signature = _b64(signature_b64)
    key = keyring.active
    public_key = key.public_key
    verify_key = nacl.signing.VerifyKey(key.public_bytes())
    signed = signature + message
    public_bytes = key.public_bytes()
    verifier = TokenVerifier(keyring, ISSUER, AUDIENCE)
    now = time.time()
    # The same bytes are accepted by both libraries, and a flipped bit is refused by both.
    public_key.verify(signature, message)
    verify_key.verify(message, signature)
    bad = bytes([signature[0] ^ 1]) + signature[1:]
    for check in (lambda: public_key.verify(bad, message), lambda: verify_key.verify(message, bad)):
        refused = False
        try:
            check()
        except (cryptography.exceptions.InvalidSignature, nacl.exceptions.BadSignatureError):
            refused = True
        if not refused:
            raise AssertionError("a corrupted signature verified")
    options = {"require": list(REQUIRED_CLAIMS), "strict_aud": True, "verify_exp": False,
               "verify_nbf": False, "verify_iat": False}
    payload = jwt.decode(raw, public_key, algorithms=ALGORITHMS, audience=AUDIENCE, issuer=ISSUER, options=options)

    cases: dict[str, Callable[[], object]] = {
        "signature: cryptography Ed25519PublicKey.verify": lambda: public_key.verify(signature, message),
        "signature: PyNaCl VerifyKey.verify": lambda: verify_key.verify(message, signature),
        "signature: PyNaCl crypto_sign_open": lambda: nacl.bindings.crypto_sign_open(signed, public_bytes),
        "whole: TokenVerifier._verify_uncached (own parser, PyNaCl)": lambda: verifier._verify_uncached(token, now),
        "whole: the pyjwt path it replaced (pyjwt, cryptography)": lambda: pyjwt_path(raw, keyring, now, options),
        "part: compact-form regex": lambda: tokens_module._COMPACT_JWS.fullmatch(raw),
        "part: jwt.get_unverified_header": lambda: jwt.get_unverified_header(raw),
        "part: jwt.decode (with the signature)": lambda: jwt.decode(
            raw, public_key, algorithms=ALGORITHMS, audience=AUDIENCE, issuer=ISSUER, options=options),
        "part: duplicate-claim check after jwt.decode": lambda: reject_duplicate_claims(raw),
        "part: own parse of the three segments": lambda: own_parse(raw),
        "part: Claims from the payload": lambda: tokens_module._claims_from_payload(
            payload, now, issuer=ISSUER, audience=AUDIENCE),
    }
    print(f"Ed25519 verify and token verification, {args.rounds} rounds x {args.iterations:,} iterations, "
          f"best round per case; token {len(token)} bytes")
    results = measure(cases, args.iterations, args.rounds)
    width = max(map(len, results))
    print(f"{'case':<{width}}  {'p50 µs':>8}  {'mean µs':>8}")
    for name in cases:
        row = results[name]
        print(f"{name:<{width}}  {row['p50_us']:8.1f}  {row['mean_us']:8.1f}")
    crypto = results["signature: cryptography Ed25519PublicKey.verify"]["p50_us"]
    sodium = results["signature: PyNaCl VerifyKey.verify"]["p50_us"]
    own = results["whole: TokenVerifier._verify_uncached (own parser, PyNaCl)"]["p50_us"]
    old = results["whole: the pyjwt path it replaced (pyjwt, cryptography)"]["p50_us"]
    decode = results["part: jwt.decode (with the signature)"]["p50_us"]
    header_read = results["part: jwt.get_unverified_header"]["p50_us"]
    print(f"signature alone, cryptography / PyNaCl: {crypto / sodium:.2f}x ({crypto:.1f} / {sodium:.1f} µs)")
    print(f"pyjwt over the raw signature check: jwt.decode +{decode - crypto:.1f} µs, get_unverified_header "
          f"+{header_read:.1f} µs")
    print(f"whole uncached verification, pyjwt path / own parser + PyNaCl: {old / own:.2f}x "
          f"({old:.1f} / {own:.1f} µs)")
    print(f"versions: cryptography {cryptography.__version__}, PyNaCl {nacl.__version__}, pyjwt {jwt.__version__}")
    if args.json:
        args.json.write_text(json.dumps({"cases": results, "versions": {
            "cryptography": cryptography.__version__, "pynacl": nacl.__version__, "pyjwt": jwt.__version__}},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
