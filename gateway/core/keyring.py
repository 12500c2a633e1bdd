"""Ed25519 signing keys.

The keyring is a JSON file (mode 0600) holding every key the gateway knows: exactly one
`active` key signs new tokens; `verify` keys only verify tokens signed before a rotation;
`retired` keys verify nothing. Keys are found by the `kid` the gateway put in the token header
and never taken from the token itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from gateway.errors import ConfigError

KeyStatus = Literal["active", "verify", "retired"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey
    status: KeyStatus
    created_at: int

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def public_bytes(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64url(self.public_bytes()), "kid": self.kid,
                "alg": "EdDSA", "use": "sig"}


def new_key(now: int | None = None) -> SigningKey:
    while True:
        private = Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        # kid: a short thumbprint of the public key, so it names the key and nothing else. Never a
        # leading '-', which a command line would read as an option (`scopegate keys retire -h...`).
        kid = _b64url(hashlib.sha256(raw).digest())[:16]
        if not kid.startswith("-"):
            break
    return SigningKey(kid, private, "active", int(now if now is not None else time.time()))


class Keyring:
    def __init__(self, keys: list[SigningKey], path: Path | None = None) -> None:
        active = [k for k in keys if k.status == "active"]
        if len(active) != 1:
            raise ConfigError(f"keyring {path or '(memory)'} must have exactly one active key, has {len(active)}")
        self.path = path
        self.keys = list(keys)
        self.active = active[0]
        self._verifying = {k.kid: k for k in keys if k.status != "retired"}

    def verifying_key(self, kid: str) -> SigningKey | None:
        return self._verifying.get(kid)

    def verifying_keys(self) -> list[SigningKey]:
        return list(self._verifying.values())

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [k.jwk() for k in self.verifying_keys()]}

    @classmethod
    def generate(cls, path: Path | None = None) -> Keyring:
        return cls([new_key()], path)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"keyring {path} does not exist; run `scopegate init` to create it (tokens.keyring)"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"keyring {path} cannot be read: {exc.__class__.__name__}") from None
        try:
            keys = [_key_from_json(item) for item in raw["keys"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"keyring {path} is malformed ({exc.__class__.__name__}: {exc})") from None
        return cls(keys, path)

    def save(self) -> None:
        if self.path is None:
            return
        body = json.dumps({"keys": [_key_to_json(k) for k in self.keys]}, indent=2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename so a crash never leaves half a keyring; 0600 from the first byte.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keyring-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(body)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _key_to_json(key: SigningKey) -> dict[str, Any]:
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"kid": key.kid, "alg": "EdDSA", "status": key.status, "created_at": key.created_at,
            "private_key": pem.decode("ascii")}


def _key_from_json(item: dict[str, Any]) -> SigningKey:
    private = serialization.load_pem_private_key(item["private_key"].encode("ascii"), password=None)
    if not isinstance(private, Ed25519PrivateKey):
        raise ValueError(f"key {item.get('kid')!r} is not an Ed25519 key")
    status = item["status"]
    if status not in ("active", "verify", "retired"):
        raise ValueError(f"key {item['kid']!r} has unknown status {status!r}")
    return SigningKey(str(item["kid"]), private, status, int(item["created_at"]))
