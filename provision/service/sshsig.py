"""Verifying an armored SSHSIG (``ssh-keygen -Y sign``) against one pinned ed25519 key.

A small, strict verifier on ``cryptography`` (format: OpenSSH PROTOCOL.sshsig):
only version 1, only ssh-ed25519, only sha256/sha512, the signature's public
key must be exactly the pinned one and its namespace exactly the expected
one. It runs in-process (tens of microseconds; no ssh-keygen per request).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

_BEGIN = "-----BEGIN SSH SIGNATURE-----"
_END = "-----END SSH SIGNATURE-----"
_MAGIC = b"SSHSIG"
_HASHES = ("sha512", "sha256")
MAX_ARMORED = 4096  # an ed25519 SSHSIG is about 300 characters


class SignatureError(Exception):
    """Not a valid signature by the expected key in the expected namespace."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        if self.pos + size > len(self.data):
            raise SignatureError("truncated signature")
        out = self.data[self.pos : self.pos + size]
        self.pos += size
        return out

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def string(self) -> bytes:
        return self.take(self.uint32())

    def done(self) -> bool:
        return self.pos == len(self.data)


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def dearmor(armored: str) -> bytes:
    """The SSHSIG blob inside ``-----BEGIN SSH SIGNATURE-----`` armor."""
    if len(armored) > MAX_ARMORED:
        raise SignatureError("signature too long")
    lines = [line.strip() for line in armored.strip().splitlines()]
    if len(lines) < 3 or lines[0] != _BEGIN or lines[-1] != _END:
        raise SignatureError("not an armored SSH signature")
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError("bad base64 in signature") from exc


def verify(message: bytes, armored: str, *, namespace: str, public_key: bytes) -> None:
    """Raise SignatureError unless ``armored`` signs ``message`` by ``public_key`` (an ssh-ed25519 blob)."""
    blob = _Reader(dearmor(armored))
    if blob.take(6) != _MAGIC or blob.uint32() != 1:
        raise SignatureError("not an SSHSIG version 1 signature")
    signer = blob.string()
    sig_namespace = blob.string()
    reserved = blob.string()
    hash_algo = blob.string()
    signature = _Reader(blob.string())
    if not blob.done():
        raise SignatureError("trailing data in signature")
    if signer != public_key:
        raise SignatureError("signed by another key")
    if sig_namespace != namespace.encode():
        raise SignatureError("signature for another namespace")
    if hash_algo.decode(errors="replace") not in _HASHES:
        raise SignatureError("unsupported hash algorithm")
    if signature.string() != b"ssh-ed25519":
        raise SignatureError("not an ssh-ed25519 signature")
    raw = signature.string()
    if not signature.done() or len(raw) != 64:
        raise SignatureError("malformed ed25519 signature")
    key = _Reader(public_key)
    if key.string() != b"ssh-ed25519":
        raise SignatureError("the pinned key is not ssh-ed25519")
    point = key.string()
    digest = hashlib.new(hash_algo.decode(), message).digest()
    signed = _MAGIC + _string(sig_namespace) + _string(reserved) + _string(hash_algo) + _string(digest)
    try:
        Ed25519PublicKey.from_public_bytes(point).verify(raw, signed)
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("bad signature") from exc
