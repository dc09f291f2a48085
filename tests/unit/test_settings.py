"""Layered settings: file, then environment, then flags; TOML or YAML; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from compute_node.config import ComputeConfig
from services.scheduler.config import SchedulerConfig


def test_flags_beat_environment_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "compute.toml"
    path.write_text('[compute]\nhost = "from-file"\ncpu_allocation_ratio = 2.0\n')
    assert ComputeConfig.load(path).host == "from-file"
    monkeypatch.setenv("FLOTILLA_HOST", "from-env")
    config = ComputeConfig.load(path, host=None)
    assert (config.host, config.cpu_allocation_ratio) == ("from-env", 2.0)
    assert ComputeConfig.load(path, host="from-flag").host == "from-flag"


def test_yaml_files_and_the_shared_broker_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "scheduler.yaml"
    path.write_text("scheduler:\n  top_n: 4\n")
    monkeypatch.setenv("FLOTILLA_AMQP_URL", "amqp://x@h/v")
    config = SchedulerConfig.load(path)
    assert (config.top_n, config.amqp_url) == (4, "amqp://x@h/v")


def test_a_file_that_is_not_a_table_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a table"):
        ComputeConfig.load(path)


def test_vmm_spawn_timeout_reaches_the_kvm_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compute_node.kvm import KvmDriver
    from compute_node.node import make_driver

    monkeypatch.setenv("FLOTILLA_VMM_SPAWN_TIMEOUT_S", "240")
    config = ComputeConfig.load(None, state_dir=tmp_path)
    assert config.vmm_spawn_timeout_s == 240
    driver = make_driver(config)
    assert isinstance(driver, KvmDriver)
    assert driver.spawn_timeout == 240
    driver.close()
    monkeypatch.setenv("FLOTILLA_VMM_SPAWN_TIMEOUT_S", "0")
    with pytest.raises(ValueError, match="vmm_spawn_timeout_s"):
        ComputeConfig.load(None, state_dir=tmp_path)


def test_warm_vmms_reach_the_kvm_driver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from compute_node.kvm import KvmDriver
    from compute_node.node import make_driver

    assert ComputeConfig.load(None, state_dir=tmp_path).warm_vmms == 1
    monkeypatch.setenv("FLOTILLA_WARM_VMMS", "0")
    config = ComputeConfig.load(None, state_dir=tmp_path)
    driver = make_driver(config)
    assert isinstance(driver, KvmDriver)
    assert driver.warm.count == 0
    driver.close()
    assert ComputeConfig.load(None, state_dir=tmp_path, warm_vmms=2).warm_vmms == 2
    monkeypatch.setenv("FLOTILLA_WARM_VMMS", "-1")
    with pytest.raises(ValueError, match="warm_vmms"):
        ComputeConfig.load(None, state_dir=tmp_path)


def test_dnsmasq_files_go_under_the_configured_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from compute_node.networks import HostNetworks, NetSettings

    assert ComputeConfig.load(None).net_dnsmasq_dir == Path("/run/flotilla/dnsmasq")
    monkeypatch.setenv("FLOTILLA_NET_DNSMASQ_DIR", str(tmp_path / "run"))
    config = ComputeConfig.load(None, host="h1", state_dir=tmp_path / "state")
    assert config.net_dnsmasq_dir == tmp_path / "run"
    networks = HostNetworks("h1", tmp_path / "state", NetSettings(dnsmasq_dir=tmp_path / "run"))
    assert networks.dnsmasq_dir.parent == tmp_path / "run"
    assert networks.dnsmasq_dir.name.startswith("h1-")
    monkeypatch.setenv("FLOTILLA_NET_DNSMASQ_DIR", "run/dnsmasq")
    with pytest.raises(ValueError, match="net_dnsmasq_dir: run/dnsmasq is not an absolute path"):
        ComputeConfig.load(None)


def test_a_wildcard_migration_listen_address_is_refused() -> None:
    """The migration address is what the sources connect to (the endpoint names it): a
    wildcard would send every source to its own host."""
    with pytest.raises(ValueError, match="migration_listen"):
        ComputeConfig.model_validate({"migration_listen": "0.0.0.0"})
    config = ComputeConfig.model_validate({"migration_listen": "10.0.0.2"})
    assert config.migration_address() == "10.0.0.2"
