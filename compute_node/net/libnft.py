"""libnftables in-process through ctypes: JSON commands in, JSON listings out.

Debian ships the library as libnftables1; its own Python binding (python3-nftables) lives in
the system Python only, and our venv runs another interpreter, so this is the few calls we
need, bound directly: a context with JSON output, run a buffer, read the output and error
buffers. One `Nftables` is not thread-safe; use one per thread or guard it.
"""

from __future__ import annotations

import ctypes
import errno
import json
import socket
from typing import Any

from compute_node.net import netns

LIBRARY = "libnftables.so.1"
NETLINK_NETFILTER = 12
_OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON
_OUTPUT_HANDLE = 1 << 3  # NFT_CTX_OUTPUT_HANDLE


class NftError(RuntimeError):
    """nftables refused a command; the message is libnftables' own error text."""


class NftUnavailable(RuntimeError):
    """libnftables.so.1 cannot be loaded (Debian: apt-get install libnftables1), or the
    kernel has no nf_tables netlink (the nfnetlink and nf_tables modules)."""


def _check_netlink() -> None:
    """Raise NftUnavailable unless a netfilter netlink socket opens here. libnftables does
    not report that failure: it prints "Unable to initialize Netlink socket" and calls
    exit(3), ending the whole process (a compute node, a test run) with buffered output
    lost, so it is checked before libnftables is asked to open one."""
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER).close()
    except OSError as exc:
        hint = " (load nfnetlink and nf_tables)" if exc.errno == errno.EPROTONOSUPPORT else ""
        raise NftUnavailable(f"no nf_tables netlink in this kernel: {exc}{hint}") from exc


def _load() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError as exc:
        raise NftUnavailable(f"{LIBRARY}: {exc} (Debian: apt-get install libnftables1)") from exc
    lib.nft_ctx_new.restype = ctypes.c_void_p
    lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
    lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
    lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
    lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
    return lib


_lib: ctypes.CDLL | None = None


class Nftables:
    """A libnftables context acting in namespace `netns_name` (None: the caller's).

    libnftables opens its netlink socket in nft_ctx_new, and a socket stays in the namespace
    it was made in: the context is created inside the namespace, and every later call, from
    any thread, acts there without entering it again (setns costs ~0.15 ms a pair here)."""

    def __init__(self, netns_name: str | None = None) -> None:
        global _lib
        if _lib is None:
            _lib = _load()
        self._lib = _lib
        with netns.inside(netns_name):
            _check_netlink()
            ctx = self._lib.nft_ctx_new(0)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        self._lib.nft_ctx_output_set_flags(ctx, _OUTPUT_JSON | _OUTPUT_HANDLE)
        self._lib.nft_ctx_buffer_output(ctx)
        self._lib.nft_ctx_buffer_error(ctx)

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Nftables:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, commands: str) -> str:
        """Run nft commands (JSON or nft syntax) as one transaction; returns the output.

        Raises NftError with libnftables' message; nothing of a failed batch is applied."""
        if self._ctx is None:
            raise NftError("nftables context is closed")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
        err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if rc != 0:
            raise NftError(err.decode(errors="replace").strip() or f"nft failed ({rc})")
        return out.decode()

    def batch(self, commands: list[dict[str, Any]]) -> None:
        """Apply a list of JSON commands (`{"add": {...}}`, ...) atomically."""
        self.run(json.dumps({"nftables": commands}))

    def ruleset(self) -> list[dict[str, Any]]:
        """`list ruleset` as libnftables' JSON objects (metainfo dropped)."""
        text = self.run('{"nftables": [{"list": {"ruleset": null}}]}')
        if not text.strip():
            return []
        objects: list[dict[str, Any]] = json.loads(text)["nftables"]
        return [o for o in objects if "metainfo" not in o]
