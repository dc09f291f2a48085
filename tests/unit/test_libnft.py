"""compute_node.net.libnft's guard: a kernel without nf_tables netlink is an exception, not
the exit(3) libnftables calls when it cannot open its socket."""

from __future__ import annotations

import errno
import socket

import pytest

from compute_node.net import libnft


def test_no_netfilter_netlink_is_a_clear_error_before_libnftables_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[tuple[int, int, int]] = []

    def no_protocol(family: int, kind: int, proto: int) -> socket.socket:
        opened.append((family, kind, proto))
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    class Library:
        def nft_ctx_new(self, _flags: int) -> int:
            raise AssertionError("libnftables was asked for a context")

    monkeypatch.setattr(socket, "socket", no_protocol)
    monkeypatch.setattr(libnft, "_lib", Library())
    with pytest.raises(libnft.NftUnavailable, match="load nfnetlink and nf_tables"):
        libnft.Nftables()
    assert opened == [(socket.AF_NETLINK, socket.SOCK_RAW, libnft.NETLINK_NETFILTER)]
