"""`flotilla` refuses bad arguments and spec files with a clear message and exit 2, before it
talks to any API (the API URL here is a closed loopback port)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli.client import Exit
from services.cli.domains import spec_from_args
from services.cli.main import build_parser, main

NOWHERE = ["--api", "http://127.0.0.1:9", "--token", "t"]


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == Exit.USAGE
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["events", "--count", "-1"], "argument --count: must be 1 or more, not -1"),
        (["events", "--count", "x"], "argument --count: not a whole number: 'x'"),
        (["start", "d", "--timeout", "-1"], "argument --timeout: must be more than 0 seconds"),
        (["--timeout", "-1", "start", "d"], "argument --timeout: must be more than 0 seconds"),
        (["start", "d", "--timeout", "nan"], "argument --timeout: must be more than 0 seconds"),
        (["console", "d", "--bytes", "0"], "argument --bytes: must be 1 or more, not 0"),
        (["create", "--name", "n", "--vcpus", "0"], "argument --vcpus: must be 1 or more"),
        (["up", "--timeout", "0"], "argument --timeout: must be more than 0 seconds"),
        (["vol-create", "v", "ten"], "argument size: not a size: 'ten'"),
        (["vol-create", "v", "0G"], "argument size: a size is more than 0"),
        (["vol-resize", "v", "1X"], "argument size: not a size: '1X'"),
    ],
)
def test_bad_numbers_are_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error([*NOWHERE, *argv], capsys)


def test_a_timeout_may_come_before_or_after_the_verb() -> None:
    parser = build_parser()
    assert parser.parse_args(["--timeout", "5", "start", "d"]).timeout == 5.0
    assert parser.parse_args(["start", "d", "--timeout", "7"]).timeout == 7.0
    assert not hasattr(parser.parse_args(["start", "d"]), "timeout")  # the Session's default


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x7fELF\x02\x01\x01\x00\xff\xfe", "not UTF-8 text (byte 8): is it a spec?"),
        (b"- a\n- b\n", "expected a mapping at the top level"),
        (b"name: [unclosed\n", "not valid YAML/JSON"),
        (b"x" * (4 * 1024 * 1024 + 1), "larger than 4194304 bytes"),
    ],
    ids=["binary", "a-list", "bad-yaml", "huge"],
)
def test_a_spec_file_that_is_not_a_spec_is_a_usage_error(
    tmp_path: Path, content: bytes, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content)
    assert main([*NOWHERE, "create", "-f", str(spec)]) == Exit.USAGE
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_sizes_take_binary_units() -> None:
    from services.cli.volumes import parse_size

    assert parse_size("1048576") == 1 << 20
    assert parse_size("512M") == 512 << 20
    assert parse_size("10G") == 10 << 30
    assert parse_size("2GiB") == 2 << 30
    assert parse_size("1t") == 1 << 40


def test_create_boots_by_image_names(tmp_path: Path) -> None:
    """`--image`/`--initrd-image` name the boot images; a flag replaces the spec file's
    source of the same role, a path or an image."""
    spec = tmp_path / "spec.json"
    spec.write_text('{"name": "g", "boot": {"kernel": "/k", "initrd": "/i", "cmdline": "x"}}')
    args = build_parser().parse_args(
        ["create", "-f", str(spec), "--image", "kern", "--initrd-image", "rd"]
    )
    assert spec_from_args(args)["boot"] == {"image": "kern", "initrd_image": "rd", "cmdline": "x"}
    again = build_parser().parse_args(["create", "-f", str(spec), "--initrd-image", "rd"])
    assert spec_from_args(again)["boot"] == {"kernel": "/k", "initrd_image": "rd", "cmdline": "x"}


def test_create_refuses_two_kernels(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error([*NOWHERE, "create", "--name", "g", "--kernel", "/k", "--image", "i"], capsys)
    assert "not allowed with argument" in err
