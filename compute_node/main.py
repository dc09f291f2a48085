"""`flotilla-compute`: the compute node of one host."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compute_node.config import ComputeConfig
from compute_node.node import ComputeNode
from services import log


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flotilla-compute",
        description=(
            "Run the compute node: consume compute.<host>, run guests, publish domain events. "
            "Settings come from --config (TOML, [compute] table), then FLOTILLA_* environment "
            "variables (FLOTILLA_HOST, FLOTILLA_STATE_DIR, FLOTILLA_AMQP_URL, FLOTILLA_DRIVER, "
            "FLOTILLA_CPU_ALLOCATION_RATIO, FLOTILLA_RAM_ALLOCATION_RATIO, "
            "FLOTILLA_RESERVED_HOST_MEMORY_MIB, FLOTILLA_HEARTBEAT_INTERVAL_S, "
            "FLOTILLA_CONSOLE_LISTEN, FLOTILLA_CONSOLE_ADVERTISE, FLOTILLA_MIGRATION_LISTEN, "
            "FLOTILLA_ALLOWED_BOOT_DIRS, "
            "FLOTILLA_POOLS, FLOTILLA_NET_NETNS, FLOTILLA_NET_UPLINK, FLOTILLA_NET_UNDERLAY, "
            "FLOTILLA_NET_UNDERLAY_DEVICE, FLOTILLA_NET_DNSMASQ_DIR, FLOTILLA_NET_LINGER_S), "
            "then flags."
        ),
    )
    parser.add_argument("--config", type=Path, help="TOML file")
    parser.add_argument("--host", help="host name (queue compute.<host>)")
    parser.add_argument("--state-dir", type=Path, help="where definitions and guests live")
    parser.add_argument("--amqp-url", help="broker URL, or one per cluster node, comma-separated")
    parser.add_argument("--driver", choices=["kvm", "fake"], help="hypervisor driver")
    parser.add_argument("--cpu-allocation-ratio", type=float, help="vCPU overcommit (4.0)")
    parser.add_argument("--ram-allocation-ratio", type=float, help="RAM overcommit (1.0)")
    parser.add_argument("--reserved-host-memory-mib", type=int, help="RAM kept for the host (512)")
    parser.add_argument("--heartbeat-interval-s", type=float, help="heartbeat period (2.0)")
    parser.add_argument(
        "--vmm-spawn-timeout-s", type=float, help="seconds a new VMM may take to answer (10.0)"
    )
    parser.add_argument(
        "--warm-vmms", type=int, help="spare VMM processes kept ready, 0 for none (1)"
    )
    parser.add_argument(
        "--console-listen", help="console relay address; firewall its port (127.0.0.1)"
    )
    parser.add_argument("--console-advertise", help="address console tickets name")
    parser.add_argument(
        "--migration-listen", help="IPv4 address incoming migrations stream to (console's)"
    )
    parser.add_argument(
        "--max-concurrent-migrations",
        type=int,
        help="migrations leaving this host at once, more wait queued; 0 for no limit (1)",
    )
    parser.add_argument(
        "--allowed-boot-dir",
        action="append",
        type=Path,
        help="where members may boot from (repeat; default: the test guest, the image cache)",
    )
    parser.add_argument("--log-level", default=None, help="debug, info, warning (info)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    log.configure(args.log_level)
    config = ComputeConfig.load(
        args.config,
        host=args.host,
        state_dir=args.state_dir,
        amqp_url=args.amqp_url,
        driver=args.driver,
        cpu_allocation_ratio=args.cpu_allocation_ratio,
        ram_allocation_ratio=args.ram_allocation_ratio,
        reserved_host_memory_mib=args.reserved_host_memory_mib,
        heartbeat_interval_s=args.heartbeat_interval_s,
        vmm_spawn_timeout_s=args.vmm_spawn_timeout_s,
        warm_vmms=args.warm_vmms,
        console_listen=args.console_listen,
        console_advertise=args.console_advertise,
        migration_listen=args.migration_listen,
        max_concurrent_migrations=args.max_concurrent_migrations,
        allowed_boot_dirs=args.allowed_boot_dir,
    )
    node = ComputeNode(config).start()
    try:
        node.runner.run_forever()
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
