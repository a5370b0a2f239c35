"""The server reads several queued messages per recvmsg, and a hand-over moves what it
read and did not handle yet (part of a message, and the fds that came with it)."""
from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

import pytest

from conftest import VENDOR_DEVICE, FakeBackend, assert_serves_fresh_client, connect, fired, guest_ram
from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user import server as server_module
from emulator.vfio_user.client import VfioUserClient, VfioUserError
from emulator.vfio_user.testing import ServerThread

CONFIG = p.PCI_CONFIG_REGION_INDEX
TRIGGER_FD = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER


def doorbell(i: int) -> m.RegionWriteRequest:
    return m.RegionWriteRequest(0, 0x1000 + 4 * (i % 4), i.to_bytes(4, "little"), no_reply=True)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Bytes of every recvmsg the server makes."""
    sizes: list[int] = []
    real = server_module.recv_chunk

    def counting(sock: socket.socket, size: int, ancsize: int) -> Any:
        data, fds, cut = real(sock, size, ancsize)
        sizes.append(len(data))
        return data, fds, cut

    monkeypatch.setattr(server_module, "recv_chunk", counting)
    return sizes


def test_queued_messages_and_fds_are_read_together_and_served_in_order(
        server: ServerThread, backend: FakeBackend, client: VfioUserClient, reads: list[int]) -> None:
    """Messages that wait in the socket (doorbells, a DMA_MAP with its fd, SET_IRQS with two,
    a read) come in a few reads; each gets its fds, writes apply in order, replies come in order."""
    ram_fd, ram = guest_ram(0x4000)
    vec = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    server.call(server.server.pause)
    ids = []
    for i in range(10):
        client.send(doorbell(i))
    ids.append(client.send(m.DmaMapRequest(0x10000, 0x4000, 3, 0, os.dup(ram_fd))))
    for i in range(10, 20):
        client.send(doorbell(i))
    ids.append(client.send(m.SetIrqsRequest(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 0, 2, [os.dup(v) for v in vec])))
    ids.append(client.send(m.RegionReadRequest(CONFIG, 0, 4)))
    for i in range(20, 30):
        client.send(doorbell(i))
    ids.append(client.send(m.RegionReadRequest(0, 0x1000, 4)))
    del reads[:]
    server.call(server.server.start_reading)
    replies = [client.wait(i) for i in ids]
    assert isinstance(replies[0], m.DmaMapReply) and isinstance(replies[1], m.SetIrqsReply)
    assert replies[2].data == VENDOR_DEVICE
    assert server.call(lambda: [int.from_bytes(d, "little") for _, _, d in backend.writes]) == list(range(30))
    # 34 messages (a small socket buffer holds about 70): the kernel ends a read after the data that brought fds, so three reads
    # (up to the DMA_MAP, up to SET_IRQS, the rest) and the one that finds the socket empty
    assert len([n for n in reads if n]) <= 4, reads
    ram[0:4] = b"dma!"
    assert server.call(lambda: bytes(backend.memory.read(0x10000, 4))) == b"dma!"  # type: ignore[union-attr]
    assert server.call(lambda: backend.irqs.trigger(p.PCI_MSIX_IRQ_INDEX, 1))  # type: ignore[union-attr]
    assert fired(vec[1]) == 1
    for fd in (ram_fd, *vec):
        os.close(fd)
    ram.close()


def test_a_malformed_message_after_good_ones_in_the_same_read(server: ServerThread, backend: FakeBackend,
                                                              client: VfioUserClient) -> None:
    """The good ones are served; the bad header drops this client only."""
    server.call(server.server.pause)
    for i in range(5):
        client.send(doorbell(i))
    client.send_raw(p.HEADER.pack(99, p.Command.REGION_WRITE, 8, 0, 0) + bytes(16))
    server.call(server.server.start_reading)
    server.wait_disconnected()
    assert server.call(lambda: [int.from_bytes(d, "little") for _, _, d in backend.writes]) == list(range(5))
    assert_serves_fresh_client(server)


def test_a_rejected_message_between_good_ones_is_answered_and_the_rest_served(
        server: ServerThread, backend: FakeBackend, client: VfioUserClient) -> None:
    server.call(server.server.pause)
    client.send(doorbell(1))
    client.send_raw(p.HEADER.pack(500, 99, 24, 0, 0) + bytes(8))  # unknown command, well framed
    client.conn.awaiting_reply[500] = 99
    client.send(doorbell(2))
    read = client.send(m.RegionReadRequest(CONFIG, 0, 4))
    server.call(server.server.start_reading)
    with pytest.raises(VfioUserError) as e:
        client.wait(500)
    assert e.value.errno == errno.EINVAL
    assert client.wait(read).data == VENDOR_DEVICE
    assert server.call(lambda: [int.from_bytes(d, "little") for _, _, d in backend.writes]) == [1, 2]


@pytest.mark.parametrize("steps", [True, False], ids=["pause-export-adopt", "detach-adopt"])
def test_hand_over_with_part_of_a_message_read(backend: FakeBackend, steps: bool) -> None:
    """The old owner has read part of a DMA_MAP (with its fd) and part of a REGION_READ when the
    connection moves; the new owner completes both from the rest the client sends."""
    ram_fd, ram = guest_ram(0x4000)
    other = FakeBackend()
    with ServerThread(backend) as a, ServerThread(other) as b, connect(a) as c:
        dma_req, read_req = m.DmaMapRequest(0x10000, 0x4000, 3, 0, os.dup(ram_fd)), m.RegionReadRequest(CONFIG, 0, 4)
        dma, dma_fds = c.conn.send(dma_req)
        read, _ = c.conn.send(read_req)
        c.send_raw(dma[:20], dma_fds)  # the fd comes with the first byte
        a.wait_until(lambda: a.server.buffered == 20)
        if steps:
            a.call(a.server.pause)
            sock_fd, state, device = a.call(a.server.export_connection)
            assert state.input == dma[:20] and [(last, n) for last, _, n in state.to_dict()["input_fds"]] == [(19, 1)]
            moved = type(state).from_dict(json.loads(json.dumps(state.to_dict())), state.fds())
            b.call(lambda: b.server.adopt_connection(socket.socket(fileno=sock_fd), moved, reading=False,
                                                     device_state=device))
            a.call(a.server.release)
            b.call(b.server.start_reading)
        else:
            sock, state = a.call(a.server.detach_connection)
            b.call(b.server.adopt_connection, sock, state)
        assert a.call(lambda: backend.detached) == 1 and a.call(lambda: backend.memory) is None
        c.send_raw(dma[20:] + read[:7])
        b.wait_until(lambda: b.server.buffered == 7)
        c.send_raw(read[7:])
        assert isinstance(c.wait(dma_req.msg_id), m.DmaMapReply)
        assert c.wait(read_req.msg_id).data == VENDOR_DEVICE
        os.close(dma_fds[0])  # our copy (the server got its own with the message)
        ram[0:4] = b"move"
        assert b.call(lambda: bytes(other.memory.read(0x10000, 4))) == b"move"  # type: ignore[union-attr]
        assert_serves_fresh_client(a)
        assert a.errors == [] and b.errors == []
    other.close()
    os.close(ram_fd)
    ram.close()


def test_pause_waits_for_no_message_boundary(server: ServerThread, client: VfioUserClient) -> None:
    """A half-read message no longer blocks a pause (it travels with the connection)."""
    req = m.RegionReadRequest(CONFIG, 0, 4)
    data, _ = client.conn.send(req)
    client.send_raw(data[:5])
    server.wait_until(lambda: server.server.buffered == 5)
    server.call(server.server.pause)
    client.send_raw(data[5:])
    server.call(server.server.start_reading)
    assert client.wait(req.msg_id).data == VENDOR_DEVICE


def test_a_small_budget_gives_the_loop_back_and_keeps_the_order(backend: FakeBackend) -> None:
    """With 4 messages per wakeup, 60 queued writes take many loop turns (other callbacks
    run in between) and still apply in order before the read that follows them."""
    with ServerThread(backend, budget=4) as srv, connect(srv) as c:
        turns: list[int] = []

        def tick() -> None:  # a loop callback competing with the client's messages
            turns.append(len(backend.writes))
            if len(turns) < 1000 and len(backend.writes) < 60:
                srv.loop.call_soon(tick)

        srv.call(srv.server.pause)
        for i in range(60):
            c.send(doorbell(i))
        req = m.RegionReadRequest(0, 0x1000 + 4 * (59 % 4), 4)
        c.send(req)
        srv.call(lambda: (srv.server.start_reading(), tick()))
        assert c.wait(req.msg_id) == m.RegionReadReply(0, req.offset, (59).to_bytes(4, "little"), msg_id=req.msg_id)
        assert srv.call(lambda: [int.from_bytes(d, "little") for _, _, d in backend.writes]) == list(range(60))
        assert len(set(turns)) > 5  # the writes were handled over many turns
        assert srv.errors == []
