"""`flotilla`: the command-line client of the Flotilla API, and `flotilla up`.

Verbs follow virsh (list, create, start, shutdown, destroy, reboot, suspend, resume, delete,
dominfo, console; pool-list, pool-info, vol-create, vol-list, vol-info, vol-delete, vol-resize,
vol-clone, vol-wipe, vol-upload, vol-download, image-import, image-list, image-delete,
attach-disk, detach-disk; migrate, migrate-setmaxdowntime, migrate-setspeed, domjobinfo,
domjobabort, evacuate) plus events, hosts, up and version. The API and token come from
--api/--token, else FLOTILLA_API_URL/FLOTILLA_TOKEN, else what `flotilla up` wrote to its
state dir. Exit codes are listed in services.cli.client.Exit and docs/cli.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from services.cli.client import Api, ApiError, Exit
from services.cli.domains import ACTIONS, CliError, Session
from services.version import package_version


def cmd_version(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"version": package_version()}))
    else:
        print(f"flotilla {package_version()}")
    return 0


def positive_int(text: str) -> int:
    """An argparse type: a whole number above zero (argparse says which option and exits 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options every verb takes, before or after the verb (a later one wins)."""
    default = None if top else argparse.SUPPRESS
    parser.add_argument("--api", metavar="URL", default=default, help="API URL (FLOTILLA_API_URL)")
    parser.add_argument("--token", default=default, help="bearer token (FLOTILLA_TOKEN)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=default,
        help="`flotilla up`'s state dir (default ~/.local/state/flotilla, root: /var/lib/flotilla)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="machine-readable output",
    )


def _wait_options(parser: argparse.ArgumentParser, default_timeout: float = 120.0) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--wait",
        dest="wait",
        action="store_true",
        default=True,
        help="wait for the resulting state, showing progress (default)",
    )
    group.add_argument("--no-wait", dest="wait", action="store_false", help="return at once")
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        # Unset here, so a --timeout given before the verb stands; Session's default applies.
        default=argparse.SUPPRESS,
        help=f"seconds to wait (default {default_timeout:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flotilla",
        description="Flotilla: a private-cloud control plane for KVM.",
        epilog="exit codes: 0 ok, 1 error, 2 usage or invalid request, 3 not found, "
        "4 conflict (state), 5 no capacity or API unavailable, 6 timeout, 7 denied or quota",
    )
    _common(parser, top=True)
    parser.add_argument(
        "--timeout",
        type=positive_seconds,
        default=argparse.SUPPRESS,
        help="seconds to wait, for the verbs that wait (may also follow the verb)",
    )
    common = argparse.ArgumentParser(add_help=False)
    _common(common, top=False)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_text: str, func: Callable[..., int]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, parents=[common], description=help_text)
        p.set_defaults(func=func)
        return p

    p = verb("version", "print the version", cmd_version)
    p.set_defaults(local=True)
    _domain_verbs(verb)
    _storage_verbs(verb)
    _other_verbs(verb)
    from services.cli.networks import add_verbs  # noqa: PLC0415

    add_verbs(verb)
    from services.cli import snapshots  # noqa: PLC0415

    snapshots.add_verbs(verb)
    from services.cli import migration  # noqa: PLC0415

    migration.add_verbs(verb)
    return parser


Verb = Callable[[str, str, Callable[..., int]], argparse.ArgumentParser]


def _domain_verbs(verb: Verb) -> None:
    from services.cli.domains import (  # noqa: PLC0415  (keeps `flotilla version` lean)
        cmd_action,
        cmd_console,
        cmd_create,
        cmd_delete,
        cmd_dominfo,
        cmd_list,
    )

    p = verb("list", "list domains", cmd_list)
    p.add_argument("--state", help="only domains in this power state")
    p.add_argument("--host", help="only domains on this host")
    p.add_argument("--name", help="only domains with this name")
    p.add_argument("--project", help="only this project's (admin; members see only theirs)")

    p = verb("create", "define a domain and start it (unless --no-start)", cmd_create)
    p.add_argument("-f", "--file", help="a spec in YAML or JSON (`-` for stdin); flags override")
    p.add_argument("--name")
    p.add_argument("--vcpus", type=positive_int)
    p.add_argument("--memory", type=positive_int, metavar="MIB")
    kernel = p.add_mutually_exclusive_group()
    kernel.add_argument("--kernel", help="kernel path on the compute host (PVH ELF or bzImage)")
    kernel.add_argument("--image", help="boot the kernel image of this name (boot.image)")
    initrd = p.add_mutually_exclusive_group()
    initrd.add_argument("--initrd", help="initrd path on the compute host (with --kernel)")
    initrd.add_argument(
        "--initrd-image", help="the initrd image of this name (with --image; boot.initrd_image)"
    )
    p.add_argument("--cmdline")
    p.add_argument("--group", help="server group for (anti-)affinity")
    pol = p.add_mutually_exclusive_group()
    pol.add_argument(
        "--anti-affinity",
        dest="affinity",
        action="store_const",
        const="anti-affinity",
        help="the group's members go to different hosts (the default policy)",
    )
    pol.add_argument(
        "--affinity",
        dest="affinity",
        action="store_const",
        const="affinity",
        help="the group's members share a host",
    )
    p.add_argument("--no-start", action="store_true", help="define only")
    _wait_options(p)

    for name, (action, _states, what, _done) in ACTIONS.items():
        p = verb(name, f"{action} a domain (waits until {what})", cmd_action)
        p.add_argument("domain", help="name or uuid")
        _wait_options(p)

    p = verb("delete", "destroy (if running) and remove a domain", cmd_delete)
    p.add_argument("domain", help="name or uuid")
    _wait_options(p)

    p = verb("dominfo", "show one domain", cmd_dominfo)
    p.add_argument("domain", help="name or uuid")

    p = verb("console", "the guest's recent console output, or attach with --follow", cmd_console)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("--bytes", type=positive_int, help="at most this many of the last bytes")
    p.add_argument(
        "--follow",
        action="store_true",
        help="attach over the API's WebSocket (interactive on a terminal; Ctrl-] detaches)",
    )
    p.add_argument("--read-only", action="store_true", help="with --follow: never send input")


def _storage_verbs(verb: Verb) -> None:
    from services.cli import volumes as v  # noqa: PLC0415

    verb("pool-list", "list storage pools", v.cmd_pool_list)
    p = verb("pool-info", "show one storage pool", v.cmd_pool_info)
    p.add_argument("pool")
    p = verb("vol-create", "create an empty volume", v.cmd_vol_create)
    p.add_argument("name")
    p.add_argument("size", type=v.parse_size, help="bytes, or with K/M/G/T: 10G")
    p.add_argument("--pool", help="the pool (default: the storage service's default)")
    p = verb("vol-list", "list volumes", v.cmd_vol_list)
    p.add_argument("--pool", help="only this pool's")
    for name, help_text, func in (
        ("vol-info", "show one volume", v.cmd_vol_info),
        ("vol-delete", "delete a volume and its data", v.cmd_vol_delete),
        ("vol-wipe", "make every byte of a volume read as zero", v.cmd_vol_wipe),
    ):
        p = verb(name, help_text, func)
        p.add_argument("volume", help="name or uuid")
    p = verb("vol-resize", "grow a volume", v.cmd_vol_resize)
    p.add_argument("volume", help="name or uuid")
    p.add_argument("size", type=v.parse_size, help="the new size: 20G")
    p = verb("vol-clone", "copy a volume (reflink where the pool has them)", v.cmd_vol_clone)
    p.add_argument("volume", help="name or uuid")
    p.add_argument("name", help="the new volume's name")
    p.add_argument("--size", type=v.parse_size, help="grow the copy to this size")
    _image_verbs(verb)
    p = verb("attach-disk", "attach a volume to a stopped domain", v.cmd_attach_disk)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("volume", help="name or uuid")
    p.add_argument("target", help="the disk's name in the guest: vdb")
    p.add_argument("--readonly", action="store_true")
    p = verb("detach-disk", "detach a disk from a stopped domain", v.cmd_detach_disk)
    p.add_argument("domain", help="name or uuid")
    p.add_argument("target", help="vdb")


def _image_verbs(verb: Verb) -> None:
    from services.cli import images as i  # noqa: PLC0415

    p = verb("image-import", "import a raw or qcow2 image (streamed)", i.cmd_image_import)
    p.add_argument("file", help="the image file (with --from-host: a path on the pool's host)")
    p.add_argument("name", help="the image's name in the project")
    p.add_argument("--kind", choices=("disk", "kernel", "initrd"), default="disk")
    p.add_argument("--public", action="store_true", help="every project may use it (admins)")
    p.add_argument("--format", choices=("raw", "qcow2"), help="refuse anything else")
    p.add_argument("--pool", help="the pool (default: the storage service's default)")
    p.add_argument(
        "--from-host", action="store_true", help="admins: FILE is on the pool's host, not here"
    )
    verb("image-list", "list the images the token may use", i.cmd_image_list)
    p = verb("vol-upload", "a new volume from a local file (streamed)", i.cmd_vol_upload)
    p.add_argument("file", help="its size is the volume's: a multiple of 512")
    p.add_argument("name", help="the new volume's name")
    p.add_argument("--pool", help="the pool (default: the storage service's default)")
    p = verb("vol-download", "a volume's bytes into a local file", i.cmd_vol_download)
    p.add_argument("volume", help="name or uuid")
    p.add_argument("file", help="written as FILE.part, renamed when complete")
    p = verb(
        "image-delete", "delete an image's name (its file goes with the last)", i.cmd_image_delete
    )
    p.add_argument("image", help="name or uuid")


def _other_verbs(verb: Verb) -> None:
    from services.cli.events import cmd_events  # noqa: PLC0415
    from services.cli.hosts import cmd_hosts  # noqa: PLC0415
    from services.cli.up import cmd_up, parse_listen  # noqa: PLC0415

    p = verb("events", "domain events (Server-Sent Events from the API)", cmd_events)
    p.add_argument("pattern", nargs="?", help="routing-key pattern, e.g. 'domain.started.*'")
    p.add_argument("--follow", action="store_true", help="keep streaming new events")
    p.add_argument("--since", help="resume after this event id")
    p.add_argument("--domain", help="only this domain's events (name or uuid)")
    p.add_argument("--count", type=positive_int, help="stop after this many events")

    p = verb("hosts", "list compute hosts, or enable/disable one (admin)", cmd_hosts)
    p.add_argument("action", nargs="?", choices=["list", "enable", "disable"], default="list")
    p.add_argument("host", nargs="?")
    p.add_argument("--reason", help="why (disable)")

    p = verb("up", "run the whole stack on this host until Ctrl-C", cmd_up)
    p.set_defaults(local=True)
    p.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 8780),
        metavar="HOST:PORT",
        help="where the API listens (default 127.0.0.1:8780)",
    )
    p.add_argument("--host", help="this compute node's host name (default: the machine's)")
    p.add_argument("--driver", choices=["kvm", "fake"], default="kvm")
    p.add_argument(
        "--keep-guests",
        action="store_true",
        help="on exit leave guests running for the next `flotilla up` to re-adopt",
    )
    p.add_argument(
        "--broker-nodes",
        type=_broker_nodes,
        default=1,
        metavar="N",
        help="private RabbitMQ nodes to cluster on loopback (default 1; 3 to try failover)",
    )
    p.add_argument(
        "--timeout",
        type=positive_seconds,
        default=argparse.SUPPRESS,
        help="seconds to wait for readiness (default 120)",
    )


def _broker_nodes(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= 7:
        raise argparse.ArgumentTypeError(f"expected a number of nodes from 1 to 7, got {value!r}")
    return n


def _session(args: argparse.Namespace) -> Session:
    from services.cli.stack import default_state_dir, read_cli_state  # noqa: PLC0415

    saved = read_cli_state(args.state_dir or default_state_dir())
    url = args.api or os.environ.get("FLOTILLA_API_URL") or saved.get("api_url")
    token = args.token or os.environ.get("FLOTILLA_TOKEN") or saved.get("token")
    if not url:
        raise CliError(
            "no API: give --api URL or FLOTILLA_API_URL, or start one with `flotilla up`",
            Exit.UNAVAILABLE,
        )
    return Session(
        api=Api(str(url), str(token) if token else None),
        json=args.json,
        wait=getattr(args, "wait", False),
        timeout=getattr(args, "timeout", 120.0),
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.verb == "hosts" and args.action in ("enable", "disable") and not args.host:
        parser.error(f"hosts {args.action} needs a HOST")
    try:
        if getattr(args, "local", False):
            result: int = args.func(args)
            return result
        session = _session(args)
        try:
            result = args.func(session, args)
        finally:
            session.api.close()
        return result
    except ApiError as exc:
        print(f"flotilla {args.verb}: {exc}", file=sys.stderr)
        return exc.exit_code
    except CliError as exc:
        print(f"flotilla {args.verb}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
