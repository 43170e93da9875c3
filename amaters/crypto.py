"""Client-side encryption of values: the server only ever stores ciphertext.

:class:`AESGCMCipher` encrypts each value with AES-256-GCM under a key kept in a local key file
(``amaters keygen`` writes one, mode 0600).  Every ciphertext is bound to its collection and key
(they are the GCM associated data), so a server that moves a value to another key is caught on
read instead of returning the wrong plaintext.  Keys themselves are not encrypted: RANGE needs their
order, so choose keys that do not reveal secrets.

Ciphertext layout (version 1): ``0x01 | nonce (12 bytes, random) | AES-GCM ciphertext and tag``.
Key file: one line, ``amaters-aes256gcm-v1:`` followed by the base64 of the 32-byte key.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from amaters.errors import InvalidValue

_KEY_PREFIX = "amaters-aes256gcm-v1:"
_VERSION = b"\x01"
_NONCE_BYTES = 12


class DecryptionError(InvalidValue):
    """A value could not be decrypted: wrong key file, or the stored ciphertext was altered."""


class KeyFileError(Exception):
    """The key file is missing, unreadable or not an amaters key file."""


def _associated_data(collection: str, key: bytes) -> bytes:
    return b"amaters/v1\x00" + collection.encode() + b"\x00" + key


class AESGCMCipher:
    """AES-256-GCM over values, bound to (collection, key)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("an AES-256-GCM key is 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def generate(cls, path: str | os.PathLike[str], *, overwrite: bool = False) -> AESGCMCipher:
        """Create a new random key, write it to ``path`` (mode 0600) and return its cipher.

        Refuses to replace an existing file unless ``overwrite``: losing a key loses every value
        encrypted with it.
        """
        target = Path(path)
        key = AESGCM.generate_key(bit_length=256)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(target, flags, 0o600)
        except FileExistsError:
            raise KeyFileError(f"{target} already exists; refusing to overwrite a key file") from None
        with os.fdopen(fd, "w") as f:
            f.write(_KEY_PREFIX + base64.b64encode(key).decode() + "\n")
        os.chmod(target, 0o600)
        return cls(key)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AESGCMCipher:
        """Load the key from a file written by :meth:`generate`."""
        try:
            text = Path(path).read_text().strip()
        except OSError as e:
            raise KeyFileError(f"cannot read key file {path}: {e.strerror or e}") from None
        if not text.startswith(_KEY_PREFIX):
            raise KeyFileError(f"{path} is not an amaters key file (expected {_KEY_PREFIX}...)")
        try:
            key = base64.b64decode(text[len(_KEY_PREFIX) :], validate=True)
        except ValueError:
            raise KeyFileError(f"{path}: the key is not valid base64") from None
        if len(key) != 32:
            raise KeyFileError(f"{path}: the key must be 32 bytes, found {len(key)}")
        return cls(key)

    def encrypt(self, plaintext: bytes, collection: str, key: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, _associated_data(collection, key))

    def decrypt(self, ciphertext: bytes, collection: str, key: bytes) -> bytes:
        if len(ciphertext) < 1 + _NONCE_BYTES + 16 or ciphertext[:1] != _VERSION:
            raise DecryptionError("the stored value is not an amaters AES-GCM ciphertext")
        nonce = ciphertext[1 : 1 + _NONCE_BYTES]
        try:
            return self._aead.decrypt(
                nonce, ciphertext[1 + _NONCE_BYTES :], _associated_data(collection, key)
            )
        except InvalidTag:
            raise DecryptionError(
                "the value does not decrypt with this key file (wrong key, or the value was altered)"
            ) from None
