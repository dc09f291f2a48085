"""The migration target's first checks (native/migrate_stream.c), without KVM: a peer is
untrusted until its token matched, and even then every field is checked before use. A raw
socket plays the source against a real `MigrationListener` on loopback."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from native import migration

MAGIC = 0x5247494D4C544C46  # "FLTLMIGR"
CONFIG, ERROR = 1, 19
CONFIG_SIZE = 32 + 8 * 24  # struct fl_snap_config


def hello(token: bytes, *, magic: int = MAGIC, version: int = 2, flags: int = 0) -> bytes:
    return struct.pack("<QII", magic, version, flags) + token


def record(kind: int, payload: bytes, *, length: int | None = None) -> bytes:
    return struct.pack("<IIQ", kind, 0, len(payload) if length is None else length) + payload


def config(vcpus: int = 1, mem: int = 64 << 20) -> bytes:
    head = struct.pack("<IIQQII", vcpus, 0, mem, mem, 4096, 0)
    return head + bytes(CONFIG_SIZE - len(head))


def answer(address: tuple[str, int], data: bytes, *, timeout: float = 5) -> str:
    """Sends `data` as the source and returns the target's ERROR text."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        head = b""
        while len(head) < 16:
            chunk = sock.recv(16 - len(head))
            assert chunk, "the target closed without saying why"
            head += chunk
        kind, _, length = struct.unpack("<IIQ", head)
        assert kind == ERROR
        text = b""
        while len(text) < length:
            text += sock.recv(length - len(text))
        return text.decode()


@pytest.fixture
def listener() -> Iterator[tuple[migration.MigrationListener, bytes]]:
    token = migration.new_token()
    with migration.MigrationListener(token) as lis:
        yield lis, bytes.fromhex(token)


def test_nothing_before_the_token_is_trusted(
    listener: tuple[migration.MigrationListener, bytes],
) -> None:
    lis, token = listener
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            lis.accept(timeout=20)
        except migration.MigrationError as exc:
            failures.append(exc)

    server = threading.Thread(target=serve)
    server.start()
    assert "bad magic" in answer(lis.address, b"GET / HTTP/1.0\r\n\r\n" + bytes(30))
    # A version this VMM does not speak (a newer release's) is refused, the range named.
    assert "version 3" in answer(lis.address, hello(token, version=3))
    assert "version 0" in answer(lis.address, hello(token, version=0))
    assert "wrong migration token" in answer(lis.address, hello(bytes(32)))
    assert "unknown migration flags" in answer(lis.address, hello(token, flags=0x80))
    assert not lis.spent
    # The right token, then a config record that lies about its length: refused before
    # anything is built, and the token is spent.
    why = answer(lis.address, hello(token) + record(CONFIG, config(), length=1 << 40))
    assert "record type 1" in why
    server.join(10)
    assert lis.spent
    assert len(failures) == 1
    assert "record type 1" in str(failures[0])
    assert lis.refused == [
        "not a migration stream (bad magic)",
        "migration stream version 3, this VMM speaks versions 1 to 2",
        "migration stream version 0, this VMM speaks versions 1 to 2",
        "wrong migration token",
        "unknown migration flags 0x80",
    ]


@pytest.mark.parametrize(
    ("cfg", "why"),
    [
        (config(vcpus=0), "0 vCPUs"),
        (config(vcpus=65), "65 vCPUs"),
        (config(mem=(64 << 20) + 1), "memory layout"),
        (config(mem=1 << 50), "memory layout"),
    ],
)
def test_a_config_out_of_range_is_refused_and_spends_the_token(
    listener: tuple[migration.MigrationListener, bytes], cfg: bytes, why: str
) -> None:
    lis, token = listener
    result: list[str] = []

    def serve() -> None:
        with pytest.raises(migration.MigrationError) as exc:
            lis.accept(timeout=20)
        result.append(str(exc.value))

    server = threading.Thread(target=serve)
    server.start()
    assert why in answer(lis.address, hello(token) + record(CONFIG, cfg))
    server.join(10)
    assert result
    assert why in result[0]
    # A replay of the spent token is refused, whatever follows it.
    stop = threading.Event()
    replays = threading.Thread(target=lis.refuse_replays, args=(stop,))
    replays.start()
    try:
        assert "already used" in answer(lis.address, hello(token) + record(CONFIG, config()))
    finally:
        stop.set()
        replays.join(5)


def test_a_malformed_token_is_refused_before_anything_listens() -> None:
    with pytest.raises(ValueError, match="hex digits"):
        migration.MigrationListener("abc")
    with pytest.raises(ValueError, match="hex digits"):
        migration.MigrationListener("00" * 31)


def test_a_silent_peer_does_not_hold_the_listener(
    listener: tuple[migration.MigrationListener, bytes],
) -> None:
    """A connection that never sends its hello is dropped after a few seconds, not held
    for the whole accept timeout while the real source waits behind it."""
    lis, token = listener
    done = threading.Event()

    def serve() -> None:
        try:
            lis.accept(timeout=60)
        except migration.MigrationError:
            pass
        done.set()

    server = threading.Thread(target=serve)
    server.start()
    silent = socket.create_connection(lis.address, timeout=5)
    try:
        start = time.monotonic()
        # The next peer is served once the silent one has been given up on.
        assert "wrong migration token" in answer(lis.address, hello(bytes(32)), timeout=30)
        assert time.monotonic() - start < 15
        assert lis.refused[0] == "reading the hello: timed out"
        why = answer(lis.address, hello(token) + record(CONFIG, config(vcpus=0)))
        assert "0 vCPUs" in why
    finally:
        silent.close()
        server.join(10)
    assert done.is_set()
