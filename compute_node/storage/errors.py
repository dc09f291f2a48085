"""The one error type of the storage file layer, with a code a caller can branch on.

Every refusal leaves the pool as it was: nothing half-created, no temp file left behind.
"""

from __future__ import annotations

from typing import Literal

Code = Literal[
    "invalid_name",
    "invalid_size",
    "no_space",
    "exists",
    "not_found",
    "busy",
    "shrink_refused",
    "truncated",
    "checksum_mismatch",
    "bad_image",
    "io_error",
]


class StorageError(Exception):
    """A storage operation was refused or failed; `code` says which kind, the message why."""

    code: Code = "io_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidName(StorageError):
    code: Code = "invalid_name"


class InvalidSize(StorageError):
    code: Code = "invalid_size"


class NoSpace(StorageError):
    code: Code = "no_space"


class AlreadyExists(StorageError):
    code: Code = "exists"


class NotFound(StorageError):
    code: Code = "not_found"


class Busy(StorageError):
    """Another process holds the volume's lock (a VMM writing it, a reader, another op)."""

    code: Code = "busy"


class ShrinkRefused(StorageError):
    code: Code = "shrink_refused"


class Truncated(StorageError):
    """An upload ended before (or went past) the size it announced."""

    code: Code = "truncated"


class ChecksumMismatch(StorageError):
    code: Code = "checksum_mismatch"


class BadImage(StorageError):
    """An image is not raw or qcow2, or is qcow2 with a backing or external data file."""

    code: Code = "bad_image"
