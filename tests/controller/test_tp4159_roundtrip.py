"""A live migration without QEMU (issue 5).

Two emulator instances (two subsystems, each with a migratable controller 1
and an MMC 2, over vfio-user) share the backing file of namespace 1 and the
guest's host memory (the same memfd DMA-mapped into both).  The "guest" host
driver runs I/O on the source while the source MMC logs into an LBA Migration
Queue; the source MMC suspends the controller and gets its state; the
destination MMC suspends its (never enabled) controller, sets the state in
pieces and resumes it; the guest driver switches transport and goes on with
the same admin and I/O queues, never enabling the destination.  Every command
gets exactly one completion, the data is right, and the LBA ranges logged on
both sides are exactly the writes issued; the source MMC's memory tracking
reports exactly the guest pages the source controller wrote.
"""
from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest

from emulator.host.driver import Completion, NvmeHost
from emulator.host.lm import MigrationHost
from emulator.nvme.migration import wire
from emulator.nvme.migration.wire import Esa
from emulator.nvme.spec import AdminOpcode, IoOpcode
from tp4159_common import aer_submit, aer_wait, flush_posted, markers, ranges, stalls

NLBAS = (16 << 20) // 512
QSIZE = 32


def config(ns_file: Path) -> dict[str, Any]:
    return {
        "namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512, "file": str(ns_file)}],
        "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1], "max_io_queues": 4},
                        {"cntlid": 2, "type": "mmc"}],
    }


class Guest:
    """The guest's view: submitted commands, every completion reaped, a data model."""

    def __init__(self, h: NvmeHost, rng: random.Random) -> None:
        self.h = h
        self.rng = rng
        self.submitted: list[tuple[int, int]] = []
        self.completed: list[tuple[int, int, int]] = []  # (qid, cid, status)
        self.writes: list[tuple[int, int]] = []
        self.model: dict[int, int] = {}  # LBA -> fill byte
        self.reads: dict[tuple[int, int], tuple[int, bytes]] = {}  # -> (buffer, expected)
        real_reap: Callable[[int], list[Completion]] = h.reap

        def reap(qid: int) -> list[Completion]:
            got = real_reap(qid)
            self.completed += [(qid, c.cid, c.status) for c in got]
            return got
        h.reap = reap  # type: ignore[method-assign]

    def submit_write(self, qid: int) -> int:
        nlb = self.rng.choice((1, 2, 8, 16))
        slba = self.rng.randrange(0, 4096 - nlb)
        fill = self.rng.randrange(1, 256)
        buf = self.h.mem.alloc(nlb * 512)
        self.h.mem.write(buf, bytes([fill]) * (nlb * 512))
        p1, p2, _ = self.h.build_prps(buf, nlb * 512)
        cid = self.h.submit(qid, IoOpcode.WRITE, nsid=1, prp1=p1, prp2=p2, cdw10=slba,
                            cdw12=nlb - 1)
        self.submitted.append((qid, cid))
        self.writes.append((slba, nlb))
        self.model.update((lba, fill) for lba in range(slba, slba + nlb))
        return cid

    def submit_read(self, qid: int, avoid: frozenset[int] = frozenset()) -> int:
        """Read 8 LBAs that no write still in flight (``avoid``) touches: queues are
        fetched one after the other at Resume, not in submission order."""
        choices = [lba for lba in sorted(self.model)
                   if not avoid.intersection(range(lba, lba + 8))] or [8000]
        slba = self.rng.choice(choices)
        buf = self.h.mem.alloc(4096)
        cid = self.h.submit(qid, IoOpcode.READ, nsid=1, prp1=buf, cdw10=slba, cdw12=7)
        self.submitted.append((qid, cid))
        self.reads[(qid, cid)] = (buf, self.expect(slba, 8))
        return cid

    def expect(self, slba: int, nlb: int) -> bytes:
        return b"".join(bytes([self.model.get(lba, 0)]) * 512 for lba in range(slba, slba + nlb))

    def settle(self) -> None:
        """Reap until every submitted command has completed (or time out)."""
        for qid in (1, 2):
            q = self.h.queues[qid]
            for cid in list(q.outstanding):
                if q.done.pop(cid, None) is None:
                    self.h.wait(qid, cid)
            q.done.clear()

    def burst(self, n: int, reads: bool = True) -> None:
        """Submit n commands round-robin without waiting; ring each queue once."""
        written: set[int] = set()
        for i in range(n):
            qid = 1 + i % 2
            if reads and i % 3 == 2:
                self.submit_read(qid, frozenset(written))
            else:
                self.submit_write(qid)
                slba, nlb = self.writes[-1]
                written.update(range(slba, slba + nlb))


@pytest.mark.parametrize("before", [58, 45], ids=["cq-tails-0-after-a-wrap", "mid-queue"])
def test_live_migration_round_trip(emu: Any, tmp_path: Path, before: int) -> None:
    src, dst = emu(config(tmp_path / "ns1.img")), emu(config(tmp_path / "ns1.img"))
    h = src.host(1, io_queues=2, qsize=QSIZE)
    g = Guest(h, random.Random(before))
    mmhs, mmhd = MigrationHost(src.host(2)), MigrationHost(dst.host(2))

    # 1. I/O on the source, logged into the LBA Migration Queue.
    lmq = mmhs.udmq(1, slots=512)
    assert mmhs.log_start(lmq.cdqid).ok
    assert mmhs.track_memory(1, [(h.mem.iova, h.mem.size >> 12)]).ok  # 4 KiB granules
    aer_cid = aer_submit(h)  # stays outstanding across the migration
    for i in range(before):  # completes in order: CQ 1 gets before/2 entries...
        g.submit_write(1 + i % 2) if i % 4 != 3 else g.submit_read(1 + i % 2)
        g.settle()
    g.burst(6)  # ...plus a burst whose completions are left unreaped in the CQs
    flush_posted(h)  # (all fetched by the source before the Suspend)
    assert stalls(h, 0, aer_cid, 0.05)  # (polls the admin CQ only)

    # 2. Suspend, then the guest keeps submitting: nothing is fetched.
    source_reads = [buf for buf, _ in g.reads.values()]  # all done by the source
    assert mmhs.suspend(1).ok
    before_suspend = len(g.completed)
    g.burst(9)
    flush_posted(h)
    assert stalls(h, 1, g.submitted[-1][1]) and len(g.completed) - before_suspend <= 6
    state, csup = mmhs.get_state(1)
    assert csup
    # Dirty guest memory: every page the source wrote (CQ entries, read data).
    dirty, susp = mmhs.dirty_ranges(1)
    pages = {a + off for a, n in dirty for off in range(0, n, 4096)}
    wrote = {h.queues[q].cq_iova for q in (1, 2)} | {buf & ~0xFFF for buf in source_reads}
    assert susp and wrote <= pages and len(pages) == len(wrote), (sorted(pages - wrote))
    assert mmhs.dirty_ranges(1) == ([], True)  # suspended and all reported: done
    _, _, _, cq1_tail, iocqa = wire.IOCQ_STATE.unpack_from(state, 48 + 8 + 2 * 24)[1:]
    if before == 58:  # 32 completions in a 32-entry CQ: tail 0, slot 0 holds phase 1
        assert cq1_tail == 0 and iocqa & wire.IOCQA_S0PT
    source_log = mmhs.drain(lmq)
    assert markers(source_log) == [Esa.FIRST, Esa.LAST_SUSPENDED]

    source_writes = list(g.writes[:-sum(1 for k in g.submitted[-9:] if k not in g.reads)])

    # 3. The destination: suspend the fresh controller, set the state in pieces,
    #    let the guest's memory reach it, resume.  (Logging cannot start before:
    #    Track Send on a suspended controller is Controller Suspended.)
    assert mmhd.suspend(1).ok
    assert mmhd.set_state(1, state, piece=256).ok
    source_transport = h.t
    h.t = dst.connect(1, memory=h.mem)  # same memfd; the driver keeps its queues
    assert mmhd.resume(1).ok
    g.settle()  # the 9 commands queued while suspended complete on the destination

    # 4. Go on on the destination with the same queues (CQs wrap again), logged.
    lmq_d = mmhd.udmq(1, slots=512)
    assert mmhd.log_start(lmq_d.cdqid).ok
    resumed_writes = len(g.writes)
    for _ in range(3):
        g.burst(12)
        g.settle()
    assert struct_cntlid(h) == 1  # the admin queue works too
    h.t.mmio_write(0x1000 + 2 * 9 * 4, 4, 1)  # doorbell of a missing SQ: an error event
    c = aer_wait(h, aer_cid)
    assert c is not None and c.dw0 & 0x7 == 0  # the migrated AER completes there
    dest_log = mmhd.drain(lmq_d)

    # No completion lost or duplicated, all successful.
    io = [(q, cid, st) for q, cid, st in g.completed if q in (1, 2)]
    assert Counter((q, cid) for q, cid, _ in io) == Counter(g.submitted)
    assert all(st == 0 for _, _, st in io)
    # Data read back as written, wherever it was read.
    for key, (buf, expected) in g.reads.items():
        assert h.mem.read(buf, len(expected)) == expected, key
    for slba in range(0, 4096, 256):
        assert h.read(1, slba, 8).data == g.expect(slba, 8)
    # The logged ranges are exactly the writes issued: on the source, every write
    # it processed (commands run in doorbell order, queues interleaved per
    # burst); on the destination, every write after logging started there.
    assert markers(dest_log) == [Esa.FIRST]
    assert Counter(ranges(source_log)) == Counter(source_writes)
    assert Counter(ranges(dest_log)) == Counter(g.writes[resumed_writes:])
    source_transport.close()


def struct_cntlid(h: NvmeHost) -> int:
    c = h.admin(AdminOpcode.IDENTIFY, read_len=4096, cdw10=1)
    assert c.ok, c
    return int.from_bytes(c.data[78:80], "little")
