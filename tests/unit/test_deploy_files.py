"""The deploy files refer only to things that exist and say only what the programs accept:
every file a Dockerfile copies or compose mounts, every command's flags (parsed by the
program's own parser), every FLOTILLA_* variable (one its config reads), the API config compose
hands in (validated by the API's model), and a systemd unit for every service."""

from __future__ import annotations

import argparse
import configparser
import importlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from compute_node.config import ComputeConfig
from services.api.config import ApiConfig
from services.network.config import NetworkConfig
from services.scheduler.config import SchedulerConfig
from services.storage.config import StorageConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# The config model of each service program (the CLI `flotilla` is no service).
CONFIGS: dict[str, type[BaseModel]] = {
    "flotilla-api": ApiConfig,
    "flotilla-scheduler": SchedulerConfig,
    "flotilla-compute": ComputeConfig,
    "flotilla-network": NetworkConfig,
    "flotilla-storage": StorageConfig,
}
SERVICES = sorted(s for s in SCRIPTS if s != "flotilla")


def parser_of(script: str) -> argparse.ArgumentParser:
    module = importlib.import_module(SCRIPTS[script].split(":", 1)[0])
    parser: argparse.ArgumentParser = module.build_parser()
    return parser


def check_command(argv: list[str], where: str) -> str:
    """The program's name, after checking it is ours and accepts its arguments."""
    program = Path(argv[0]).name
    assert program in SCRIPTS, f"{where}: {program} is not a console script of the package"
    try:
        parser_of(program).parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{where}: {program} refuses its arguments {argv[1:]}")
    return program


def substituted(text: str) -> str:
    """Compose's `${VAR}`, `${VAR:?message}` and `${VAR:-default}` with a stand-in value."""
    return re.sub(r"\$\{([A-Z0-9_]+)(:[?-][^}]*)?\}", "stand-in-value", text)


def environment_of(config: type[BaseModel]) -> set[str]:
    variables: dict[str, str] = config.environment()  # type: ignore[attr-defined]
    return set(variables.values())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(substituted((DEPLOY / "compose.yaml").read_text()))
    return data


def test_compose_builds_from_files_that_exist(compose: dict[str, Any]) -> None:
    built = 0
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"
        build = service.get("build")
        if build is None:
            continue
        built += 1
        context = (DEPLOY / build["context"]).resolve()
        assert (context / build["dockerfile"]).is_file(), name
    assert built >= 4


def test_compose_commands_flags_and_variables_are_what_the_programs_read(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    seen = set()
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        program = check_command(shlex.split(service["command"]), f"compose {name}")
        seen.add(program)
        known = environment_of(CONFIGS[program])
        for variable in service.get("environment", {}):
            if variable.startswith("FLOTILLA_"):
                assert variable in known, f"compose {name}: {program} does not read {variable}"
        for mount in service.get("configs", []):
            content = compose["configs"][mount["source"]]["content"]
            path = tmp_path / Path(mount["target"]).name
            path.write_text(content)
            loaded = CONFIGS[program].load(path)  # type: ignore[attr-defined]
            assert isinstance(loaded, CONFIGS[program])
            assert f"--config {mount['target']}" in service["command"]
    assert seen == set(CONFIGS), f"services without a compose entry: {set(CONFIGS) - seen}"


def test_compose_runs_a_three_node_broker_cluster_every_service_uses(
    compose: dict[str, Any],
) -> None:
    brokers = sorted(n for n, s in compose["services"].items() if "rabbitmq" in s.get("image", ""))
    assert brokers == ["rabbitmq-1", "rabbitmq-2", "rabbitmq-3"]
    conf = (DEPLOY / "rabbitmq" / "rabbitmq.conf").read_text()
    for broker in brokers:
        assert f"rabbit@{broker}" in conf
        assert compose["services"][broker]["hostname"] == broker
    for name, service in compose["services"].items():
        url = service.get("environment", {}).get("FLOTILLA_AMQP_URL")
        if url is not None:
            hosts = [u.split("@", 1)[1].split(":", 1)[0] for u in url.split(",")]
            assert hosts == brokers, name


def test_dockerfile_copies_files_that_exist() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copies = [line.split()[1:-1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"


@pytest.mark.parametrize("program", SERVICES)
def test_every_service_has_a_systemd_unit_whose_command_parses(program: str) -> None:
    unit_path = DEPLOY / "systemd" / f"{program}.service"
    assert unit_path.is_file(), f"no unit for {program}"
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(unit_path.read_text())
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert check_command(argv, unit_path.name) == program
    assert unit["Install"]["WantedBy"] == "multi-user.target"
