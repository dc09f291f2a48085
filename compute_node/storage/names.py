"""Names of volumes and images, and the paths they map to inside a pool.

Volume and image file names are ids chosen by the control plane, never user-supplied paths;
they are still checked here, and every path is resolved and must stay inside its directory,
so a bad id or a planted symlink can never make the agent touch a file outside the pool.
"""

from __future__ import annotations

import re
from pathlib import Path

from compute_node.storage.errors import InvalidName

MAX_NAME = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_name(name: str) -> str:
    """Return `name` if it is a valid volume id; raise InvalidName saying why otherwise.

    Valid: 1-128 characters of letters, digits, `.`, `_`, `-`, starting with a letter or digit,
    without `..` (uuids, `vol-1`, `disk.0`).
    """
    if not isinstance(name, str):
        raise InvalidName(f"a volume name is a string, not {type(name).__name__}")
    if "\0" in name:
        raise InvalidName(f"volume name {name!r} contains a NUL byte")
    if "/" in name:
        raise InvalidName(f"volume name {name!r} contains '/': names are ids, not paths")
    if ".." in name:
        raise InvalidName(f"volume name {name!r} contains '..'")
    if not name or len(name) > MAX_NAME:
        raise InvalidName(f"volume name must be 1-{MAX_NAME} characters, got {len(name)}")
    if not _NAME.fullmatch(name):
        raise InvalidName(
            f"volume name {name!r} may hold only letters, digits, '.', '_' and '-' "
            "and must start with a letter or digit"
        )
    return name


def check_sha256(digest: str) -> str:
    """Return `digest` if it is 64 lowercase hex digits; raise InvalidName otherwise."""
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
        raise InvalidName(f"image id {digest!r} is not a sha256 (64 lowercase hex digits)")
    return digest


def contained(directory: Path, name: str) -> Path:
    """`directory / name`, after checking that it resolves to an entry of `directory`.

    A symlink at `name` pointing elsewhere (or a name that escapes) raises InvalidName.
    """
    path = directory / name
    resolved = path.resolve()
    if resolved.parent != directory.resolve() or resolved.name != name:
        raise InvalidName(f"{name!r} resolves outside {directory} (to {resolved})")
    return path
