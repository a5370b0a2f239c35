"""CI fuzz run: the protocol and NVMe commands, fixed seeds, a few thousand inputs each,
against an ``emulator serve`` child with two controllers (one attacked, one watched).

``scripts/soak`` runs the same fuzzers (and kills, and disk-full cycles) for longer.
"""
from __future__ import annotations

from typing import Iterator

import pytest

from emulator.reliability.fuzz import command_fuzz, protocol_fuzz, server_answers
from emulator.reliability.target import Target


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    t = Target().start()
    yield t
    t.stop()


@pytest.mark.parametrize("seed", [1, 2])
def test_protocol_fuzz(target: Target, seed: int) -> None:
    fds = target.fds()
    stats = protocol_fuzz(target.sockets[0], seed, 2000)
    assert stats.failures == [], target.log_tail()
    assert target.alive() and server_answers(target.sockets[0]) and server_answers(target.sockets[1])
    assert target.fds() <= fds + 4  # nothing a client sent is kept after it left
    assert stats.replies > 1000 and stats.drops  # both paths were exercised


@pytest.mark.parametrize("seed", [3])
def test_command_fuzz(target: Target, seed: int) -> None:
    stats = command_fuzz(target.sockets[0], seed, 3000, other=target.sockets[1])
    assert stats.failures == [], target.log_tail()
    assert target.alive() and server_answers(target.sockets[0])
    assert stats.statuses.get("0/00", 0) > 50  # some commands succeeded, not only refusals
