"""Bearer tokens → (project, role). Tokens come from the config file and from the registry
(created by an admin through `POST /v1/tokens`, stored as SHA-256 digests only)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from services.api.config import ApiConfig, Role
from services.api.problems import Problem
from services.api.registry import Registry


@dataclass(frozen=True, slots=True)
class Principal:
    project: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def sees(self, project: str | None) -> bool:
        """Whether this caller may see things of `project` (None: no project known)."""
        return self.is_admin or project == self.project


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "flt_" + secrets.token_urlsafe(32)


class Authenticator:
    def __init__(self, config: ApiConfig, registry: Registry) -> None:
        self._static = {digest(t.token): Principal(t.project, t.role) for t in config.tokens}
        self.registry = registry

    def principal(self, authorization: str | None) -> Principal:
        """The caller named by an `Authorization: Bearer …` header; 401 Problem otherwise."""
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("send Authorization: Bearer <token>")
        key = digest(token)
        found = self._static.get(key)
        if found is not None:
            return found
        record = self.registry.access.find_token(key)
        if record is None:
            raise _unauthorized("unknown token")
        return Principal(record.project, record.role)


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": "Bearer"})


def require_admin(principal: Principal) -> None:
    if not principal.is_admin:
        raise Problem(403, "forbidden", "this needs an admin token")
