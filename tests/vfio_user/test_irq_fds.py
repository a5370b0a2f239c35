"""Interrupt fds a client hands over cannot block, spin or leak (issue: untrusted SET_IRQS fds)."""
from __future__ import annotations

import errno
import os

import pytest

from conftest import FakeBackend, assert_serves_fresh_client
from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient, VfioUserError
from emulator.vfio_user.testing import ServerThread

TRIGGER_FD = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
UNMASK_FD = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_UNMASK
MASK_FD = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_MASK
EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE  # the largest value an eventfd counter holds


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("flags,index", [(TRIGGER_FD, p.PCI_MSIX_IRQ_INDEX), (UNMASK_FD, p.PCI_INTX_IRQ_INDEX),
                                         (MASK_FD, p.PCI_INTX_IRQ_INDEX)])
def test_a_pipe_is_refused_and_closed(server: ServerThread, client: VfioUserClient, flags: int, index: int) -> None:
    """A pipe (which blocks when full, or reads EOF for ever) is not an eventfd: EINVAL, and the
    server keeps no copy of it (the read end sees EOF once the client closes its write end)."""
    r, w = os.pipe()
    with pytest.raises(VfioUserError) as e:
        client.set_irqs(index, flags, 0, 1, [w])
    assert e.value.errno == errno.EINVAL
    os.close(w)
    os.set_blocking(r, False)
    assert os.read(r, 1) == b""  # no write end left open anywhere: the server's copy was closed
    os.close(r)
    assert_serves_fresh_client_after(server, client)


def assert_serves_fresh_client_after(server: ServerThread, client: VfioUserClient) -> None:
    client.close()
    server.wait_disconnected()
    assert_serves_fresh_client(server)


@pytest.mark.parametrize("make", [lambda: os.memfd_create("not-an-eventfd"), lambda: os.open(os.devnull, os.O_RDWR)])
def test_unpollable_unmask_fd_is_not_kept(server: ServerThread, client: VfioUserClient, make) -> None:  # type: ignore[no-untyped-def]
    fd = make()
    before = open_fds()  # client and server share this process
    for flags in (UNMASK_FD, MASK_FD):
        with pytest.raises(VfioUserError) as e:
            client.set_irqs(p.PCI_INTX_IRQ_INDEX, flags, 0, 1, [fd])
        assert e.value.errno == errno.EINVAL
    assert server.call(open_fds) == before
    os.close(fd)


def test_full_blocking_eventfd_drops_the_interrupt(server: ServerThread, backend: FakeBackend,
                                                   client: VfioUserClient, caplog: pytest.LogCaptureFixture) -> None:
    """A blocking eventfd at its maximum count as an MSI-X trigger: the trigger returns (the
    interrupt is dropped and logged once), the server goes on serving."""
    efd = os.eventfd(0)  # blocking
    os.write(efd, EVENTFD_MAX.to_bytes(8, "little"))
    client.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 0, 1, [efd])
    for _ in range(3):
        assert server.call(lambda: backend.irqs.trigger(p.PCI_MSIX_IRQ_INDEX, 0), timeout=5.0)  # type: ignore[union-attr]
    assert sum("interrupt dropped" in r.getMessage() for r in caplog.records) == 1
    assert int.from_bytes(os.read(efd, 8), "little") == EVENTFD_MAX  # the reader still sees its count
    assert server.call(lambda: backend.irqs.trigger(p.PCI_MSIX_IRQ_INDEX, 0))  # type: ignore[union-attr]
    assert int.from_bytes(os.read(efd, 8), "little") == 1
    os.close(efd)


def test_eventfds_in_a_refused_batch_are_all_closed(server: ServerThread, client: VfioUserClient) -> None:
    """One bad fd among several: the whole SET_IRQS is refused and none of its fds is kept."""
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
    r, w = os.pipe()
    before = open_fds()
    with pytest.raises(VfioUserError):
        client.set_irqs(p.PCI_MSIX_IRQ_INDEX, TRIGGER_FD, 0, 3, [efds[0], w, efds[1]])
    assert server.call(open_fds) == before
    for fd in efds + [r, w]:
        os.close(fd)
