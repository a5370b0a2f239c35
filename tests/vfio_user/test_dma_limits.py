"""One client cannot exhaust the process's fds with DMA_MAPs: max_dma_maps is announced and enforced."""
from __future__ import annotations

import errno
import os

import pytest

from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient, VfioUserError
from emulator.vfio_user.testing import ServerThread


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_dma_maps_are_capped_and_their_fds_released(server: ServerThread, client: VfioUserClient) -> None:
    limit = client.server_caps["max_dma_maps"]
    assert limit == p.SERVER_MAX_DMA_MAPS <= 65535  # QEMU 11.1 refuses more than 65535
    ram = os.memfd_create("ram")
    os.ftruncate(ram, limit * 4096 + 4096)
    before = server.call(open_fds)
    for i in range(limit):
        client.dma_map(i * 4096, 4096, ram, i * 4096)
    per_map = (server.call(open_fds) - before) / limit
    assert per_map <= 1.01  # at most the mapping's own fd (none from Python 3.13), one kept per file
    with pytest.raises(VfioUserError) as e:
        client.dma_map(limit * 4096, 4096, ram, limit * 4096)
    assert e.value.errno == errno.ENOSPC
    grown = server.call(open_fds)
    with pytest.raises(VfioUserError):
        client.dma_map(limit * 4096, 4096, ram, limit * 4096)
    assert server.call(open_fds) == grown  # the refused map's fd was closed
    client.close()
    server.wait_disconnected()
    assert server.call(open_fds) == before - 2  # every map fd released (and both ends of the socket)
    os.close(ram)
