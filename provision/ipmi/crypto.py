"""RMCP+ cryptography: cipher suites 3 and 17, RAKP codes, session keys, packets.

IPMI v2.0 section 13.28-13.31. A cipher suite fixes three algorithms:

========  ====================  ==================  ==================
 suite     authentication        integrity           confidentiality
========  ====================  ==================  ==================
  3        RAKP-HMAC-SHA1 (1)    HMAC-SHA1-96 (1)    AES-CBC-128 (1)
  17       RAKP-HMAC-SHA256 (3)  HMAC-SHA256-128 (4) AES-CBC-128 (1)
========  ====================  ==================  ==================

Nothing else is accepted: suites without integrity or confidentiality (0, 1,
2...) are never proposed nor followed. Keys (section 13.31), for the
console's random number Rm, the BMC's Rc, the requested role and user name:

* Kuid: the user's password (HMAC pads a key of up to 64 bytes with zeros,
  which is the spec's zero-padded 20-byte Kuid); Kg = Kuid (no BMC key);
* SIK = HMAC(Kg, Rm | Rc | role | len(name) | name);
* K1 = HMAC(SIK, 0x01 * 20): integrity key; K2 = HMAC(SIK, 0x02 * 20),
  whose first 16 bytes are the AES-CBC-128 key.

HMAC comes from ``cryptography``, AES-CBC as well. Keys and passwords never
appear in a repr.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


@dataclass(frozen=True)
class CipherSuite:
    number: int
    algorithms: tuple[int, int, int]  # authentication, integrity, confidentiality (tables 13-17..13-19)
    hash_name: str  # "sha1" or "sha256"
    icv_length: int  # integrity check value: RAKP4 ICV and the packets' AuthCode

    def hash(self) -> hashes.HashAlgorithm:
        return _HASHES[self.hash_name]


_HASHES: dict[str, hashes.HashAlgorithm] = {"sha1": hashes.SHA1(), "sha256": hashes.SHA256()}


SUITE_17 = CipherSuite(17, (3, 4, 1), "sha256", 16)
SUITE_3 = CipherSuite(3, (1, 1, 1), "sha1", 12)
# In order of preference.
SUITES: dict[int, CipherSuite] = {17: SUITE_17, 3: SUITE_3}


def suite_for(chosen: tuple[int, int, int]) -> CipherSuite | None:
    """The accepted suite whose algorithms the BMC chose, else None."""
    for suite in SUITES.values():
        if suite.algorithms == chosen:
            return suite
    return None


def hmac_digest(key: bytes, data: bytes, suite: CipherSuite) -> bytes:
    mac = crypto_hmac.HMAC(key, suite.hash())
    mac.update(data)
    return mac.finalize()


@dataclass(frozen=True)
class Rakp:
    """The values both sides of a RAKP exchange hash (section 13.20-13.23)."""

    suite: CipherSuite
    console_sid: int  # SIDm, the remote console's session id
    bmc_sid: int  # SIDc, the managed system's
    rm: bytes  # the console's random number (16 bytes)
    rc: bytes  # the BMC's random number (16 bytes)
    guid: bytes  # the BMC's GUID (16 bytes)
    role: int  # RAKP1 role byte: name-only lookup bit | requested maximum privilege
    user: bytes

    def _name(self) -> bytes:
        return bytes([self.role, len(self.user)]) + self.user

    def rakp2_code(self, kuid: bytes) -> bytes:
        """The key exchange authentication code the BMC sends in RAKP2."""
        data = (
            self.console_sid.to_bytes(4, "little")
            + self.bmc_sid.to_bytes(4, "little")
            + self.rm
            + self.rc
            + self.guid
            + self._name()
        )
        return hmac_digest(kuid, data, self.suite)

    def rakp3_code(self, kuid: bytes) -> bytes:
        """The key exchange authentication code the console sends in RAKP3."""
        return hmac_digest(kuid, self.rc + self.console_sid.to_bytes(4, "little") + self._name(), self.suite)

    def sik(self, kg: bytes) -> bytes:
        return hmac_digest(kg, self.rm + self.rc + self._name(), self.suite)

    def rakp4_icv(self, sik: bytes) -> bytes:
        """The integrity check value the BMC sends in RAKP4."""
        data = self.rm + self.bmc_sid.to_bytes(4, "little") + self.guid
        return hmac_digest(sik, data, self.suite)[: self.suite.icv_length]


class SessionKeys:
    """An established session's keys: K1 (integrity) and the AES key (from K2).

    AES-CBC is run as CBC chaining over one AES-ECB context per direction,
    kept for the session: a new cipher context per message would cost more
    than the encryption of the one or two blocks a message takes.
    """

    __slots__ = ("_decryptor", "_encryptor", "aes_key", "k1", "suite")

    def __init__(self, suite: CipherSuite, k1: bytes, aes_key: bytes) -> None:
        self.suite = suite
        self.k1 = k1
        self.aes_key = aes_key
        cipher = Cipher(algorithms.AES(aes_key), modes.ECB())
        self._encryptor = cipher.encryptor()
        self._decryptor = cipher.decryptor()

    def __repr__(self) -> str:
        return f"SessionKeys(suite={self.suite.number})"

    @classmethod
    def derive(cls, suite: CipherSuite, sik: bytes) -> SessionKeys:
        k1 = hmac_digest(sik, b"\x01" * 20, suite)
        k2 = hmac_digest(sik, b"\x02" * 20, suite)
        return cls(suite, k1, k2[:16])

    def auth_code(self, data: bytes) -> bytes:
        """HMAC-SHA1-96 or HMAC-SHA256-128 over a packet (Auth Type through Next Header)."""
        return hmac_digest(self.k1, data, self.suite)[: self.suite.icv_length]

    def encrypt(self, payload: bytes, iv: bytes | None = None) -> bytes:
        """AES-CBC-128 confidentiality trailer format (table 13-20): IV | E(payload | pad | pad length)."""
        iv = iv if iv is not None else os.urandom(16)
        plain = payload + aes_pad(len(payload))
        out = [iv]
        chain = int.from_bytes(iv, "big")
        for start in range(0, len(plain), 16):
            block = (int.from_bytes(plain[start : start + 16], "big") ^ chain).to_bytes(16, "big")
            encrypted = self._encryptor.update(block)
            out.append(encrypted)
            chain = int.from_bytes(encrypted, "big")
        return b"".join(out)

    def decrypt(self, data: bytes) -> bytes:
        """The inverse of ``encrypt``; raises ValueError on a malformed payload."""
        if len(data) < 32 or len(data) % 16:
            raise ValueError("encrypted payload is not IV + whole AES blocks")
        decrypted = self._decryptor.update(data[16:])
        length = len(decrypted)
        plain = (int.from_bytes(decrypted, "big") ^ int.from_bytes(data[:-16], "big")).to_bytes(length, "big")
        pad = plain[-1]
        if pad > 15:
            raise ValueError("bad confidentiality pad length")
        return plain[: -1 - pad]


def aes_pad(length: int) -> bytes:
    """Pad bytes 1, 2, ... n and the pad length n, so that length + n + 1 is a multiple of 16."""
    n = (16 - (length + 1) % 16) % 16
    return bytes(range(1, n + 1)) + bytes([n])
