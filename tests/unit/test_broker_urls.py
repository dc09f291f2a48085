"""Broker URL lists (services.bus.nodes): parsing, checking, and the order nodes are tried in."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from compute_node.config import ComputeConfig
from services.bus.nodes import NodeList, blocking_configure, split_urls

A = "amqp://u:p@127.0.0.1:5001/%2F"
B = "amqp://u:p@127.0.0.1:5002/%2F"
C = "amqps://u:p@127.0.0.1:5003/%2F"


def test_a_comma_separated_list_is_split_and_trimmed() -> None:
    assert split_urls(f" {A} ,{B},{C}") == [A, B, C]
    assert split_urls(A) == [A]


@pytest.mark.parametrize("value", ["", " , ", f"{A},", f"{A},http://u:secret@h/"])
def test_a_bad_list_is_refused_without_echoing_a_password(value: str) -> None:
    with pytest.raises(ValueError, match="broker URL") as info:
        split_urls(value)
    assert "secret" not in str(info.value)


def test_settings_take_and_check_a_list() -> None:
    assert ComputeConfig(amqp_url=f"{A}, {B}").amqp_url == f"{A},{B}"
    with pytest.raises(ValidationError, match="must start with amqp://"):
        ComputeConfig(amqp_url=f"{A},ftp://h")


def test_a_failed_node_sends_the_next_attempt_to_the_one_after_it() -> None:
    nodes = NodeList(f"{A},{B},{C}", blocking_configure("t"))
    assert [p.port for p in nodes.in_order()] == [5001, 5002, 5003]
    nodes.failed(nodes.first)
    assert [p.port for p in nodes.in_order()] == [5002, 5003, 5001]
    nodes.failed(nodes.params[2])  # wraps around
    assert nodes.first.port == 5001
    assert all(p.heartbeat == 0 and p.connection_attempts == 1 for p in nodes.params)
