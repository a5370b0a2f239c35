"""The codec fed the way the server reads: several messages per recvmsg, cut anywhere.

``kernel_reads`` models what Linux hands a reader of a UNIX stream socket: a
read takes up to ``n`` bytes across the queued sends, takes the fds of a send
with its first byte, and ends right after the data of a send that brought
fds (unix_stream_read_generic).  Every message must come out whole, in order,
with exactly its own fds.
"""
from __future__ import annotations

import dataclasses
import errno
import os
from typing import Iterator

import pytest

from conftest import is_open
from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user.codec import NEED_DATA, Connection, Event, InvalidMessage, Role
from emulator.vfio_user.protocol import FatalProtocolError, LocalProtocolError

TRIGGER = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER


def kernel_reads(sends: list[tuple[bytes, list[int]]], sizes: Iterator[int]) -> list[tuple[bytes, list[int]]]:
    """The chunks successive recvmsg calls of ``next(sizes)`` bytes return for ``sends``."""
    queue = [[bytearray(data), list(fds)] for data, fds in sends if data]
    chunks = []
    while queue:
        want, out, got = next(sizes), bytearray(), []
        while queue and len(out) < want:
            seg = queue[0]
            take = min(want - len(out), len(seg[0]))
            out += seg[0][:take]
            del seg[0][:take]
            fds, seg[1] = seg[1], []
            got += fds
            if not seg[0]:
                queue.pop(0)
            if fds:
                break  # the read ends after the data that brought fds
        chunks.append((bytes(out), got))
    return chunks


def events(conn: Connection, chunks: list[tuple[bytes, list[int]]]) -> list[Event]:
    out: list[Event] = []
    for data, fds in chunks:
        conn.receive_data(data, fds)
        while (ev := conn.next_event()) is not NEED_DATA:
            out.append(ev)
    return out


def stream(efds: list[int]) -> tuple[list[m.Message], list[tuple[bytes, list[int]]]]:
    """Requests as a client sends them: doorbell writes, a DMA_MAP with an fd, SET_IRQS with two."""
    msgs = [m.RegionWriteRequest(0, 0x1008, b"\x01\x00\x00\x00", no_reply=True),
            m.RegionWriteRequest(0, 0x100c, b"\x02\x00\x00\x00", no_reply=True),
            m.DmaMapRequest(0, 4096, 3, 0, efds[0]),
            m.RegionReadRequest(7, 0, 4),
            m.SetIrqsRequest(2, TRIGGER, 0, 2, [efds[1], efds[2]]),
            m.RegionWriteRequest(0, 0x1008, b"\x03\x00\x00\x00", no_reply=True)]
    client = Connection(Role.CLIENT)
    return msgs, [client.send(msg) for msg in msgs]


def test_messages_split_at_every_byte_boundary(efds: list[int]) -> None:
    """A first read of every length 1..all, then large reads: the same messages, each with its fds."""
    msgs, sends = stream(efds)
    total = sum(len(d) for d, _ in sends)
    for cut in range(1, total + 1):
        server = Connection(Role.SERVER)
        fds_before = [fd for _, fds in sends for fd in fds]
        sizes = iter([cut] + [1 << 16] * 100)
        got = events(server, kernel_reads(sends, sizes))
        assert got == msgs, cut
        assert server.buffered == 0 and server.at_message_boundary
        # the fds came out inside their messages (and were not closed)
        assert all(is_open(fd) for fd in fds_before)


def test_every_read_size_gives_the_same_messages(efds: list[int]) -> None:
    msgs, sends = stream(efds)
    for n in (1, 2, 3, 7, 16, 17, 31, 36, 50, 64, 100, 1 << 16):
        assert events(Connection(Role.SERVER), kernel_reads(sends, iter([n] * 10_000))) == msgs, n


def test_several_messages_and_fds_in_one_read(efds: list[int]) -> None:
    """Posted writes ahead of a message with fds arrive in one read with those fds."""
    msgs, sends = stream(efds)
    chunks = kernel_reads(sends, iter([1 << 16] * 10))
    # writes + DMA_MAP (its fd ends the read); REGION_READ + SET_IRQS (two fds); the last write
    assert [len(fds) for _, fds in chunks] == [1, 2, 0]
    assert chunks[0][0] == b"".join(d for d, _ in sends[:3])
    server = Connection(Role.SERVER)
    server.receive_data(*chunks[0])
    assert [server.next_event() for _ in range(3)] == msgs[:3]
    assert server.next_event() is NEED_DATA
    assert events(server, chunks[1:]) == msgs[3:]


def test_one_read_with_many_messages_keeps_the_order() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    msgs = [m.RegionWriteRequest(0, 0x1000 + 8 * (i % 16), i.to_bytes(4, "little"), no_reply=True)
            for i in range(3000)]
    data = b"".join(client.send(msg)[0] for msg in msgs)
    assert events(server, [(data[:40_000], []), (data[40_000:], [])]) == msgs


def test_a_malformed_header_after_good_messages_in_the_same_read(efds: list[int]) -> None:
    """The messages before it are handed out; then the stream is dead, its fds closed."""
    msgs, sends = stream(efds)
    good = b"".join(d for d, _ in sends[:2])
    server = Connection(Role.SERVER)
    server.receive_data(good + p.HEADER.pack(9, p.Command.REGION_WRITE, 8, 0, 0) + bytes(16), [efds[3]])
    assert [server.next_event(), server.next_event()] == msgs[:2]
    with pytest.raises(FatalProtocolError):
        server.next_event()
    with pytest.raises(FatalProtocolError):
        server.next_event()
    assert not is_open(efds[3])


def test_a_rejected_message_between_good_ones_keeps_the_stream_in_sync(efds: list[int]) -> None:
    """A well-framed but invalid message (unknown command, a bad payload) in the middle of a read."""
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    write, read = m.RegionWriteRequest(0, 0x1000, b"\x01\x00\x00\x00", no_reply=True), m.RegionReadRequest(0, 0x1000, 4)
    a = client.send(write)[0]
    unknown = p.HEADER.pack(7, 99, 24, 0, 0) + bytes(8)
    short = p.HEADER.pack(8, p.Command.REGION_WRITE, 16 + 20, 0, 0) + p.REGION_ACCESS.pack(0x1000, 0, 8) + bytes(4)
    b = client.send(read)[0]
    got = events(server, [(a + unknown + short + b, [])])
    assert got[0] == write
    assert isinstance(got[1], InvalidMessage) and got[1].msg_id == 7 and got[1].needs_reply
    assert isinstance(got[2], InvalidMessage) and got[2].msg_id == 8 and got[2].errno == errno.EINVAL
    assert got[3] == read
    assert len(got) == 4


def without_fds(ev: Event) -> object:
    """``ev`` with its fds replaced by how many there are (dups have other numbers)."""
    if isinstance(ev, m.DmaMapRequest):
        return dataclasses.replace(ev, fd=-1 if ev.fd is not None else None)
    if isinstance(ev, m.SetIrqsRequest):
        return dataclasses.replace(ev, fds=[-1] * len(ev.fds))
    return ev


def test_input_moves_to_a_new_connection_with_its_fds() -> None:
    """export_input/import_input at every cut: the new owner reads on where the old one stopped,
    each message with its own fds (dups); the old owner's copies close with it."""
    fds = [os.eventfd(0) for _ in range(3)]
    msgs, sends = stream(fds)
    total = sum(len(d) for d, _ in sends)
    try:
        for cut in range(1, total):
            old = Connection(Role.SERVER)
            chunks = kernel_reads(sends, iter([cut] + [1 << 16] * 100))
            old.receive_data(*(chunks[0][0], [os.dup(fd) for fd in chunks[0][1]]))
            first: list[Event] = []
            while (ev := old.next_event()) is not NEED_DATA:
                first.append(ev)
            data, entries = old.export_input()
            assert len(data) == old.buffered
            moved = [fd for _, _, dups in entries for fd in dups]
            old.close()
            new = Connection(Role.SERVER)
            new.import_input(data, entries)
            rest = events(new, [(d, [os.dup(fd) for fd in f]) for d, f in chunks[1:]])
            got = [*first, *rest]
            assert [without_fds(ev) for ev in got] == [without_fds(msg) for msg in msgs], cut
            handed = [fd for ev in got for fd in ev.attached_fds()]
            assert len(handed) == 3 and all(is_open(fd) for fd in handed)
            assert set(moved) <= set(handed)
            for fd in handed:
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


def test_import_input_refuses_fds_outside_the_data(efds: list[int]) -> None:
    conn = Connection(Role.SERVER)
    with pytest.raises(ValueError):
        conn.import_input(b"\0" * 8, [(8, False, [efds[0]])])
    assert not is_open(efds[0])


def test_a_clients_posted_write_encodes_like_the_message() -> None:
    fast, general = Connection(Role.CLIENT), Connection(Role.CLIENT)
    for i, data in enumerate((b"\x01", b"\x01\x02", b"\x01\x02\x03\x04", bytes(range(8)))):
        raw = fast.posted_write(0, 0x1000 + 8 * i, data)
        assert raw == general.send(m.RegionWriteRequest(0, 0x1000 + 8 * i, data, no_reply=True))[0]
        server = Connection(Role.SERVER, posted_writes=True)
        assert events(server, [(raw, [])]) == [(0, 0x1000 + 8 * i, data)]
    with pytest.raises(LocalProtocolError):
        fast.posted_write(0, 0, bytes(9))
    with pytest.raises(LocalProtocolError):
        Connection(Role.SERVER).posted_write(0, 0, b"\x01")


def test_posted_writes_that_do_not_fit_the_fast_path_take_the_general_one(efds: list[int]) -> None:
    """Zero bytes, more than 8, a count that disagrees with msg_size, fds on it, a replied write."""
    client = Connection(Role.CLIENT)
    head = p.HEADER.pack
    empty = client.send(m.RegionWriteRequest(0, 0x1000, b"", no_reply=True))[0]
    nine = client.send(m.RegionWriteRequest(0, 0x1000, bytes(9), no_reply=True))[0]
    liar = head(50, p.Command.REGION_WRITE, 36, p.FLAG_NO_REPLY, 0) + p.REGION_ACCESS.pack(0x1000, 0, 8) + bytes(4)
    replied = m.RegionWriteRequest(0, 0x1000, b"\x01\x00\x00\x00")
    asked = client.send(replied)[0]
    with_fd = client.send(m.RegionWriteRequest(0, 0x1004, b"\x02\x00\x00\x00", no_reply=True))[0]
    server = Connection(Role.SERVER, posted_writes=True)
    got = events(server, [(empty + nine + liar + asked, []), (with_fd, [efds[0]])])
    assert isinstance(got[0], m.RegionWriteRequest) and got[0].data == b"" and got[0].no_reply
    assert isinstance(got[1], m.RegionWriteRequest) and len(got[1].data) == 9
    assert isinstance(got[2], InvalidMessage) and not got[2].needs_reply
    assert got[3] == replied
    assert isinstance(got[4], InvalidMessage) and not got[4].needs_reply  # fds on a write: refused
    assert not is_open(efds[0])
    # Shorter than a REGION_WRITE's access header, and the last bytes received: refused,
    # nothing read past the message.
    short = head(51, p.Command.REGION_WRITE, 24, p.FLAG_NO_REPLY, 0) + bytes(8)
    got = events(Connection(Role.SERVER, posted_writes=True), [(short, [])])
    assert len(got) == 1 and isinstance(got[0], InvalidMessage) and not got[0].needs_reply
