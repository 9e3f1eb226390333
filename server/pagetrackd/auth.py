"""Bearer tokens: who is calling, as which tenant and role.

The tokens file is TOML with one ``[[token]]`` table per token: ``sha256`` (hex digest
of the token), ``tenant`` and ``role`` (``tenant`` or ``admin``). Only hashes are
stored, and tokens never appear in logs. A ``metrics`` token only scrapes /metrics.
Without a tokens file every caller is the
``default`` tenant with the admin role (the daemon then binds only loopback and unix
sockets unless told ``--insecure``).
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from pagetrackd.domain import InvalidArgument, PermissionDenied, TenantId, Unauthenticated

#: ``metrics`` tokens may only scrape /metrics (a Prometheus bearer token), not call the API
ROLES = ("tenant", "admin", "metrics")


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of the current RPC."""

    tenant: TenantId
    role: str

    @property
    def admin(self) -> bool:
        """Whether the caller may see every tenant."""
        return self.role == "admin"

    def require_admin(self, what: str) -> None:
        """Raise PermissionDenied unless the caller is an admin."""
        if not self.admin:
            raise PermissionDenied(f"{what} needs the admin role")


DEFAULT_CALLER = Caller(TenantId("default"), "admin")

#: set by the auth interceptor for the duration of each RPC
current_caller: ContextVar[Caller] = ContextVar("current_caller", default=DEFAULT_CALLER)


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as stored in the tokens file."""
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    """Maps bearer tokens to callers; with no tokens, everyone is DEFAULT_CALLER."""

    def __init__(self, tokens: dict[str, Caller] | None = None) -> None:
        self._tokens = tokens

    @property
    def enabled(self) -> bool:
        """Whether tokens are required."""
        return self._tokens is not None

    @classmethod
    def from_file(cls, path: Path) -> Authenticator:
        """Load a tokens file; raise InvalidArgument naming what is wrong in it."""
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"tokens file {path}: {exc}") from None
        tokens: dict[str, Caller] = {}
        for i, entry in enumerate(data.get("token", [])):
            digest = str(entry.get("sha256", "")).lower()
            tenant = str(entry.get("tenant", ""))
            role = str(entry.get("role", "tenant"))
            if len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
                raise InvalidArgument(f"tokens file {path}: token {i} needs a hex sha256")
            if not tenant:
                raise InvalidArgument(f"tokens file {path}: token {i} needs a tenant")
            if role not in ROLES:
                raise InvalidArgument(f"tokens file {path}: token {i} role must be one of {ROLES}")
            tokens[digest] = Caller(TenantId(tenant), role)
        return cls(tokens)

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller for an ``authorization`` metadata value."""
        if self._tokens is None:
            return DEFAULT_CALLER
        if not authorization:
            raise Unauthenticated("missing bearer token: send 'authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        caller = self._lookup(token.strip())
        if caller is None:
            raise Unauthenticated("unknown bearer token")
        if caller.role == "metrics":
            raise PermissionDenied("this token may only scrape /metrics")
        return caller

    def _lookup(self, token: str) -> Caller | None:
        assert self._tokens is not None
        digest = hash_token(token)
        for known, caller in self._tokens.items():
            if hmac.compare_digest(known, digest):
                return caller
        return None

    def may_scrape(self, authorization: str | None) -> bool:
        """Whether an HTTP ``Authorization`` header may read /metrics: any caller without
        a tokens file, else a bearer token of role metrics or admin."""
        if self._tokens is None:
            return True
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        caller = self._lookup(token.strip())
        return caller is not None and caller.role in ("metrics", "admin")
