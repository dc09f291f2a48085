"""`flotilla`: the command-line client. Verbs are added as the services behind them land."""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version


def package_version() -> str:
    try:
        return version("flotilla")
    except PackageNotFoundError:  # running from a source tree without `pip install -e .`
        return "0+unknown"


def cmd_version(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"version": package_version()}))
    else:
        print(f"flotilla {package_version()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flotilla", description="Flotilla: a private-cloud control plane for KVM."
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = sub.add_parser("version", help="print the version")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_version)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
