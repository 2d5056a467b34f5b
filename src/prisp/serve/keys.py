"""The store key and AES-GCM sealing of adapter bytes.

Every adapter file is ``MAGIC + nonce (12 bytes) + AES-256-GCM(ciphertext + tag)``. The associated data
names the slot the bytes belong to (store, user, task, version), so the GCM tag fails when a file is
copied into another user's slot or another version, exactly as it fails when one byte is altered:
authenticity is checked before a single tensor is parsed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from prisp.errors import AdapterError, PrispError

KEY_ENV = "PRISP_STORE_KEY"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce; random per write, so 2^-32 collision odds only after ~2^32 writes
MAGIC = b"PRISPAD1"


class SealError(AdapterError):
    """A stored adapter cannot be trusted: tampered, truncated, moved to another slot, another key, or gone.

    The server answers it with 500 and never falls back to the anchor: failing closed is the point.
    """


@dataclass(frozen=True)
class StoreKey:
    """A 32-byte AES-256 key; ``repr`` never shows the secret.

    Attributes:
        secret: The raw key bytes.
    """

    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise PrispError(f"store key must be {KEY_BYTES} bytes, got {len(self.secret)}")

    def __repr__(self) -> str:
        return f"StoreKey(id={self.key_id})"

    @property
    def key_id(self) -> str:
        """A public fingerprint (64 bits of a domain-separated hash) recorded beside each sealed file."""
        return hashlib.sha256(b"prisp-store-key-id\0" + self.secret).hexdigest()[:16]

    def encode(self) -> str:
        """The base64 text form used by ``PRISP_STORE_KEY`` and key files."""
        return base64.b64encode(self.secret).decode("ascii")


def generate_key() -> StoreKey:
    """A fresh key from the OS's CSPRNG."""
    return StoreKey(secrets.token_bytes(KEY_BYTES))


def decode_key(text: str, source: str) -> StoreKey:
    """Parse the base64 form of a key.

    Raises:
        PrispError: Not base64, or not 32 bytes; the message names ``source`` but never echoes the text.
    """
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise PrispError(f"{source} is not base64 (expected {KEY_BYTES} random bytes, base64-encoded; "
                         "`prisp serve keygen` prints one)") from None
    if len(raw) != KEY_BYTES:
        raise PrispError(f"{source} decodes to {len(raw)} bytes; a store key is {KEY_BYTES} bytes "
                         "(`prisp serve keygen` prints one)")
    return StoreKey(raw)


def load_key(key_file: Path | None = None, environ: Mapping[str, str] | None = None) -> StoreKey:
    """The store key from ``key_file`` when given, else from ``$PRISP_STORE_KEY``.

    Raises:
        PrispError: No key anywhere, an unreadable file, or a malformed key (one line).
    """
    environ = os.environ if environ is None else environ
    if key_file is not None:
        try:
            text = Path(key_file).read_text(encoding="ascii")
            mode = Path(key_file).stat().st_mode
        except (OSError, UnicodeDecodeError) as exc:
            raise PrispError(f"cannot read key file {key_file}: {exc.strerror or exc}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logging.getLogger(__name__).warning(
                "key file %s is readable by other users (mode %03o): chmod 600 it", key_file, mode & 0o777)
        return decode_key(text, f"key file {key_file}")
    if environ.get(KEY_ENV):
        return decode_key(environ[KEY_ENV], KEY_ENV)
    raise PrispError(f"no store key: set {KEY_ENV} (base64 of {KEY_BYTES} random bytes; `prisp serve keygen` "
                     "prints one) or pass --key-file")


def drop_key_from_environment() -> bool:
    """Remove ``$PRISP_STORE_KEY`` from this process's environment once the key is loaded, so processes
    started afterwards (a batch's fork server and workers, a Ray cluster) never inherit it; returns whether
    it was set."""
    return os.environ.pop(KEY_ENV, None) is not None


def slot_aad(store_id: str, user_id: str, task: str, version: int) -> bytes:
    """Associated data binding sealed bytes to exactly one adapter slot."""
    slot = {"store": store_id, "user": user_id, "task": task, "version": int(version)}
    return b"prisp-adapter/v1\0" + json.dumps(slot, sort_keys=True, separators=(",", ":")).encode()


def data_key_aad(store_id: str, user_id: str) -> bytes:
    """Associated data binding a wrapped data key to its store and user (a key moved to another user fails)."""
    return b"prisp-data-key/v1\0" + json.dumps({"store": store_id, "user": user_id}, sort_keys=True,
                                                 separators=(",", ":")).encode()


def wrap_key(store_key: StoreKey, data_key: StoreKey, aad: bytes) -> bytes:
    """A user's data key sealed by the store key (envelope encryption: only these 32 bytes ever need
    re-encrypting when the store key rotates)."""
    return seal(store_key, data_key.secret, aad)


def unwrap_key(store_key: StoreKey, wrapped: bytes, aad: bytes, what: str) -> StoreKey:
    """The data key inside ``wrapped``; SealError (fail closed) for a wrong key or altered bytes."""
    return StoreKey(unseal(store_key, wrapped, aad, what))


def seal(key: StoreKey, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt and authenticate ``plaintext`` for the slot ``aad`` names."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(key.secret).encrypt(nonce, plaintext, aad)


def unseal(key: StoreKey, blob: bytes, aad: bytes, what: str) -> bytes:
    """Check and decrypt sealed bytes; fail closed.

    Raises:
        SealError: One line naming ``what``; no partial plaintext is ever returned.
    """
    if len(blob) < len(MAGIC) + NONCE_BYTES + 16 or not blob.startswith(MAGIC):
        raise SealError(f"{what} is not a prisp sealed adapter (truncated or foreign file); "
                        "refusing to load it")
    nonce = blob[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    try:
        return AESGCM(key.secret).decrypt(nonce, blob[len(MAGIC) + NONCE_BYTES:], aad)
    except InvalidTag:
        raise SealError(f"{what} failed authentication (altered, moved from another user's slot, or "
                        "sealed with another key); refusing to load it") from None
