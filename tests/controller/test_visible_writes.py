"""Device writes as DMA_WRITE messages, end to end through the host driver over vfio-user (issue 16)."""
from __future__ import annotations

import os

from emulator.host.memory import HostMemory


def _stats(e) -> dict[str, int]:
    def get() -> dict[str, int]:
        session = e.rt.runtime.servers[1].session
        return dict(session.visible.stats)
    return e.call(get)


def test_all_mode_data_and_completions_by_message(emu):
    e = emu(visible_writes="all")
    h = e.host(serve_dma=True, use_interrupts=True)
    data = os.urandom(128 * 1024)
    assert h.write(1, 0, data).ok
    assert h.read(1, 0, len(data) // 512).data == data
    s = _stats(e)
    assert s["messages"] > 0 and s["bytes"] >= len(data) and s["errors"] == 0


def test_boot_mode_sends_only_what_lands_below_1_mib(emu):
    e = emu()
    high = e.host(serve_dma=True)                      # host memory at 4 GiB: plain mmap stores
    data = os.urandom(4096)
    assert high.write(1, 8, data).ok and high.read(1, 8, 8).data == data
    assert _stats(e)["messages"] == 0
    high.close()
    e.hosts.clear()
    low = e.host(serve_dma=True, memory=HostMemory(2 << 20, iova=0x10000))  # queues below 1 MiB
    assert low.read(1, 8, 8).data == data
    assert _stats(e)["messages"] > 0
