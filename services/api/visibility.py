"""Host names are for admins: what a member receives names hosts only by an alias.

A member's alias for a host is stable within its project (so it can tell whether two of its
domains share a host, which anti-affinity is about) and says nothing across projects. It is
an HMAC under a key the registry keeps (services.api.registry.access's `secret`), so
guessing host names and hashing them does not reverse it. Every body the API sends a member
passes through one `HostMask`: domain views, problem documents and the SSE stream.

    mask = HostMask.for_caller(caller, registry.hosts.names, key)
    body = mask.body(problem.body())

`body` rewrites, anywhere in a JSON-like value: a string under a key that names a host
(`host`, `source_host`, …, and a migration's `target`) into its alias; the host lists under
`filtered` (the scheduler's filter → hosts); and known host names inside free text (`detail`,
`message`, `reason`, `error`), because a scheduler or compute node may name a host in a
sentence.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterable
from typing import Any

from services.api.auth import Principal

ALIAS_PREFIX = "host-"
_TEXT_KEYS = frozenset({"detail", "message", "reason", "error"})
# Keys besides `host` and `*_host` whose string names a host: a migration's `target` (in
# `domain.migration_progress` and job replies; no body masked here has a disk's `target`).
_HOST_KEYS = frozenset({"host", "target"})


HOST_ALIAS_KEY_NAME = "host_alias"  # the name of the key in the registry


def host_alias(key: str, project: str, host: str) -> str:
    """A member's name for `host`: the same for every domain of `project`, different for
    every other project, and not computable without `key`."""
    digest = hmac.new(key.encode(), f"{project}\0{host}".encode(), hashlib.sha256)
    return ALIAS_PREFIX + digest.hexdigest()[:16]


def _is_host_key(key: object) -> bool:
    return isinstance(key, str) and (key in _HOST_KEYS or key.endswith("_host"))


class HostMask:
    """Rewrites host names for one caller; for an admin (`project` None) it changes nothing.
    `known_hosts` is asked (once, lazily) for the host names free text may contain."""

    def __init__(
        self, project: str | None, known_hosts: Callable[[], Iterable[str]], key: str = ""
    ) -> None:
        self.project = project
        self.key = key
        self._known_hosts = known_hosts
        self._seen: set[str] = set()
        self._known: set[str] | None = None
        self._pattern: re.Pattern[str] | None = None

    @classmethod
    def for_caller(
        cls, caller: Principal, known_hosts: Callable[[], Iterable[str]], key: Callable[[], str]
    ) -> HostMask:
        """The mask for `caller`; `key` (the alias key) is asked only for a member."""
        if caller.is_admin:
            return cls(None, known_hosts)
        return cls(caller.project, known_hosts, key())

    @property
    def active(self) -> bool:
        return self.project is not None

    def name(self, host: str | None) -> str | None:
        """What the caller sees for `host`."""
        if not host or self.project is None:
            return host  # "": no host (a shared pool's volume)
        if host not in self._seen:
            self._seen.add(host)
            self._pattern = None
        return host_alias(self.key, self.project, host)

    def aliases(self, extra: Iterable[str] = ()) -> dict[str, str] | None:
        """What the caller sees for every known host and each of `extra`, by name; None for
        an admin, who sees the names themselves (a listing rendered elsewhere takes it)."""
        if self.project is None:
            return None
        self.load()
        return {
            host: host_alias(self.key, self.project, host)
            for host in {*(self._known or ()), *extra}
        }

    def matches(self, host: str | None, wanted: str) -> bool:
        """Whether `wanted` (a name an admin gives, an alias a member gives) is `host`."""
        return host is not None and self.name(host) == wanted

    def text(self, value: str) -> str:
        """`value` with every known host name replaced by its alias."""
        if self.project is None or not value:
            return value
        pattern = self._text_pattern()
        if pattern is None:
            return value
        return pattern.sub(lambda m: self.name(m.group(0)) or "", value)

    def body(self, value: Any) -> Any:
        """A copy of the JSON-like `value` with host names rewritten (see the module doc)."""
        if self.project is None:
            return value
        # The names in host fields first, so the free text beside them loses them too.
        self._collect(value)
        return self._walk(value)

    def _collect(self, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if _is_host_key(key) and isinstance(item, str):
                    self.name(item)
                elif key == "filtered" and isinstance(item, dict):
                    for hosts in item.values():
                        for host in hosts if isinstance(hosts, list) else ():
                            self.name(host if isinstance(host, str) else None)
                else:
                    self._collect(item)
        elif isinstance(value, list):
            for item in value:
                self._collect(item)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, dict):
            out: dict[Any, Any] = {}
            for key, item in value.items():
                if _is_host_key(key) and isinstance(item, str):
                    out[key] = self.name(item)
                elif key == "filtered" and isinstance(item, dict):
                    out[key] = {
                        k: [self.name(h) for h in v] if isinstance(v, list) else v
                        for k, v in item.items()
                    }
                elif key in _TEXT_KEYS and isinstance(item, str):
                    out[key] = self.text(item)
                else:
                    out[key] = self._walk(item)
            return out
        if isinstance(value, list):
            return [self._walk(item) for item in value]
        return value

    def load(self) -> None:
        """Read the known host names now (they are read once, when first needed)."""
        if self._known is None and self.project is not None:
            self._known = {h for h in self._known_hosts() if h}
            self._pattern = None

    def _text_pattern(self) -> re.Pattern[str] | None:
        if self._pattern is None:
            self.load()
            names = (self._known or set()) | self._seen
            if not names:
                return None
            # Longest first, so `node-10` is not rewritten as `node-1` + "0"; a name counts
            # only where it is not part of a longer name-like word.
            alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
            self._pattern = re.compile(rf"(?<![A-Za-z0-9_.-])(?:{alternatives})(?![A-Za-z0-9_-])")
        return self._pattern
