"""The sans-IO codec: round trips, fragmentation, fd attribution, errors, fuzzing."""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import is_open
from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user.codec import CLOSED, NEED_DATA, Connection, Event, InvalidMessage, Role
from emulator.vfio_user.protocol import FatalProtocolError, LocalProtocolError, ProtocolError


def drain(conn: Connection) -> list[Event]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
        if ev is CLOSED:
            break
    return out


def deliver(conn: Connection, data: bytes, fds: list[int]) -> Event:
    """Feed one message the way the server reads it: header (with the fds), then body."""
    assert conn.next_read_size() == p.HEADER_SIZE
    conn.receive_data(data[:16], fds)
    assert conn.next_read_size() == len(data) - 16
    if len(data) > 16:
        assert conn.next_event() is NEED_DATA
        conn.receive_data(data[16:])
    assert conn.next_read_size() == 0
    ev = conn.next_event()
    assert conn.next_event() is NEED_DATA
    assert conn.next_read_size() == p.HEADER_SIZE
    return ev


def pairs(fds: list[int]) -> list[tuple[m.Message, m.Message]]:
    """One (request, reply) per command, in the direction each travels."""
    caps = {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "migration": {"pgsize": 4096}, "write_multiple": True}
    sparse = m.sparse_mmap_cap([(0x1000, 0x1000), (0x3000, 0x2000)])
    rw_caps = p.REGION_FLAG_READ | p.REGION_FLAG_WRITE | p.REGION_FLAG_MMAP | p.REGION_FLAG_CAPS
    return [
        (m.VersionRequest(0, 0, caps), m.VersionReply(0, 0, {"max_msg_fds": 8})),
        (m.DmaMapRequest(0xC0000, 0x1FF40000, 3, 0xC0000, fds[0]), m.DmaMapReply()),
        (m.DmaMapRequest(0xFFFC0000, 0x40000, p.DMA_FLAG_READ), m.DmaMapReply()),
        (m.DmaUnmapRequest(0x1000, 0x2000), m.DmaUnmapReply(0x1000, 0x2000)),
        (m.DeviceInfoRequest(), m.DeviceInfoReply(3, 9, 5)),
        (m.RegionInfoRequest(2, argsz=128), m.RegionInfoReply(2, rw_caps, 0x8000, 0, [sparse], fds[1], argsz=80)),
        (m.RegionInfoRequest(0), m.RegionInfoReply(0, 3, 0x4000, argsz=32)),
        (m.IrqInfoRequest(2), m.IrqInfoReply(2, p.IRQ_INFO_EVENTFD, 16)),
        (m.SetIrqsRequest(2, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 3, 2, [fds[2], fds[3]]),
         m.SetIrqsReply()),
        (m.SetIrqsRequest(0, p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_MASK, 0, 1, data=b"\x01"), m.SetIrqsReply()),
        (m.RegionReadRequest(7, 0, 4096), m.RegionReadReply(7, 0, bytes(range(256)) * 16)),
        (m.RegionWriteRequest(0, 0x1000, b"\x05\x00\x00\x00"), m.RegionWriteReply(0, 0x1000, 4)),
        (m.RegionWriteMultiRequest([(0, 0x1000, b"\x01\x00"), (0, 0x1008, b"12345678")]),
         m.RegionWriteMultiReply(2)),
        (m.DeviceResetRequest(), m.DeviceResetReply()),
        (m.DeviceFeatureRequest(p.DEVICE_FEATURE_GET | 1, b"", 16), m.DeviceFeatureReply(1, b"\x01" + bytes(7), 16)),
        (m.MigDataReadRequest(4096, argsz=8 + 4096), m.MigDataReadReply(b"state", argsz=8 + 5)),
        (m.MigDataWriteRequest(b"state", argsz=8 + 5), m.MigDataWriteReply()),
        (m.DmaReadRequest(0x1000, 8), m.DmaReadReply(0x1000, b"12345678")),
        (m.DmaWriteRequest(0x2000, b"abc"), m.DmaWriteReply(0x2000, 3)),
    ]


@dataclass(slots=True)
class FdReply(m.SetIrqsReply):
    fd: int = -1

    def attached_fds(self) -> list[int]:
        return [self.fd]


def test_every_message_round_trips(efds: list[int]) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    for request, reply in pairs(efds):
        sender, receiver = (server, client) if request.COMMAND in m.SERVER_REQUESTS else (client, server)
        data, fds = sender.send(request)
        assert fds == request.attached_fds()
        got = deliver(receiver, data, fds)
        assert got == request
        reply.msg_id = got.msg_id
        data, fds = receiver.send(reply)
        assert deliver(sender, data, fds) == reply
    assert client.awaiting_reply == {} and server.awaiting_reply == {}


def test_error_reply_round_trips() -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    req = deliver(server, client.send(m.RegionReadRequest(0, 0, 4))[0], [])
    data, fds = server.send(m.ErrorReply(req.COMMAND, errno.EIO, msg_id=req.msg_id))
    assert data == p.HEADER.pack(req.msg_id, p.Command.REGION_READ, 16, p.TYPE_REPLY | p.FLAG_ERROR, errno.EIO)
    assert deliver(client, data, fds) == m.ErrorReply(p.Command.REGION_READ, errno.EIO, msg_id=req.msg_id)


def test_version_json_is_compact_and_nul_terminated() -> None:
    caps = {"max_msg_fds": 8, "max_data_xfer_size": 1048576, "pgsizes": 4096, "max_dma_maps": 65535}
    payload = b"".join(m.VersionReply(0, 0, caps).parts())
    assert payload == (b"\0\0\0\0" + b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
                       b'"pgsizes":4096,"max_dma_maps":65535}}\0')


def test_byte_by_byte_fragmentation_keeps_fds_with_their_message(efds: list[int]) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    msgs = [m.VersionRequest(0, 0, {"a": 1}), m.RegionWriteRequest(0, 8, b"xyz", no_reply=True),
            m.DmaMapRequest(0, 4096, fd=efds[0]), m.RegionReadRequest(7, 0, 4),
            m.SetIrqsRequest(2, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 0, 2, [efds[1], efds[2]])]
    stream: list[tuple[bytes, list[int]]] = [client.send(msg) for msg in msgs]
    events: list[Event] = []
    for data, fds in stream:
        for i in range(len(data)):  # the kernel hands fds out with the first byte of their sendmsg
            server.receive_data(data[i:i + 1], fds if i == 0 else [])
            events += drain(server)
    assert events == msgs


def test_chunk_spanning_messages_gives_fds_to_the_message_holding_its_last_byte(efds: list[int]) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    a, _ = client.send(m.RegionReadRequest(0, 0, 4))
    b, fds = client.send(m.DmaMapRequest(0, 4096, fd=efds[0]))
    server.receive_data(a[:20])
    server.receive_data(a[20:] + b[:10], fds)  # recvmsg stopped after the segment carrying fds
    server.receive_data(b[10:])
    first, second = drain(server)
    assert isinstance(first, m.RegionReadRequest)
    assert isinstance(second, m.DmaMapRequest) and second.fd == efds[0]


def test_fds_on_a_message_that_carries_none_are_closed_and_answered(efds: list[int]) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    data, _ = client.send(m.RegionReadRequest(7, 0, 4))
    ev = deliver(server, data, [efds[0], efds[1]])
    assert isinstance(ev, InvalidMessage) and ev.errno == errno.EINVAL and ev.needs_reply
    assert not is_open(efds[0]) and not is_open(efds[1])
    server.send(m.ErrorReply(ev.command, ev.errno, msg_id=ev.msg_id))  # the error reply is owed


def test_truncated_control_data_invalidates_the_message(efds: list[int]) -> None:
    server = Connection(Role.SERVER)
    data, _ = Connection(Role.CLIENT).send(m.DmaMapRequest(0, 4096))
    server.receive_data(data, [efds[0]], fds_truncated=True)
    (ev,) = drain(server)
    assert isinstance(ev, InvalidMessage) and "truncated" in ev.reason
    assert not is_open(efds[0])


def test_more_fds_than_the_connection_accepts(efds: list[int]) -> None:
    server = Connection(Role.SERVER, max_fds=2)
    flags = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
    data, fds = Connection(Role.CLIENT).send(m.SetIrqsRequest(2, flags, 0, 3, efds[:3]))
    ev = deliver(server, data, fds)
    assert isinstance(ev, InvalidMessage) and ev.errno == errno.EINVAL
    assert not any(is_open(fd) for fd in efds[:3])


@pytest.mark.parametrize("header", [
    p.HEADER.pack(1, 1, 15, 0, 0),  # msg_size below the header
    p.HEADER.pack(1, 9, p.MAX_MSG_SIZE + 1, 0, 0),  # oversized
    p.HEADER.pack(1, 9, 32, 0x2, 0),  # type bits neither command nor reply
    b"\xff" * 16,
])
def test_untrustworthy_header_is_fatal(header: bytes, efds: list[int]) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(header + b"\0" * 16, [efds[0]])
    with pytest.raises(FatalProtocolError):
        server.next_event()
    with pytest.raises(FatalProtocolError):
        server.next_event()
    assert server.next_read_size() == 0
    assert not is_open(efds[0])


def test_unknown_wrong_direction_and_unsupported_commands() -> None:
    server = Connection(Role.SERVER)
    cases = [(99, errno.EINVAL), (p.Command.DMA_READ, errno.EINVAL), (p.Command.DIRTY_PAGES, errno.ENOTSUP),
             (p.Command.DEVICE_GET_REGION_IO_FDS, errno.ENOTSUP)]
    for i, (command, err) in enumerate(cases):
        server.receive_data(p.HEADER.pack(i, command, 24, 0, 0) + bytes(8))
        (ev,) = drain(server)
        assert ev == InvalidMessage(i, command, err, ev.reason)
        server.send(m.ErrorReply(command, err, msg_id=i))


def test_error_flag_on_a_request_is_rejected() -> None:
    server = Connection(Role.SERVER)
    server.receive_data(p.HEADER.pack(3, p.Command.DEVICE_RESET, 16, p.FLAG_ERROR, 0))
    (ev,) = drain(server)
    assert isinstance(ev, InvalidMessage) and ev.needs_reply


def test_reply_rules_are_enforced_on_send(efds: list[int]) -> None:
    client, server = Connection(Role.CLIENT), Connection(Role.SERVER)
    posted = deliver(server, client.send(m.RegionWriteRequest(0, 0, b"1", no_reply=True))[0], [])
    with pytest.raises(LocalProtocolError):
        server.send(m.RegionWriteReply(0, 0, 1, msg_id=posted.msg_id))  # never answer NO_REPLY
    req = deliver(server, client.send(m.RegionReadRequest(0, 0, 1))[0], [])
    with pytest.raises(LocalProtocolError):
        server.send(m.RegionInfoReply(0, 3, 4096, msg_id=req.msg_id))  # reply of another command
    with pytest.raises(LocalProtocolError):
        server.send(m.RegionReadRequest(0, 0, 1))  # servers only send DMA_READ/WRITE requests
    server.send(m.RegionReadReply(0, 0, b"x", msg_id=req.msg_id))
    with pytest.raises(LocalProtocolError):
        server.send(m.RegionReadReply(0, 0, b"x", msg_id=req.msg_id))  # only once
    info = deliver(server, client.send(m.RegionInfoRequest(0))[0], [])
    with pytest.raises(LocalProtocolError):
        server.send(FdReply(efds[0], msg_id=info.msg_id))  # fds only on GET_REGION_INFO replies
    server.send(m.RegionInfoReply(0, 7, 4096, fd=efds[0], msg_id=info.msg_id))  # the one fd allowed


def test_repeated_msg_ids_each_get_one_reply() -> None:
    server = Connection(Role.SERVER)
    for _ in range(2):
        server.receive_data(p.HEADER.pack(7, p.Command.DEVICE_RESET, 16, 0, 0))
    assert len(drain(server)) == 2
    server.send(m.DeviceResetReply(msg_id=7))
    server.send(m.DeviceResetReply(msg_id=7))
    with pytest.raises(LocalProtocolError):
        server.send(m.DeviceResetReply(msg_id=7))


def test_unexpected_reply_is_reported_not_answered(efds: list[int]) -> None:
    server = Connection(Role.SERVER)
    server.receive_data(p.HEADER.pack(5, p.Command.REGION_READ, 16, p.TYPE_REPLY, 0), [efds[0]])
    (ev,) = drain(server)
    assert isinstance(ev, InvalidMessage) and ev.is_reply and ev.unsolicited and not ev.needs_reply
    assert ev.command == p.Command.REGION_READ
    assert not is_open(efds[0])


def test_end_of_stream_mid_message_closes_its_fds(efds: list[int]) -> None:
    server = Connection(Role.SERVER)
    data, _ = Connection(Role.CLIENT).send(m.DmaMapRequest(0, 4096))
    server.receive_data(data[:20], [efds[0]])
    server.receive_data(b"")
    assert server.next_event() is CLOSED
    assert not is_open(efds[0])
    assert server.next_read_size() == 0


@pytest.mark.parametrize("cls, payload", [
    (m.DmaMapRequest, p.DMA_MAP.pack(31, 3, 0, 0, 4096)),
    (m.DmaUnmapRequest, p.DMA_UNMAP.pack(0, 0, 0, 4096)),
    (m.DeviceInfoRequest, p.DEVICE_INFO.pack(15, 0, 0, 0)),
    (m.RegionInfoRequest, p.REGION_INFO.pack(16, 0, 7, 0, 0, 0)),
    (m.IrqInfoRequest, p.IRQ_INFO.pack(0, 0, 2, 0)),
    (m.SetIrqsRequest, p.SET_IRQS.pack(19, 0x21, 2, 0, 0)),
    (m.DeviceFeatureRequest, p.DEVICE_FEATURE.pack(4, 1)),
    (m.MigDataReadRequest, p.MIG_DATA.pack(7, 16)),
    (m.MigDataWriteRequest, p.MIG_DATA.pack(7, 0)),
])
def test_small_argsz_is_einval(cls: type[m.Message], payload: bytes) -> None:
    with pytest.raises(p.MessageError) as e:
        cls.decode(memoryview(payload), [])
    assert e.value.errno == errno.EINVAL and "argsz" in e.value.reason


@pytest.mark.parametrize("cls, payload", [
    (m.RegionReadRequest, p.REGION_ACCESS.pack(0, 0, 4) + b"x"),  # trailing bytes
    (m.RegionWriteRequest, p.REGION_ACCESS.pack(0, 0, 4) + b"xyz"),  # count != data
    (m.RegionWriteMultiRequest, struct.pack("<Q", 2) + p.WRITE_MULTI_ENTRY.pack(0, 0, 4, b"")),
    (m.RegionWriteMultiRequest, struct.pack("<Q", 1) + p.WRITE_MULTI_ENTRY.pack(0, 0, 9, b"")),
    (m.VersionRequest, b"\0\0\0\0{}"),  # no NUL
    (m.VersionRequest, b"\0\0\0\0[]\0"),  # not an object
    (m.VersionRequest, b"\0\0\0\0" + b"[" * 100000 + b"\0"),  # deep nesting
    (m.VersionRequest, b"\0\0\0\0\xff\0"),  # not UTF-8
    (m.SetIrqsRequest, p.SET_IRQS.pack(20, 0x21, 0, 0, 1) + b"\1"),  # data without BOOL
    (m.SetIrqsRequest, p.SET_IRQS.pack(20, 0x0A, 0, 0, 2) + b"\1"),  # BOOL data short
    (m.DeviceResetRequest, b"\0"),
    (m.RegionInfoReply, p.REGION_INFO.pack(40, 8, 0, 16, 0, 0) + bytes(8)),  # cap inside the struct
    (m.RegionInfoReply, p.REGION_INFO.pack(48, 8, 0, 32, 0, 0) + p.REGION_CAP_HEADER.pack(1, 1, 0)
     + p.SPARSE_MMAP_HEAD.pack(5, 0)),  # sparse cap shorter than its areas
    (m.RegionInfoReply, p.REGION_INFO.pack(48, 8, 0, 32, 0, 0) + p.REGION_CAP_HEADER.pack(1, 1, 32) + bytes(8)),
])
def test_malformed_payloads_are_message_errors(cls: type[m.Message], payload: bytes) -> None:
    with pytest.raises(p.MessageError):
        cls.decode(memoryview(payload), [])


def test_dirty_bitmap_unmap_is_enotsup() -> None:
    with pytest.raises(p.MessageError) as e:
        m.DmaUnmapRequest.decode(memoryview(p.DMA_UNMAP.pack(24, 1, 0, 4096) + bytes(16)), [])
    assert e.value.errno == errno.ENOTSUP


# -- fuzzing ------------------------------------------------------------------------------
def feed_and_drain(conn: Connection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for ev in drain(conn):
                if isinstance(ev, InvalidMessage) and ev.needs_reply:
                    conn.send(m.ErrorReply(ev.command, ev.errno, msg_id=ev.msg_id))
    except ProtocolError as e:
        assert not isinstance(e, LocalProtocolError)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=4096), cuts=st.lists(st.integers(1, 97), max_size=40),
       role=st.sampled_from(list(Role)))
def test_fuzz_random_bytes(data: bytes, cuts: list[int], role: Role) -> None:
    chunks, pos = [], 0
    for n in cuts:
        chunks.append(data[pos:pos + n])
        pos += n
    chunks = [c for c in chunks if c] + ([data[pos:]] if data[pos:] else [])
    feed_and_drain(Connection(role), chunks)


LAYOUT_SIZES = [0, 4, 8, 16, 20, 24, 32, 40, 48, 56, 64]


@st.composite
def plausible_messages(draw: st.DrawFn) -> tuple[int, int, bytes]:
    """Well-framed messages with random command, flags and payload (reaches the decoders)."""
    command = draw(st.integers(0, 20))
    flags = draw(st.sampled_from([0, 1, 0x10, 0x11, 0x21, 0x40]))
    size = draw(st.sampled_from(LAYOUT_SIZES))
    payload = draw(st.binary(min_size=size, max_size=size + 48))
    msg_id = draw(st.integers(0, 3))
    return msg_id, command, p.HEADER.pack(msg_id, command, 16 + len(payload), flags, 0) + payload


@settings(max_examples=1500, deadline=None)
@given(msgs=st.lists(plausible_messages(), max_size=6), role=st.sampled_from(list(Role)))
def test_fuzz_well_framed_messages(msgs: list[tuple[int, int, bytes]], role: Role) -> None:
    conn = Connection(role)
    for msg_id, command, _ in msgs:  # make replies to every command expected
        conn.awaiting_reply[msg_id] = command if command in m.REPLY_TYPES else p.Command.VERSION
    feed_and_drain(conn, [raw for _, _, raw in msgs])
