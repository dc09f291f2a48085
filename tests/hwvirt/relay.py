"""One TCP connection from the L1 to a port on the host's loopback, over stdin/stdout.

    python3 -S tests/hwvirt/relay.py PORT

QEMU's user-mode network runs it per connection the L1 opens to the forwarded address
(`guestfwd=...-cmd:`), with the connection on its stdin and stdout: the only way out of the L1,
and only to the host's 127.0.0.1. Standard library only; ends when either side closes.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys


def relay(port: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sel = selectors.DefaultSelector()
    sel.register(0, selectors.EVENT_READ, "in")
    sel.register(sock, selectors.EVENT_READ, "sock")
    while True:
        for key, _ in sel.select():
            if key.data == "in":
                data = os.read(0, 65536)
                if not data:
                    sock.shutdown(socket.SHUT_WR)
                    sel.unregister(0)
                    continue
                sock.sendall(data)
            else:
                data = sock.recv(65536)
                if not data:
                    return
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view) :]


if __name__ == "__main__":
    relay(int(sys.argv[1]))
