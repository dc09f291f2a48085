"""The catalog services' command lines (flotilla-network, flotilla-storage,
flotilla-scheduler): the flags each takes, and that a flag sets its setting over the
environment and the file."""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from services.network.config import NetworkConfig
from services.scheduler.config import SchedulerConfig
from services.service_main import ServiceCommand
from services.settings import ReplicaConfig
from services.storage.config import StorageConfig

Spec = dict[str, tuple[str, str | None, tuple[str, ...] | None]]
COMMON: Spec = {
    "--config": ("config", "Path", None),
    "--amqp-url": ("amqp_url", None, None),
    "--replica": ("replica", None, None),
    "--workers": ("workers", "int", None),
    "--log-level": ("log_level", None, None),
}
DATABASE: Spec = {"--database-url": ("database_url", None, None)}
FLAGS: dict[str, Spec] = {
    "services.network.main": COMMON | DATABASE,
    "services.storage.main": COMMON
    | DATABASE
    | {
        "--shared-pools": ("shared_pools", None, None),
        "--agent-hosts": ("agent_hosts", None, None),
        "--default-pool": ("default_pool", None, None),
    },
    "services.scheduler.main": COMMON
    | {
        "--weigher": ("weigher", None, ("spread", "pack")),
        "--top-n": ("top_n", "int", None),
        "--max-attempts": ("max_attempts", "int", None),
    },
}
PROGS = {
    "services.network.main": "flotilla-network",
    "services.storage.main": "flotilla-storage",
    "services.scheduler.main": "flotilla-scheduler",
}


def parser_of(module: ModuleType) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = module.build_parser()
    return parser


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_each_service_takes_the_flags_it_documents(name: str) -> None:
    parser = parser_of(importlib.import_module(name))
    assert parser.prog == PROGS[name]
    found = {
        action.option_strings[-1]: (
            action.dest,
            getattr(action.type, "__name__", None),
            None if action.choices is None else tuple(action.choices),
        )
        for action in parser._actions  # argparse keeps them nowhere public
        if action.dest != "help"
    }
    assert found == FLAGS[name]
    text = parser.format_help()
    for flag in FLAGS[name]:
        assert flag in text, flag
    assert "FLOTILLA_AMQP_URL" in text


SETTINGS: dict[str, type[ReplicaConfig]] = {
    "services.network.main": NetworkConfig,
    "services.storage.main": StorageConfig,
    "services.scheduler.main": SchedulerConfig,
}


@pytest.mark.parametrize("name", sorted(FLAGS))
def test_help_names_every_variable_the_settings_read(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for variable in SETTINGS[name].environment().values():
        assert variable in text, variable
    assert f"[{SETTINGS[name].TABLE}] table" in text


def test_the_environment_names_are_the_documented_ones() -> None:
    assert NetworkConfig.environment() == {
        "amqp_url": "FLOTILLA_AMQP_URL",
        "database_url": "FLOTILLA_NETWORK_DATABASE_URL",
        "replica": "FLOTILLA_NETWORK_REPLICA",
        "underlay_mtu": "FLOTILLA_NETWORK_UNDERLAY_MTU",
        "quarantine_s": "FLOTILLA_NETWORK_QUARANTINE_S",
        "workers": "FLOTILLA_NETWORK_WORKERS",
    }
    assert StorageConfig.environment()["transfer_listen"] == "FLOTILLA_STORAGE_TRANSFER_LISTEN"
    assert SchedulerConfig.environment()["filters"] == "FLOTILLA_SCHEDULER_FILTERS"
    for config in SETTINGS.values():
        assert config.environment()["amqp_url"] == "FLOTILLA_AMQP_URL"
        assert set(config.environment()) <= set(config.model_fields)


def test_a_flag_beats_the_environment_which_beats_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.storage.main import COMMAND

    path = tmp_path / "storage.toml"
    path.write_text('[storage]\nworkers = 2\ndefault_pool = "from-file"\nlease_s = 7.0\n')
    monkeypatch.setenv("FLOTILLA_STORAGE_WORKERS", "3")
    monkeypatch.setenv("FLOTILLA_STORAGE_DEFAULT_POOL", "from-env")
    args = COMMAND.parser().parse_args(
        ["--config", str(path), "--workers", "5", "--shared-pools", "p=/srv/p", "--log-level", "x"]
    )
    config = COMMAND.load(args)
    assert (config.workers, config.default_pool, config.lease_s) == (5, "from-env", 7.0)
    assert config.shared_pools == {"p": Path("/srv/p")}
    assert config.replica  # <host>-<pid> unless given


@dataclass
class _Runner:
    calls: list[str] = field(default_factory=list)

    def run_forever(self) -> None:
        self.calls.append("run")
        raise KeyboardInterrupt  # as a second ^C would


@dataclass
class _Replica:
    runner: _Runner = field(default_factory=_Runner)

    def stop(self) -> None:
        self.runner.calls.append("stop")


def test_main_serves_then_stops_the_replica_even_when_serving_fails() -> None:
    made: list[tuple[SchedulerConfig, _Replica]] = []

    def start(config: SchedulerConfig) -> _Replica:
        made.append((config, _Replica()))
        return made[-1][1]

    command = ServiceCommand("flotilla-x", "Run x.", SchedulerConfig, start)
    with pytest.raises(KeyboardInterrupt):
        command.main(["--replica", "r1", "--workers", "3"])
    ((config, replica),) = made
    assert (config.replica, config.workers) == ("r1", 3)
    assert replica.runner.calls == ["run", "stop"]
