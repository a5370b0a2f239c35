"""Shared pieces of the TP4159 host-driver tests (issue 5): a subsystem with a
migratable controller (1) and an MMC (2), hosts on both over vfio-user, and
status helpers."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import pytest

from emulator.host.driver import Completion, NvmeHost
from emulator.host.lm import MigrationHost
from emulator.nvme.migration import wire
from emulator.nvme.spec import AdminOpcode, CommandSpecific as CS, Generic

NS_BYTES = 16 << 20
LM_CONFIG: dict[str, Any] = {
    "namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512}],
    "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1], "max_io_queues": 4},
                    {"cntlid": 2, "type": "mmc"}],
}
IO, MMC = 1, 2


@dataclass
class Lm:
    emu: Any
    g: NvmeHost  # the "guest" driving the migratable controller
    m: MigrationHost  # the migration management host on the MMC

    def ctrl(self, cntlid: int) -> Any:
        return self.emu.subsystem.controllers[cntlid]


@pytest.fixture
def lm(emu: Any) -> Lm:
    e = emu(LM_CONFIG)
    return Lm(e, e.host(IO, io_queues=2), MigrationHost(e.host(MMC)))


def specific(c: Completion, sc: CS) -> None:
    assert (c.sct, c.sc) == (1, sc), c
    assert c.dnr


def generic(c: Completion, sc: Generic) -> None:
    assert (c.sct, c.sc) == (0, sc), c


def invalid_field(c: Completion) -> None:
    generic(c, Generic.INVALID_FIELD)


def aer_submit(h: NvmeHost) -> int:
    return h.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST)


def aer_wait(h: NvmeHost, cid: int, timeout: float = 2.0) -> Completion | None:
    """The AER's completion, or None if none arrives (admin commands keep flowing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c = h.poll(0, cid)
        if c is not None:
            return c
        time.sleep(0.005)
    return None


def flush_posted(h: NvmeHost) -> None:
    """Doorbell writes are posted: a register read on the same socket orders them
    before anything the MMC (another socket) does next."""
    h.t.mmio_read(0x1C, 4)  # CSTS


def stalls(h: NvmeHost, qid: int, cid: int, wait: float = 0.2) -> bool:
    """True if the command gets no completion within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if h.poll(qid, cid) is not None:
            return False
        time.sleep(0.005)
    return True


def one_shot(c: Completion) -> tuple[int, int]:
    """(AEI, CDQID) of a One-Shot asynchronous event completion."""
    assert c.ok and c.dw0 & 0x7 == 0x4, c
    return (c.dw0 >> 8) & 0xFF, c.dw1 & 0xFFFF


def write(h: NvmeHost, slba: int, nlb: int, fill: int = 0x5A, qid: int = 1) -> Completion:
    c = h.write(1, slba, bytes([fill]) * (nlb * 512), qid=qid)
    assert c.ok, c
    return c


def ranges(entries: list[Any]) -> list[tuple[int, int]]:
    return [(e.slba, e.nlb) for e in entries if e.is_range]


def markers(entries: list[Any]) -> list[int]:
    return [e.esa for e in entries if e.lbacir == wire.Lbacir.NO_RANGE]


def hand_over(mmhs: MigrationHost, mmhd: MigrationHost, g: NvmeHost, dst: Any) -> Any:
    """Migrate the suspended controller IO to ``dst`` (Get Controller State on the source,
    Set Controller State on the destination), move the guest ``g`` over and resume it
    there; returns the guest's old transport (the caller closes it)."""
    state, _ = mmhs.get_state(IO)
    assert mmhd.suspend(IO).ok
    assert mmhd.set_state(IO, state).ok
    source_transport = g.t
    g.t = dst.connect(IO, memory=g.mem)
    assert mmhd.resume(IO).ok
    return source_transport
