"""`flotilla up` gives its compute node the host's default-route link as the NAT uplink."""

from __future__ import annotations

from pathlib import Path

from services.cli.stack import default_route_device

HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def table(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "route"
    path.write_text(HEADER + "".join(r + "\n" for r in rows))
    return path


def test_the_default_route_with_the_lowest_metric_wins(tmp_path: Path) -> None:
    path = table(
        tmp_path,
        "eth1\t00000000\t0102A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0",
        "eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0",
        "eth2\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
    )
    assert default_route_device(path) == "eth0"


def test_no_default_route_or_no_table_gives_none(tmp_path: Path) -> None:
    # A subnet route only, and a default route that is down (flags without RTF_UP).
    path = table(
        tmp_path,
        "eth2\t0002A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
        "eth3\t00000000\t0102A8C0\t0002\t0\t0\t0\t00000000\t0\t0\t0",
    )
    assert default_route_device(path) is None
    assert default_route_device(tmp_path / "missing") is None
