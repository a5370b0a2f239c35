"""A connection moved through the control socket (handover.pause/export/adopt/release/start)
while the source has read part of a message and its fd: the destination completes it."""
from __future__ import annotations

import mmap
import os
import time
from typing import Any

from emulator.control import ControlClient
from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient

CONFIG = p.PCI_CONFIG_REGION_INDEX


def wait_buffered(ctl: ControlClient, n: int) -> None:
    deadline = time.monotonic() + 10
    while ctl.call("session.info", {"cntlid": 1})["buffered"] != n:
        assert time.monotonic() < deadline, "the emulator did not read the partial message"
        time.sleep(0.01)


def test_partial_message_and_its_fd_move_with_the_connection(emu: Any) -> None:
    a, b = emu(), emu()
    ram_fd = os.memfd_create("guest-ram")
    os.ftruncate(ram_fd, 0x10000)
    ram = mmap.mmap(ram_fd, 0x10000)
    with VfioUserClient(str(a.config.controllers[0].socket)) as c, \
            ControlClient(a.config.control_path) as src, ControlClient(b.config.control_path) as dst:
        c.negotiate()
        vendor = c.region_read(CONFIG, 0, 4)
        dma_req, read_req = m.DmaMapRequest(0x100000, 0x10000, 3, 0, os.dup(ram_fd)), m.RegionReadRequest(CONFIG, 0, 4)
        dma, dma_fds = c.conn.send(dma_req)
        read, _ = c.conn.send(read_req)
        c.send_raw(dma[:24], dma_fds)  # the fd travels with the first byte
        os.close(dma_fds[0])
        wait_buffered(src, 24)
        src.call("handover.pause", {"cntlid": 1})
        result, fds = src.call_fds("handover.export", {"cntlid": 1})
        try:
            assert result["session"]["input_fds"] == [[23, False, 1]]
            dst.call("handover.adopt", {"cntlid": 1, **result}, fds)
        finally:
            for fd in fds:
                os.close(fd)
        src.call("handover.release", {"cntlid": 1})
        dst.call("handover.start", {"cntlid": 1})
        c.send_raw(dma[24:] + read[:3])
        wait_buffered(dst, 3)
        c.send_raw(read[3:])
        assert isinstance(c.wait(dma_req.msg_id), m.DmaMapReply)
        assert c.wait(read_req.msg_id).data == vendor
        info = dst.call("session.info", {"cntlid": 1})
        assert [0x100000, 0x10000] in info["dma"] and info["buffered"] == 0
        assert src.call("session.info", {"cntlid": 1})["connected"] is False
    ram.close()
    os.close(ram_fd)
