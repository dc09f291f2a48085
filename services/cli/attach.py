"""`flotilla console --follow`: the guest's serial console over the API's WebSocket.

Interactive on a terminal (raw mode, keys go to the guest, Ctrl-] detaches, as in virsh).
Off a terminal, standard input is sent as it comes (`printf 'ls\r' | flotilla console web
--follow`) and output is printed until the console closes or Ctrl-C; `--read-only` sends
nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import threading
import tty
from typing import Any

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from services.cli.client import Exit, problem_text
from services.cli.domains import CliError, Session

DETACH = b"\x1d"  # Ctrl-]


def ws_url(base_url: str, domain_id: str) -> str:
    scheme, _, rest = base_url.partition("://")
    ws_scheme = "wss" if scheme == "https" else "ws"
    return f"{ws_scheme}://{rest}/v1/domains/{domain_id}/console/attach"


def _pump_output(ws: ClientConnection, stop: threading.Event) -> None:
    out = sys.stdout.buffer
    try:
        for message in ws:
            data = message if isinstance(message, bytes) else message.encode()
            out.write(data)
            out.flush()
    except ConnectionClosed:
        pass
    finally:
        stop.set()


def attach(s: Session, d: dict[str, Any], *, read_only: bool) -> int:
    interactive = sys.stdin.isatty() and not read_only
    headers = {}
    auth = s.api.http.headers.get("Authorization")
    if auth:
        headers["Authorization"] = auth
    url = ws_url(s.api.base_url, str(d["id"]))
    try:
        ws = connect(url, additional_headers=headers, open_timeout=10, max_size=None)
    except InvalidStatus as exc:
        # The API answers a refused handshake with the HTTP status of its problem.
        status = exc.response.status_code
        code = {401: Exit.DENIED, 404: Exit.NOT_FOUND, 409: Exit.CONFLICT}
        raise CliError(
            f"cannot attach the console of {d.get('name')}: "
            f"{problem_text(status, bytes(exc.response.body or b''))}",
            code.get(status, Exit.UNAVAILABLE),
        ) from None
    except OSError as exc:
        raise CliError(f"cannot reach {url}: {exc}", Exit.UNAVAILABLE) from None
    stop = threading.Event()
    reader = threading.Thread(target=_pump_output, args=(ws, stop), daemon=True)
    with ws:
        if interactive:
            sys.stderr.write(f"Connected to {d.get('name')}; escape character is ^]\r\n")
        reader.start()
        try:
            if interactive:
                _keys_to_guest(ws, stop)
            elif not read_only:
                _stdin_to_guest(ws, stop)
                stop.wait()
            else:
                stop.wait()
        except KeyboardInterrupt:
            pass
    if interactive:
        sys.stderr.write("\r\n")
    return 0


def _keys_to_guest(ws: ClientConnection, stop: threading.Event) -> None:
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        while not stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.2)
            if not ready:
                continue
            data = os.read(fd, 1024)
            if not data or DETACH in data:
                head = data.split(DETACH, 1)[0]
                if head:
                    ws.send(head)
                return
            with contextlib.suppress(ConnectionClosed):
                ws.send(data)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _stdin_to_guest(ws: ClientConnection, stop: threading.Event) -> None:
    fd = sys.stdin.fileno()
    while not stop.is_set():
        data = os.read(fd, 4096)
        if not data:
            return
        try:
            ws.send(data)
        except ConnectionClosed:
            return
