"""Fly.io macaroons (github.com/superfly/macaroon), byte for byte: decode, attenuate, encode, and,
for the dev sandbox and tests, mint and verify with a root key.

Wire format: `fm2_` + standard base64 of a MessagePack array `[nonce, location, caveats, tail]`.
The nonce is `[kid (bin), rnd (bin, 16 bytes)]` or `[kid, rnd, proof (bool)]`; caveats is a flat
array `[type1, body1, type2, body2, ...]` whose bodies are array-encoded structs; tail is the
HMAC-SHA256 chain: `tail0 = HMAC(root key, nonce)`, then per caveat
`tail = HMAC(key=tail, msg=msgpack([type, body]))`. Anyone holding a token can add a caveat
(narrowing it) without the root key; nobody can remove one.

Caveats already on a token are kept as the bytes they came in, so re-encoding a decoded token is
exact whatever encoder made it; new caveats are encoded canonically as Go's msgpack encoder with
compact ints and array-encoded structs does (`ResourceSet` maps with sorted keys), which the
shared test vectors (tests/data/macaroon_vectors.json, made by the Go library) check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

PREFIX = "fm2_"

# Caveat type codes (macaroon caveat.go, iota order) the gateway writes or must recognise.
ORGANIZATION = 0
APPS = 3
VALIDITY_WINDOW = 4
MUTATIONS = 6
THIRD_PARTY = 11
IF_PRESENT = 13

# resset.Action bits.
READ, WRITE, CREATE, DELETE, CONTROL = 1, 2, 4, 8, 16
ALL_ACTIONS = READ | WRITE | CREATE | DELETE | CONTROL

_MAX_TOKEN_BYTES = 64 * 1024


class MacaroonError(ValueError):
    """A token that is not a Fly macaroon this module can read, or one that does not verify."""


@dataclass(frozen=True, slots=True)
class Caveat:
    type: int
    body: Any  # the decoded body (array-encoded struct)
    raw: bytes  # msgpack of [type, body], exactly as signed


@dataclass(frozen=True, slots=True)
class Macaroon:
    nonce: bytes  # the nonce's msgpack encoding, as received: the root signature covers it
    kid: bytes
    proof: bool
    location: str
    caveats: tuple[Caveat, ...]
    tail: bytes

    def has(self, caveat_type: int) -> bool:
        return any(c.type == caveat_type for c in self.caveats)


def caveat(caveat_type: int, body: Any) -> Caveat:
    """A new caveat, encoded canonically."""
    return Caveat(caveat_type, body, _pack([caveat_type, body]))


def apps(permissions: Mapping[int, int]) -> Caveat:
    """`Apps{numeric app id: action bits}` (flyio.Apps)."""
    return caveat(APPS, [dict(sorted(permissions.items()))])


def validity_window(not_before: int, not_after: int) -> Caveat:
    return caveat(VALIDITY_WINDOW, [not_before, not_after])


def mutations(names: Iterable[str]) -> Caveat:
    """`Mutations{names}` (flyio.Mutations): only these GraphQL mutations."""
    return caveat(MUTATIONS, [list(names)])


def decode(token: str) -> Macaroon:
    """A `fm2_...` token (one: a `FlyV1 a,b` bundle is not one token)."""
    if not token.startswith(PREFIX):
        raise MacaroonError("not a Fly macaroon: it does not start with fm2_")
    if len(token) > _MAX_TOKEN_BYTES:
        raise MacaroonError("the macaroon is too long")
    try:
        data = base64.b64decode(token[len(PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise MacaroonError("the macaroon is not valid base64") from None
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    try:
        if unpacker.read_array_header() != 4:
            raise MacaroonError("a macaroon is an array of 4 fields")
        start = unpacker.tell()
        nonce = unpacker.unpack()
        nonce_raw = data[start:unpacker.tell()]
        location = unpacker.unpack()
        count = unpacker.read_array_header()
        if count % 2:
            raise MacaroonError("the caveat set has an odd length")
        caveats = []
        for _ in range(count // 2):
            start = unpacker.tell()
            caveat_type, body = unpacker.unpack(), unpacker.unpack()
            if not isinstance(caveat_type, int) or isinstance(caveat_type, bool) or caveat_type < 0:
                raise MacaroonError("a caveat type is not an unsigned integer")
            # What the chain signs: a set of one caveat, i.e. the pair as a 2-array.
            caveats.append(Caveat(caveat_type, body, b"\x92" + data[start:unpacker.tell()]))
        tail = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise MacaroonError("trailing bytes after the macaroon")
    except msgpack.OutOfData:
        raise MacaroonError("the macaroon is truncated") from None
    except (msgpack.UnpackException, ValueError, TypeError) as exc:  # TypeError: unhashable map keys
        if isinstance(exc, MacaroonError):
            raise
        raise MacaroonError(f"the macaroon is not valid MessagePack ({exc.__class__.__name__})") from None
    kid, proof = _nonce(nonce)
    if not isinstance(location, str):
        raise MacaroonError("the macaroon's location is not a string")
    if not isinstance(tail, bytes) or len(tail) != 32:
        raise MacaroonError("the macaroon's signature is not 32 bytes")
    return Macaroon(nonce_raw, kid, proof, location, tuple(caveats), tail)


def _nonce(nonce: Any) -> tuple[bytes, bool]:
    if not isinstance(nonce, list) or len(nonce) not in (2, 3):
        raise MacaroonError("the nonce is not [kid, rnd] or [kid, rnd, proof]")
    kid, rnd = nonce[0], nonce[1]
    if not isinstance(kid, bytes) or not isinstance(rnd, bytes):
        raise MacaroonError("the nonce's kid and rnd must be binary")
    proof = nonce[2] if len(nonce) == 3 else False
    if not isinstance(proof, bool):
        raise MacaroonError("the nonce's proof flag is not a boolean")
    return kid, proof


def encode(macaroon: Macaroon) -> str:
    packer = msgpack.Packer(use_bin_type=True)
    parts = [b"\x94", macaroon.nonce, packer.pack(macaroon.location),
             packer.pack_array_header(2 * len(macaroon.caveats))]
    parts += [c.raw[1:] for c in macaroon.caveats]  # each pair without its 2-array header
    parts.append(packer.pack(macaroon.tail))
    return PREFIX + base64.b64encode(b"".join(parts)).decode("ascii")


def attenuate(macaroon: Macaroon, *added: Caveat) -> Macaroon:
    """The macaroon with `added` caveats appended and the signature chained over them."""
    if macaroon.proof:
        raise MacaroonError("a discharge (proof) macaroon cannot take more caveats")
    tail = macaroon.tail
    for item in added:
        tail = _sign(tail, item.raw)
    return Macaroon(macaroon.nonce, macaroon.kid, macaroon.proof, macaroon.location,
                    macaroon.caveats + tuple(added), tail)


def mint(key: bytes, kid: bytes, location: str, *caveats: Caveat) -> Macaroon:
    """A new root macaroon (what Fly's token service does; the dev sandbox and tests use it)."""
    nonce = _pack([kid, os.urandom(16)])
    return attenuate(Macaroon(nonce, kid, False, location, (), _sign(key, nonce)), *caveats)


def verify(macaroon: Macaroon, key: bytes) -> tuple[Caveat, ...]:
    """The caveats, once the signature chain checks out under the root `key`."""
    tail = _sign(key, macaroon.nonce)
    for item in macaroon.caveats:
        tail = _sign(tail, item.raw)
    if not hmac.compare_digest(tail, macaroon.tail):
        raise MacaroonError("the macaroon's signature does not verify")
    return macaroon.caveats


def _sign(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed
