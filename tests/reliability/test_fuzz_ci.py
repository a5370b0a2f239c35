"""CI fuzz run: the protocol and NVMe commands, fixed seeds, a few thousand inputs each,
against an ``emulator serve`` child with two controllers (one attacked, one watched).

``scripts/soak`` runs the same fuzzers (and kills, and disk-full cycles) for longer.
"""
from __future__ import annotations

import socket
from typing import Iterator

import pytest

from emulator.reliability.fuzz import command_fuzz, protocol_fuzz, server_answers
from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient
from emulator.reliability.target import Target


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    t = Target().start()
    yield t
    t.cleanup()


# 2082: a lying header (one byte more than sent) followed by a DEVICE_RESET; the fuzzer used to
# wait for a reply the server could not give (it waits for the rest of the message, as it must).
@pytest.mark.parametrize("seed", [1, 2, 2082])
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


def test_lying_header_holds_only_its_connection(target: Target) -> None:
    """A header announcing one byte more than the message has: the server takes the first byte
    of the next header and waits for the rest.  That stalls this connection only (the other
    controller keeps serving) and ends when the client stops sending: the server closes it and
    serves the next client."""
    with VfioUserClient(target.sockets[0], timeout=1.0) as c:
        c.negotiate()
        data = (0x1234).to_bytes(4, "little")
        body = p.REGION_ACCESS.pack(0x14, 0, len(data)) + data
        c.send_raw(p.HEADER.pack(1, p.Command.REGION_WRITE, p.HEADER_SIZE + len(body) + 1, p.TYPE_COMMAND, 0)
                   + body)
        c.send_raw(p.HEADER.pack(2, p.Command.DEVICE_RESET, p.HEADER_SIZE, p.TYPE_COMMAND, 0))
        reply = c.recv_raw()  # the write is refused: its data has one byte too many
        assert reply is not None and reply.msg_id == 1 and reply.is_error
        with pytest.raises(TimeoutError):
            c.recv_raw()  # the server cannot know where the reset begins
        assert server_answers(target.sockets[1])
        c.sock.shutdown(socket.SHUT_WR)
        c.sock.settimeout(10.0)
        while (reply := c.recv_raw()) is not None:  # the end of the stream mid-message: dropped
            assert reply.is_error
    assert server_answers(target.sockets[0])
