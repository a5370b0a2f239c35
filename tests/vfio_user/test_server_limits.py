"""No client can hold a server's socket: handshake timeout, bounded wait for a second client."""
from __future__ import annotations

import errno
import socket
from typing import Iterator

import pytest

from conftest import VENDOR_DEVICE, FakeBackend, assert_serves_fresh_client, connect
from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient
from emulator.vfio_user.testing import ServerThread

CONFIG = p.PCI_CONFIG_REGION_INDEX


@pytest.fixture
def quick(backend: FakeBackend) -> Iterator[ServerThread]:
    with ServerThread(backend, handshake_timeout=0.3, busy_wait=0.3) as srv:
        yield srv
        assert srv.errors == []


def test_a_silent_client_is_dropped_and_the_next_one_served(quick: ServerThread) -> None:
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(quick.path)  # connects, never sends VERSION
    quick.wait_until(lambda: quick.server.connected)
    c = VfioUserClient(quick.path, timeout=5.0)
    c.negotiate()  # served once the silent one was dropped
    assert c.region_read(CONFIG, 0, 4) == VENDOR_DEVICE
    idle.settimeout(5)
    assert idle.recv(1) == b""  # the silent client was closed
    c.close()
    idle.close()


def test_a_negotiated_idle_client_is_not_dropped(quick: ServerThread) -> None:
    import time
    c = connect(quick)
    time.sleep(0.6)  # twice the handshake timeout: idle after VERSION is fine (an idle guest)
    assert c.region_read(CONFIG, 0, 4) == VENDOR_DEVICE
    c.close()


def test_second_client_is_refused_with_ebusy_after_a_bounded_wait(quick: ServerThread) -> None:
    first = connect(quick)
    second = VfioUserClient(quick.path, timeout=5.0)
    second.send(m.VersionRequest(0, 0, {}))
    reply = second.recv_raw()
    assert reply is not None and reply.is_error and reply.error_no == errno.EBUSY
    assert second.sock.recv(1) == b""
    second.close()
    assert first.region_read(CONFIG, 0, 4) == VENDOR_DEVICE  # the attached client is untouched
    first.close()
    quick.wait_disconnected()
    assert_serves_fresh_client(quick)


def test_a_restarted_client_attaches_right_away(quick: ServerThread) -> None:
    """A QEMU restarted right after the previous one exited (the server may not have seen the EOF yet)."""
    for _ in range(20):
        c = connect(quick)
        assert c.region_read(CONFIG, 0, 4) == VENDOR_DEVICE
        c.close()
