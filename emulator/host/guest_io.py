"""A guest-like random I/O workload with a verify model, run in steps.

``RandomIo(host, nsid, blocks)`` submits random writes and reads of one
4 KiB block each on I/O queue 1, from buffers in the host driver's memory.
It never has two commands on one block at a time, so the model (block ->
the last data written and completed) is exact:

* every command must get exactly one completion (an unknown or repeated CID
  is an error), successful;
* a read returns what the model says;
* ``step`` may leave commands in flight, and SQ entries written but not rung
  (a vCPU stopped between the SQE store and the doorbell), for a migration
  to carry; ``drain`` rings and waits for everything.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from emulator.host.driver import NvmeHost
from emulator.nvme.spec import IoOpcode

BLOCK = 4096


@dataclass
class _Cmd:
    op: int
    block: int
    buf: int
    data: bytes | None  # what a write wrote


class VerifyError(AssertionError):
    pass


class RandomIo:
    def __init__(self, host: NvmeHost, nsid: int, blocks: int, lba_size: int = 512, seed: int = 1,
                 qid: int = 1) -> None:
        self.host, self.nsid, self.blocks, self.lba_size, self.qid = host, nsid, blocks, lba_size, qid
        self.rng = random.Random(seed)
        self.model: dict[int, bytes] = {}  # block -> content (absent: never written by us)
        self.busy: dict[int, _Cmd] = {}  # cid -> command in flight
        self.blocks_busy: set[int] = set()
        self.unrung = 0
        self.completions = self.writes = self.reads = self.submitted = 0
        self.serial = 0

    def _submit(self, op: int, block: int, ring: bool) -> None:
        h = self.host
        buf = h.mem.alloc(BLOCK)
        data = None
        if op == IoOpcode.WRITE:
            self.serial += 1
            data = (self.serial.to_bytes(8, "little") + block.to_bytes(8, "little")) * (BLOCK // 16)
            h.mem.write(buf, data)
        nlb = BLOCK // self.lba_size
        slba = block * nlb
        cid = h.submit(self.qid, op, nsid=self.nsid, prp1=buf, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32,
                       cdw12=nlb - 1, ring=ring)
        if cid in self.busy:
            raise VerifyError(f"CID {cid} reused while in flight")
        self.busy[cid] = _Cmd(op, block, buf, data)
        self.submitted += 1
        self.blocks_busy.add(block)
        self.unrung = 0 if ring else self.unrung + 1

    def reap(self) -> int:
        got = self.host.reap(self.qid)
        q = self.host.queues[self.qid]
        for c in got:
            q.done.pop(c.cid, None)
            cmd = self.busy.pop(c.cid, None)
            if cmd is None:
                raise VerifyError(f"completion for CID {c.cid}, which is not in flight (a second completion?)")
            if not c.ok:
                raise VerifyError(f"CID {c.cid} failed: {c!r}")
            self.completions += 1
            self.blocks_busy.discard(cmd.block)
            if cmd.op == IoOpcode.WRITE:
                assert cmd.data is not None
                self.model[cmd.block] = cmd.data
                self.writes += 1
            else:
                got_data = self.host.mem.read(cmd.buf, BLOCK)
                want = self.model.get(cmd.block)
                if want is not None and got_data != want:
                    raise VerifyError(f"block {cmd.block} reads back wrong")
                self.reads += 1
            self.host.mem.free(cmd.buf, BLOCK)
        return len(got)

    def step(self, n: int = 16, leave_in_flight: bool = True, unrung: int = 0) -> None:
        """Reap what completed, then submit up to ``n`` commands on free blocks; the
        last ``unrung`` of them are not rung (a stopped vCPU rings them later)."""
        if self.unrung:
            self.host.ring_sq(self.qid)
            self.unrung = 0
        self.reap()
        q = self.host.queues[self.qid]
        for i in range(n):
            if len(self.busy) >= q.size - 2:
                break
            block = self.rng.randrange(self.blocks)
            if block in self.blocks_busy:
                continue
            op = IoOpcode.WRITE if self.rng.random() < 0.6 or block not in self.model else IoOpcode.READ
            self._submit(op, block, ring=not (leave_in_flight and i >= n - unrung))
        if not leave_in_flight:
            self.drain()

    def burst(self, n: int) -> None:
        """Submit ``n`` commands, reaping as the queue fills (leaves the last in flight)."""
        target = self.submitted + n
        while self.submitted < target:
            before = self.submitted
            self.step(min(32, target - self.submitted))
            if self.submitted == before:
                time.sleep(0.0005)

    def drain(self, timeout: float = 30.0) -> None:
        if self.unrung:
            self.host.ring_sq(self.qid)
            self.unrung = 0
        deadline = time.monotonic() + timeout
        while self.busy:
            if not self.reap():
                if time.monotonic() > deadline:
                    raise VerifyError(f"{len(self.busy)} commands never completed")
                time.sleep(0.0005)

    def verify_all(self) -> None:
        """Read every block the model knows and compare."""
        self.drain()
        for block in sorted(self.model):
            self._submit(IoOpcode.READ, block, ring=True)
            self.drain()
