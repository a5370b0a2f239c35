"""Hostile and broken clients: the server answers with an error or drops that client,
never crashes, leaks no fd, and then serves the next client normally."""
from __future__ import annotations

import errno
import os
import socket
from typing import Iterator, Sequence

import pytest

from conftest import assert_serves_fresh_client, connect
from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import RawMessage, VfioUserClient
from emulator.vfio_user.testing import ServerThread

C = p.Command
ID = 0x4242


def raw(command: int, payload: bytes = b"", flags: int = 0, msg_id: int = ID, size: int | None = None) -> bytes:
    return p.HEADER.pack(msg_id, command, 16 + len(payload) if size is None else size, flags, 0) + payload


# one valid payload per client->server command (none of them may carry fds)
VALID = {
    C.VERSION: p.VERSION.pack(0, 0) + b'{"capabilities":{}}\0',
    C.DMA_UNMAP: p.DMA_UNMAP.pack(24, 0, 0x1000, 0x1000),
    C.DEVICE_GET_INFO: p.DEVICE_INFO.pack(16, 0, 0, 0),
    C.DEVICE_GET_REGION_INFO: p.REGION_INFO.pack(32, 0, 7, 0, 0, 0),
    C.DEVICE_GET_IRQ_INFO: p.IRQ_INFO.pack(16, 0, 2, 0),
    C.REGION_READ: p.REGION_ACCESS.pack(0, 7, 4),
    C.REGION_WRITE: p.REGION_ACCESS.pack(0x40, 7, 4) + b"abcd",
    C.DEVICE_RESET: b"",
    C.REGION_WRITE_MULTI: p.WRITE_MULTI_HEAD.pack(1) + p.WRITE_MULTI_ENTRY.pack(0x40, 0, 4, b"abcd"),
    C.DEVICE_FEATURE: p.DEVICE_FEATURE.pack(16, p.DEVICE_FEATURE_GET | 1),
    C.MIG_DATA_READ: p.MIG_DATA.pack(8, 64),
    C.MIG_DATA_WRITE: p.MIG_DATA.pack(8, 2) + b"xy",
}
# the same commands with an argsz below their fixed part
BAD_ARGSZ = {
    C.DMA_MAP: p.DMA_MAP.pack(16, 3, 0, 0x1000, 0x1000),
    C.DMA_UNMAP: p.DMA_UNMAP.pack(8, 0, 0x1000, 0x1000),
    C.DEVICE_GET_INFO: p.DEVICE_INFO.pack(0, 0, 0, 0),
    C.DEVICE_GET_REGION_INFO: p.REGION_INFO.pack(31, 0, 7, 0, 0, 0),
    C.DEVICE_GET_IRQ_INFO: p.IRQ_INFO.pack(4, 0, 2, 0),
    C.DEVICE_SET_IRQS: p.SET_IRQS.pack(12, 0x21, 2, 0, 0),
    C.DEVICE_FEATURE: p.DEVICE_FEATURE.pack(7, p.DEVICE_FEATURE_GET | 1),
    C.MIG_DATA_READ: p.MIG_DATA.pack(4, 64),
    C.MIG_DATA_WRITE: p.MIG_DATA.pack(0, 2) + b"xy",
}
# commands without argsz, with a payload of the wrong size
BAD_SIZE = {
    C.VERSION: p.VERSION.pack(0, 0)[:3],
    C.REGION_READ: p.REGION_ACCESS.pack(0, 7, 4) + b"!",
    C.REGION_WRITE: p.REGION_ACCESS.pack(0, 7, 8) + b"abcd",
    C.DEVICE_RESET: b"\0" * 4,
    C.REGION_WRITE_MULTI: p.WRITE_MULTI_HEAD.pack(3) + p.WRITE_MULTI_ENTRY.pack(0, 0, 4, b""),
}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def fresh(server: ServerThread) -> Iterator[ServerThread]:
    """After the test: no fd leaked in this process, and a new client is served normally."""
    before = open_fds()
    yield server
    server.wait_disconnected()
    assert_serves_fresh_client(server)
    server.wait_disconnected()
    assert open_fds() == before
    assert server.errors == []


def negotiated(server: ServerThread) -> VfioUserClient:
    return connect(server)


def expect_error(c: VfioUserClient, err: int = errno.EINVAL, msg_id: int = ID) -> RawMessage:
    reply = c.recv_raw()
    assert reply is not None, "the server dropped the client instead of answering"
    assert (reply.msg_id, reply.flags, reply.error_no, reply.msg_size, reply.fds) == \
        (msg_id, p.TYPE_REPLY | p.FLAG_ERROR, err, 16, [])
    return reply


def expect_alive(c: VfioUserClient) -> None:
    """The connection is still in sync: the next request gets its own reply."""
    c.send_raw(raw(C.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4), msg_id=0x777))
    reply = c.recv_raw()
    assert reply is not None and reply.msg_id == 0x777 and not reply.is_error
    assert reply.payload[16:] == b"\x58\x4e\x01\x00"


def expect_dropped(c: VfioUserClient) -> None:
    try:
        assert c.recv_raw() is None
    except ConnectionResetError:
        pass
    c.close()


@pytest.mark.parametrize("data", [
    b"\xde\xad\xbe\xef" * 16,  # garbage
    raw(C.VERSION, size=8),  # msg_size below the header
    raw(C.REGION_WRITE, size=p.MAX_MSG_SIZE + 1),  # oversized
    raw(C.REGION_WRITE, size=0xFFFFFFFF),
    raw(C.VERSION, flags=0x3),  # neither command nor reply
])
def test_untrustworthy_header_drops_the_client(fresh: ServerThread, data: bytes) -> None:
    c = negotiated(fresh)
    c.send_raw(data)
    expect_dropped(c)


@pytest.mark.parametrize("data", [
    raw(C.VERSION)[:10],  # truncated header
    raw(C.REGION_WRITE, p.REGION_ACCESS.pack(0, 0, 64) + b"x" * 20, size=16 + 16 + 64),  # truncated body
])
def test_disconnect_mid_message(fresh: ServerThread, data: bytes) -> None:
    c = negotiated(fresh)
    c.send_raw(data)
    c.close()


def test_disconnect_mid_message_with_an_fd(fresh: ServerThread) -> None:
    c = negotiated(fresh)
    fd = os.eventfd(0)
    c.send_raw(raw(C.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0, 4096))[:20], [fd])
    os.close(fd)
    c.close()


def error_then_alive(server: ServerThread, data: bytes, fds: Sequence[int] = (), err: int = errno.EINVAL) -> None:
    """Send ``data`` (with ``fds``, closed here afterwards): an error reply, and the stream stays in sync."""
    c = negotiated(server)
    c.send_raw(data, fds)
    for fd in fds:
        os.close(fd)
    expect_error(c, err)
    expect_alive(c)
    c.close()


@pytest.mark.parametrize("command", list(VALID))
def test_fds_on_a_message_that_carries_none(fresh: ServerThread, command: int) -> None:
    error_then_alive(fresh, raw(command, VALID[command]), [os.eventfd(0), os.eventfd(0)])


def test_two_fds_on_dma_map(fresh: ServerThread) -> None:
    fds = [os.memfd_create("a"), os.memfd_create("b")]
    for fd in fds:
        os.ftruncate(fd, 4096)
    error_then_alive(fresh, raw(C.DMA_MAP, p.DMA_MAP.pack(32, 3, 0, 0, 4096)), fds)


def test_more_fds_than_max_msg_fds(fresh: ServerThread) -> None:
    fds = [os.eventfd(0) for _ in range(20)]  # the ancillary buffer holds 8: MSG_CTRUNC
    error_then_alive(fresh, raw(C.DEVICE_SET_IRQS, p.SET_IRQS.pack(20, 0x24, 2, 0, 20)), fds)


@pytest.mark.parametrize("command, payload", [*BAD_ARGSZ.items(), *BAD_SIZE.items()],
                         ids=[f"argsz-{c.name}" for c in BAD_ARGSZ] + [f"size-{c.name}" for c in BAD_SIZE])
def test_wrong_argsz_or_payload_size(fresh: ServerThread, command: int, payload: bytes) -> None:
    error_then_alive(fresh, raw(command, payload))


@pytest.mark.parametrize("command, err", [(99, errno.EINVAL), (0, errno.EINVAL), (C.DMA_READ, errno.EINVAL),
                                          (C.DMA_WRITE, errno.EINVAL), (C.DIRTY_PAGES, errno.ENOTSUP),
                                          (C.DEVICE_GET_REGION_IO_FDS, errno.ENOTSUP)])
def test_unknown_and_wrong_direction_commands(fresh: ServerThread, command: int, err: int) -> None:
    error_then_alive(fresh, raw(command, bytes(16)), err=err)


def test_reply_from_the_client_is_ignored(fresh: ServerThread) -> None:
    c = negotiated(fresh)
    fd = os.eventfd(0)
    c.send_raw(raw(C.DMA_READ, p.DMA_RW.pack(0, 4) + b"abcd", flags=p.TYPE_REPLY), [fd])
    c.send_raw(raw(C.REGION_READ, flags=p.TYPE_REPLY | p.FLAG_ERROR, msg_id=3))
    os.close(fd)
    expect_alive(c)  # nothing was answered: the next reply is the read's own
    c.close()


@pytest.mark.parametrize("payload", [
    p.REGION_ACCESS.pack(0, 42, 4) + b"abcd",  # no such region
    p.REGION_ACCESS.pack(0x10000, 0, 4) + b"abcd",  # outside BAR0
    p.REGION_ACCESS.pack(0x3F00, 0, 4) + b"abcd",  # the backend raises RuntimeError
    p.REGION_ACCESS.pack(0, 0, 8) + b"abcd",  # count does not match the data
])
def test_no_reply_on_a_bad_posted_write(fresh: ServerThread, payload: bytes) -> None:
    c = negotiated(fresh)
    c.send_raw(raw(C.REGION_WRITE, payload, flags=p.FLAG_NO_REPLY))
    expect_alive(c)  # had the server answered the posted write, this would read that answer
    c.close()


def test_no_reply_on_any_bad_no_reply_request(fresh: ServerThread) -> None:
    c = negotiated(fresh)
    for command, payload in [*BAD_ARGSZ.items(), *BAD_SIZE.items(), (99, b"")]:
        c.send_raw(raw(command, payload, flags=p.FLAG_NO_REPLY))
    expect_alive(c)
    c.close()


def test_requests_before_version_and_bad_versions(fresh: ServerThread) -> None:
    c = VfioUserClient(fresh.path)
    c.send_raw(raw(C.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4)))
    expect_error(c)
    for payload in [p.VERSION.pack(1, 0) + b"{}\0", p.VERSION.pack(0, 0) + b'{"capabilities":{"max_msg_fds":-1}}\0',
                    p.VERSION.pack(0, 0) + b'{"capabilities":{"pgsizes":512}}\0',
                    p.VERSION.pack(0, 0) + b'{"capabilities":{"write_multiple":1}}\0',
                    p.VERSION.pack(0, 0) + b'{"capabilities":[]}\0']:
        c.send_raw(raw(C.VERSION, payload))
        expect_error(c)
    c.negotiate()
    assert c.region_read(7, 0, 4) == b"\x58\x4e\x01\x00"
    c.close()


def test_garbage_after_a_good_start_and_a_flood(fresh: ServerThread) -> None:
    c = negotiated(fresh)
    c.send_raw(b"".join(raw(C.REGION_WRITE, p.REGION_ACCESS.pack(0, 0, 4) + b"abcd", flags=p.FLAG_NO_REPLY)
                        for _ in range(500)) + os.urandom(4096))
    expect_dropped(c)


def test_client_vanishes_with_replies_pending(fresh: ServerThread) -> None:
    c = negotiated(fresh)
    c.send_raw(raw(C.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4096)) * 200)
    c.sock.shutdown(socket.SHUT_RDWR)
    c.close()
