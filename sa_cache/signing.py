"""Optional HMAC-SHA256 signing of every cache value, for a store others can write to.

A signed value is ``mac (32 bytes) | expires_at (8 bytes, unix seconds) | value``, with the MAC
over the key, the expiry and the value. So an entry written without the secret (someone with
write access to Redis flipping ``is_admin`` on a cached user) is rejected as a miss; a genuine
entry copied to another key is rejected; and a genuine entry saved and written back later (a
replay) is accepted only until its own expiry, at most the model's TTL after it was filled.

Key rotation: pass several secrets; the first signs, all verify.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections.abc import Sequence

_HEADER = struct.Struct(">32sQ")


class Signer:
    def __init__(self, secrets: str | bytes | Sequence[str | bytes]) -> None:
        if isinstance(secrets, str | bytes):
            secrets = [secrets]
        keys = [s.encode() if isinstance(s, str) else bytes(s) for s in secrets]
        if not keys or not all(keys):
            raise ValueError("signing_key must be one or more non-empty secrets")
        self._keys = keys

    def __repr__(self) -> str:
        return f"<Signer keys={len(self._keys)}>"  # never the secrets

    @staticmethod
    def _mac(secret: bytes, key: str, expires_at: int, value: bytes) -> bytes:
        message = key.encode() + b"\0" + expires_at.to_bytes(8, "big") + value
        return hmac.new(secret, message, hashlib.sha256).digest()

    def sign(self, key: str, value: bytes, ttl: float | None) -> bytes:
        expires_at = 0 if ttl is None else int(time.time() + ttl) + 1
        return _HEADER.pack(self._mac(self._keys[0], key, expires_at, value), expires_at) + value

    def verify(self, key: str, signed: bytes) -> bytes | None:
        """The value, or None if no secret signed it for this key or it has expired."""
        if len(signed) < _HEADER.size:
            return None
        mac, expires_at = _HEADER.unpack_from(signed)
        value = signed[_HEADER.size :]
        if expires_at and expires_at < time.time():
            return None
        for secret in self._keys:
            if hmac.compare_digest(mac, self._mac(secret, key, expires_at, value)):
                return value
        return None
