"""Per-user bearer tokens, kept only as hashes.

A token is 256 random bits, so a single SHA-256 is enough: there is nothing to brute-force that a
slow password hash would protect (unlike a human-chosen password), and lookups stay cheap per request.
Comparisons use ``hmac.compare_digest`` so that timing does not reveal how much of a hash matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prisp.errors import PrispError

TOKEN_PREFIX = "prisp_"
# Always fullmatch: with match(), "$" also matches before a trailing newline ("u_<hex>\n" would pass).
USER_ID_RE = re.compile(r"u_[0-9a-f]{32}")
_BEARER_RE = re.compile(r"Bearer[ \t]+([A-Za-z0-9_\-]{1,200})[ \t]*", re.IGNORECASE)
# Compared against when a user does not exist, so a miss costs the same as a wrong token.
_DUMMY_HASH = hashlib.sha256(b"prisp-no-such-user").hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    """A new user's credentials: the token is shown once, only the hash is stored."""

    user_id: str
    token: str
    token_hash: str


def new_user_id() -> str:
    """A random user id that is safe as a directory name (``u_`` + 32 hex digits)."""
    return f"u_{secrets.token_hex(16)}"


def hash_token(token: str) -> str:
    """SHA-256 of a token, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue_token() -> IssuedToken:
    """A fresh user id and bearer token."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return IssuedToken(user_id=new_user_id(), token=token, token_hash=hash_token(token))


def token_matches(stored_hash: str | None, token: str) -> bool:
    """Constant-time check of ``token`` against a stored hash (None: no such user, always False)."""
    expected = stored_hash if stored_hash is not None else _DUMMY_HASH
    return hmac.compare_digest(expected, hash_token(token)) and stored_hash is not None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None when absent or malformed."""
    if not authorization:
        return None
    match = _BEARER_RE.fullmatch(authorization)
    return match.group(1) if match else None


def valid_user_id(user_id: str) -> bool:
    """Whether ``user_id`` has the shape the server issues (also guards path traversal)."""
    return bool(USER_ID_RE.fullmatch(user_id))


ADMIN_ENV = "PRISP_ADMIN_TOKEN"
_ADMIN_HASH_RE = re.compile(r"sha256:([0-9a-f]{64})")


def admin_hash_line(token_hash: str) -> str:
    """The one line an admin token file holds: the token's hash, never the token."""
    return f"sha256:{token_hash}\n"


def load_admin_hash(token_file: Path | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The admin token's hash: from ``token_file`` (written by ``prisp serve admin-token``), else from
    ``$PRISP_ADMIN_TOKEN`` (the token itself, hashed here and kept only as the hash); None when neither is set.

    Raises:
        PrispError: an unreadable or malformed file, or a malformed token (one line).
    """
    environ = os.environ if environ is None else environ
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise PrispError(f"cannot read admin token file {token_file}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        match = _ADMIN_HASH_RE.fullmatch(text)
        if not match:
            raise PrispError(f"admin token file {token_file} must hold one line 'sha256:<64 hex digits>' (write it "
                             "with `prisp serve admin-token --out FILE`)")
        return match.group(1)
    token = environ.get(ADMIN_ENV)
    if token:
        if not bearer_token(f"Bearer {token}") or len(token) < 32:
            raise PrispError(f"{ADMIN_ENV} must be a token of at least 32 URL-safe characters "
                             "(`prisp serve admin-token` makes one)")
        return hash_token(token)
    return None
