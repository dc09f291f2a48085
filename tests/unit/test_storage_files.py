"""Pure logic of the storage file layer: names, sizes, streams (compute_node/storage).
The file-system behaviour is in tests/integration/test_storage_files.py."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from compute_node.storage import InvalidName, InvalidSize, Truncated, check_size
from compute_node.storage.formats import sniff
from compute_node.storage.names import check_name, check_sha256, contained
from compute_node.storage.volumes import MAX_VOLUME_BYTES, write_stream


@pytest.mark.parametrize("name", ["vol-1", "0b5e7f2c-5a4e-4d1c-9f57-1d2c3b4a5e6f", "disk.0", "a"])
def test_ids_are_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../x", "'/'"),
        ("a/b", "'/'"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("a\0b", "NUL"),
        ("", "1-128"),
        ("x" * 129, "1-128"),
        (".hidden", "start with"),
        ("-rf", "start with"),
        ("a b", "only letters"),
    ],
)
def test_bad_names_say_why(name: str, why: str) -> None:
    with pytest.raises(InvalidName, match=why):
        check_name(name)


@given(st.text(max_size=40))
def test_a_valid_name_never_leaves_its_directory(name: str) -> None:
    try:
        check_name(name)
    except InvalidName:
        return
    assert "/" not in name
    assert "\0" not in name
    assert name not in (".", "..")


def test_sha256_ids() -> None:
    digest = hashlib.sha256(b"").hexdigest()
    assert check_sha256(digest) == digest
    for bad in (digest.upper(), digest[:-1], "../" + digest[3:], digest + "\0"):
        with pytest.raises(InvalidName):
            check_sha256(bad)


def test_contained_refuses_a_symlink_out(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "link").symlink_to(tmp_path)
    assert contained(tmp_path / "d", "plain") == tmp_path / "d" / "plain"
    with pytest.raises(InvalidName, match="outside"):
        contained(tmp_path / "d", "link")


@pytest.mark.parametrize(
    "size", [0, -512, 511, 1000, True, 1.5, "4096", None, MAX_VOLUME_BYTES + 512]
)
def test_bad_sizes(size: object) -> None:
    with pytest.raises(InvalidSize):
        check_size(size)


def test_good_sizes() -> None:
    assert check_size(512) == 512
    assert check_size(MAX_VOLUME_BYTES) == MAX_VOLUME_BYTES


def _write(tmp_path: Path, source: object, size: int | None) -> tuple[bytes, str]:
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        digest = write_stream(fd, source, size, None, "test")  # type: ignore[arg-type]
    finally:
        os.close(fd)
    return path.read_bytes(), digest.sha256


@given(st.lists(st.binary(max_size=3000), max_size=8))
def test_write_stream_writes_and_hashes_what_it_reads(chunks: list[bytes]) -> None:
    import tempfile

    data = b"".join(chunks)
    with tempfile.TemporaryDirectory() as tmp:
        written, sha = _write(Path(tmp), iter(chunks), len(data))
    assert written == data
    assert sha == hashlib.sha256(data).hexdigest()


def test_write_stream_leaves_zero_chunks_as_holes(tmp_path: Path) -> None:
    data = b"a" * (1 << 20) + bytes(8 << 20) + b"z" * (1 << 20)
    written, sha = _write(tmp_path, io.BytesIO(data), len(data))
    assert written == data
    assert sha == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "out").stat().st_blocks * 512 < 4 << 20


@pytest.mark.parametrize(("data", "size"), [(b"x" * 100, 200), (b"x" * 300, 200)])
def test_write_stream_refuses_a_stream_of_another_length(
    tmp_path: Path, data: bytes, size: int
) -> None:
    with pytest.raises(Truncated):
        _write(tmp_path, io.BytesIO(data), size)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"QFI\xfb\x00\x00\x00\x03" + bytes(100), "qcow2"),
        (b"QFI\xfb\x00\x00\x00\x01" + bytes(100), "qcow"),
        (b"KDMV" + bytes(100), "vmdk"),
        (b'# Disk DescriptorFile\nRW 8 FLAT "/etc/shadow" 0\n', "vmdk"),
        (b"vhdxfile" + bytes(100), "vhdx"),
        (b"LUKS\xba\xbe" + bytes(100), "luks"),
        (bytes(64) + b"\x7f\x10\xda\xbe" + bytes(100), "vdi"),
        (b"\xeb\x63\x90" + bytes(509) + b"\x55\xaa", "raw"),  # an MBR boot sector
        (b"QF", "raw"),
        (b"", "raw"),
    ],
)
def test_the_format_comes_from_the_header(tmp_path: Path, head: bytes, fmt: str) -> None:
    path = tmp_path / "image"
    path.write_bytes(head)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert sniff(fd) == fmt
    finally:
        os.close(fd)
