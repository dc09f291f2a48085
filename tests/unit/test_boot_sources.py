"""The compute node's rule for host paths in specs, on the real file system (a temp dir): what a
member may boot, what an admin may, what each is told, and that the files opened are the files
checked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from compute_node.boot_sources import MEMBER_DISK_RULE, MEMBER_RULE, BootSources, SourceRefused
from compute_node.config import ComputeConfig
from protos.domain import BootSpec, DiskSpec, DomainSpec


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """allowed/ (kernel, initrd, a dir, a symlink out, a symlink in), secret (outside)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "kernel").write_bytes(b"KERNEL")
    (allowed / "initrd").write_bytes(b"INITRD")
    (allowed / "subdir").mkdir()
    (tmp_path / "secret").write_bytes(b"SECRET")
    (allowed / "out").symlink_to(tmp_path / "secret")
    (allowed / "alias").symlink_to(allowed / "kernel")
    (tmp_path / "link-to-allowed").symlink_to(allowed)
    return tmp_path


def spec(kernel: str, initrd: str | None = None, **kw: object) -> DomainSpec:
    return DomainSpec.model_validate(
        {"name": "g", "boot": BootSpec(kernel=kernel, initrd=initrd), **kw}
    )


def refused(sources: BootSources, s: DomainSpec, *, privileged: bool) -> SourceRefused:
    with pytest.raises(SourceRefused) as info:
        sources.open(s, privileged=privileged).close()
    return info.value


def read(fd_path: str) -> bytes:
    return Path(fd_path).read_bytes()


def test_a_member_boots_files_under_an_allowed_dir(tree: Path) -> None:
    sources = BootSources([tree / "allowed"])
    allowed = tree / "allowed"
    with sources.open(spec(str(allowed / "alias"), str(allowed / "initrd")), privileged=False) as f:
        assert f.kernel is not None
        assert f.initrd is not None
        assert (read(f.kernel.fd_path), read(f.initrd.fd_path)) == (b"KERNEL", b"INITRD")
        assert f.kernel.given == str(allowed / "alias")
        fds = f.fds()
    for fd in fds:  # closed with the context
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(fd)


def test_an_allowed_dir_named_through_a_symlink_is_resolved(tree: Path) -> None:
    sources = BootSources([tree / "link-to-allowed"])
    with sources.open(spec(str(tree / "allowed" / "kernel")), privileged=False) as f:
        assert f.kernel is not None
        assert read(f.kernel.fd_path) == b"KERNEL"
    with sources.open(spec(str(tree / "link-to-allowed" / "kernel")), privileged=False) as f:
        assert f.kernel is not None
        assert read(f.kernel.fd_path) == b"KERNEL"


@pytest.mark.parametrize(
    ("field", "kernel", "initrd"),
    [
        ("boot.initrd", "allowed/kernel", "/etc/shadow"),
        ("boot.kernel", "/etc/shadow", None),
        ("boot.kernel", "secret", None),  # exists, outside
        ("boot.kernel", "missing", None),  # does not exist, outside
        ("boot.kernel", "allowed/missing", None),  # does not exist, inside
        ("boot.kernel", "allowed/subdir", None),  # not a file, inside
        ("boot.kernel", "allowed/out", None),  # a symlink inside pointing outside
        ("boot.kernel", "allowed/../secret", None),  # `..` out of the tree
        ("boot.kernel", "allowed/subdir/../../secret", None),
        ("boot.kernel", "allowed/../allowed/out", None),
        ("boot.initrd", "allowed/kernel", "allowed/../../../../etc/passwd"),
    ],
)
def test_a_member_is_told_the_rule_and_nothing_about_the_host(
    tree: Path, field: str, kernel: str, initrd: str | None
) -> None:
    sources = BootSources([tree / "allowed"])

    def absolute(p: str) -> str:
        return p if p.startswith("/") else f"{tree}/{p}"

    s = spec(absolute(kernel), absolute(initrd) if initrd else None)
    err = refused(sources, s, privileged=False)
    assert (err.code, err.field) == ("forbidden", field)
    assert err.message == f"{field}: {MEMBER_RULE}"  # the same whether it exists or not


def test_the_member_rule_holds_for_disk_paths(tree: Path) -> None:
    sources = BootSources([tree / "allowed"])
    s = spec(str(tree / "allowed" / "kernel"), disks=[DiskSpec(target="vda", path="/etc/shadow")])
    with pytest.raises(SourceRefused) as info:
        sources.check(s, privileged=False)
    assert (info.value.code, info.value.field) == ("forbidden", "disks.0.path")
    sources.check(s, privileged=True)


def test_a_members_path_disk_is_read_only_and_opened_so(tree: Path) -> None:
    """The allowed dirs hold kernels other guests boot: a member's guest never writes them."""
    sources = BootSources([tree / "allowed"])
    kernel = str(tree / "allowed" / "kernel")
    writable = spec(kernel, disks=[DiskSpec(target="vda", path=str(tree / "allowed" / "initrd"))])
    err = refused(sources, writable, privileged=False)
    assert (err.code, err.field) == ("forbidden", "disks.0.readonly")
    assert err.message == f"disks.0.readonly: {MEMBER_DISK_RULE}"
    with sources.open(writable, privileged=True) as files:  # an admin's may be writable
        (disk,) = files.disks
        assert (disk.target, disk.read_only) == ("vda", False)
        os.pwrite(disk.fd, b"I", 0)
    ro = spec(
        kernel,
        disks=[DiskSpec(target="vda", path=str(tree / "allowed" / "initrd"), readonly=True)],
    )
    with sources.open(ro, privileged=False) as files:
        (disk,) = files.disks
        assert disk.read_only
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.pwrite(disk.fd, b"X", 0)
        assert read(disk.fd_path) == b"INITRD"


@pytest.mark.parametrize("privileged", [False, True])
@pytest.mark.parametrize(
    ("kernel", "cmdline", "field", "reason"),
    [
        ("guest.elf", "", "boot.kernel", "must be an absolute path"),
        ("./allowed/kernel", "", "boot.kernel", "must be an absolute path"),
        ("/boot/x\0/etc/shadow", "", "boot.kernel", "must not contain a NUL byte"),
        ("ABS", "console=ttyS0\0rest", "boot.cmdline", "must not contain a NUL byte"),
    ],
)
def test_relative_paths_and_nul_bytes_are_invalid_for_everyone(
    tree: Path, privileged: bool, kernel: str, *, cmdline: str, field: str, reason: str
) -> None:
    sources = BootSources([tree / "allowed"])
    kernel = str(tree / "allowed" / "kernel") if kernel == "ABS" else kernel
    s = DomainSpec(name="g", boot=BootSpec(kernel=kernel, cmdline=cmdline))
    err = refused(sources, s, privileged=privileged)
    assert (err.code, err.field, err.message) == ("invalid", field, f"{field}: {reason}")


def test_an_admin_may_boot_any_absolute_path_and_is_told_what_is_wrong(tree: Path) -> None:
    sources = BootSources([tree / "allowed"])
    with sources.open(spec(str(tree / "allowed" / "out")), privileged=True) as f:
        assert f.kernel is not None
        assert read(f.kernel.fd_path) == b"SECRET"
    err = refused(sources, spec(str(tree / "missing")), privileged=True)
    assert (err.code, err.field) == ("invalid", "boot.kernel")
    assert err.message == f"boot.kernel: {tree}/missing: No such file or directory"
    err = refused(sources, spec(str(tree / "allowed" / "subdir")), privileged=True)
    assert err.message == f"boot.kernel: {tree}/allowed/subdir: not a regular file"


def test_the_file_opened_is_the_file_checked(tree: Path) -> None:
    """Swapping the file (or the name for a symlink) after the check changes nothing: the VMM
    reads the descriptor, not the path."""
    sources = BootSources([tree / "allowed"])
    kernel = tree / "allowed" / "kernel"
    with sources.open(spec(str(kernel)), privileged=False) as f:
        kernel.unlink()
        kernel.symlink_to(tree / "secret")
        assert f.kernel is not None
        assert read(f.kernel.fd_path) == b"KERNEL"
    # And the next start sees the symlink for what it is.
    err = refused(sources, spec(str(kernel)), privileged=False)
    assert err.code == "forbidden"


def test_a_fifo_under_an_allowed_dir_does_not_hang_the_node(tree: Path) -> None:
    os.mkfifo(tree / "allowed" / "fifo")
    sources = BootSources([tree / "allowed"])
    err = refused(sources, spec(str(tree / "allowed" / "fifo")), privileged=False)
    assert err.code == "forbidden"
    err = refused(sources, spec(str(tree / "allowed" / "fifo")), privileged=True)
    assert err.message.endswith("not a regular file")


def test_allowed_boot_dirs_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import native.testguest

    assert native.testguest.OUTPUT.parent in ComputeConfig().allowed_boot_dirs
    monkeypatch.setenv("FLOTILLA_ALLOWED_BOOT_DIRS", f"{tmp_path}/a:{tmp_path}/b")
    assert ComputeConfig.load().allowed_boot_dirs == [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(ValueError, match="not an absolute path"):
        ComputeConfig(allowed_boot_dirs=[Path("images")])
