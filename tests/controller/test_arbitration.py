"""Bounded work per loop turn: SQs are served round robin (Base 2.1 §3.4.4), and one
doorbell releasing many commands does not run them all before the loop gets control back.

The controller gets a scheduler whose deferred calls the test runs by hand, so
what one pass does is observable (no timing is asserted: a pass may stop
earlier on a slow machine, never later than its command budget).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import DirectTransport
from emulator.nvme import arbitration as ctrl_mod
from emulator.nvme.config import ControllerConfig, NamespaceConfig
from emulator.nvme.dispatch import new_controller
from emulator.nvme.namespace import Namespace
from emulator.subsystem.subsystem import Subsystem


class ManualScheduler:
    def __init__(self) -> None:
        self.soon: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.soon.append((fn, args))

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> Any:
        class Handle:
            def cancel(self) -> None:
                pass
        return Handle()

    def run_one_turn(self) -> int:
        due, self.soon = self.soon, []
        for fn, args in due:
            fn(*args)
        return len(due)


def _direct(sched: Any, ns_size: int = 1 << 20, io_queues: int = 2, **ctrl_kw: Any) -> tuple[Any, NvmeHost]:
    """A controller on one namespace driven directly (no loop), ``sched`` as its scheduler
    once the host has set up its queues: from then on it defers what does not fit a pass."""
    sub = Subsystem()
    sub.namespaces[1] = Namespace(NamespaceConfig(1, Path(tempfile.mkdtemp()) / "ns.img", ns_size), sub.nqn)
    ctrl = new_controller(ControllerConfig(1, namespaces=(1,), **ctrl_kw), sub)
    sub.controllers[1] = ctrl
    h = NvmeHost(DirectTransport(ctrl, HostMemory(8 << 20)))
    h.init(io_queues=io_queues, qsize=256)
    ctrl.scheduler = sched
    return ctrl, h


def test_one_doorbell_is_split_and_sqs_take_turns(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(ctrl_mod, "TURN_SECONDS", 3600.0)  # only the command budget cuts a pass here
    sched = ManualScheduler()
    ctrl, h = _direct(sched)
    order: list[int] = []
    execute = ctrl.execute
    ctrl.execute = lambda cmd: (order.append(cmd.sqid), execute(cmd))[1]  # type: ignore[method-assign]
    for qid in (1, 2):
        for _ in range(200):
            h.submit(qid, 0x7F, nsid=1, ring=False)  # Invalid Opcode: the cheapest command
    h.ring_sq(1)
    first = len(order)
    assert first == ctrl_mod.TURN_COMMANDS and set(order) == {1}  # one pass, then the loop
    assert sched.soon, "the rest is left for a later loop turn"
    h.ring_sq(2)
    assert len(order) == first  # a pass is already due: the doorbell only marks SQ 2 ready
    turns = 0
    while sched.run_one_turn():
        turns += 1
    assert len(order) == 400 and turns >= 400 // ctrl_mod.TURN_COMMANDS - 1
    # after the first pass: bursts of ARB_BURST, SQ 1 and SQ 2 in turn, while both have work
    rest = order[first:]
    runs: list[tuple[int, int]] = []
    for qid in rest:
        if runs and runs[-1][0] == qid:
            runs[-1] = (qid, runs[-1][1] + 1)
        else:
            runs.append((qid, 1))
    both = [r for r in runs[:-1]]  # the last run is SQ 2 alone finishing its queue
    assert all(n <= ctrl_mod.ARB_BURST for _, n in both), runs[:10]
    assert [q for q, _ in both] == [1, 2] * (len(both) // 2) + [1] * (len(both) % 2)
    for qid in (1, 2):
        assert len(h.reap(qid)) == 200


def test_a_pass_is_bounded_by_bytes(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Large transfers: a pass stops once TURN_BYTES have moved (eight 1 MiB reads per burst
    would be 8 MiB), and an SQ of small commands still gets its turn between them."""
    monkeypatch.setattr(ctrl_mod, "TURN_SECONDS", 3600.0)  # only the budgets cut a pass here
    sched = ManualScheduler()
    ctrl, h = _direct(sched, 64 << 20, mdts=8)
    sizes: list[tuple[int, int]] = []
    execute = ctrl.execute

    def spy(cmd):  # type: ignore[no-untyped-def]
        x0 = ctrl.xfer_bytes
        execute(cmd)
        sizes.append((cmd.sqid, ctrl.xfer_bytes - x0))
    ctrl.execute = spy  # type: ignore[method-assign]
    mib = 1 << 20
    buf = h.mem.alloc(mib)
    p1, p2, _ = h.build_prps(buf, mib)
    for _ in range(40):
        h.submit(1, 0x02, 1, p1, p2, cdw12=mib // 512 - 1, ring=False)  # Read, 1 MiB
        h.submit(2, 0x02, 1, buf, 0, cdw12=7, ring=False)  # Read, 4 KiB
    h.ring_sq(1)
    h.ring_sq(2)
    passes = [list(sizes)]
    while sched.soon:
        before = len(sizes)
        sched.run_one_turn()
        passes.append(sizes[before:])
    assert len(sizes) == 80
    for p in passes:
        big = [n for q, n in p if q == 1]
        assert sum(n for _, n in p) <= ctrl_mod.TURN_BYTES + mib, p  # at most one command over
        assert len(big) <= ctrl_mod.TURN_BYTES // mib, p
    # SQ 2's small reads are not held back behind SQ 1's: the SQs take turns, pass by pass
    served = [{q for q, _ in p} for p in passes]
    last_small = max(i for i, qs in enumerate(served) if 2 in qs)
    assert all(2 in served[i] or 2 in served[i + 1] for i in range(1, last_small)), served
    assert len(h.reap(1)) == 40 and len(h.reap(2)) == 40


def test_long_file_operations_run_off_the_loop(emu, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A large deallocation, a Sanitize and a Flush do their blocking system calls on a worker
    thread; the command completes afterwards with the right status and effect."""
    import os
    import threading

    from emulator.nvme import namespace as ns_mod
    threads: list[tuple[str, int]] = []
    punch, fdatasync = ns_mod.Namespace.punch, os.fdatasync

    def spy_punch(self, slba: int, nlb: int) -> None:  # type: ignore[no-untyped-def]
        threads.append(("punch", threading.get_ident()))
        punch(self, slba, nlb)

    def spy_fdatasync(fd: int) -> None:
        threads.append(("fdatasync", threading.get_ident()))
        fdatasync(fd)

    e = emu({"namespaces": [{"nsid": 1, "size": "1GiB"}], "controllers": [{"cntlid": 1}]})
    h = e.host()
    loop_thread = e.call(threading.get_ident)
    assert h.write(1, 1000, b"\x42" * 512).ok
    monkeypatch.setattr(ns_mod.Namespace, "punch", spy_punch)
    monkeypatch.setattr(ns_mod.os, "fdatasync", spy_fdatasync)
    assert h.deallocate(1, [(0, (1 << 30) // 512)]).ok
    assert h.read(1, 1000, 1).data == bytes(512)
    assert h.flush(1).ok
    assert h.admin(0x84, cdw10=0x2).ok  # Sanitize, Block Erase
    kinds = {k for k, _ in threads}
    assert kinds == {"punch", "fdatasync"}
    assert all(t != loop_thread for k, t in threads if k == "punch")
    assert any(t != loop_thread for k, t in threads if k == "fdatasync")


def test_format_and_large_copy_run_off_the_loop(emu, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Format NVM punches and syncs the namespace, and a Copy of a megabyte or more moves its
    bytes, on a worker thread; the commands complete afterwards with their effect."""
    import struct
    import threading

    from emulator.nvme import copy as copy_mod
    from emulator.nvme import namespace as ns_mod
    from emulator.nvme.spec import IoOpcode
    threads: list[tuple[str, int]] = []
    punch, copy_bytes = ns_mod.Namespace.punch, copy_mod.copy_bytes

    def spy_punch(self, slba: int, nlb: int) -> None:  # type: ignore[no-untyped-def]
        threads.append(("punch", threading.get_ident()))
        punch(self, slba, nlb)

    def spy_copy(*args: int) -> None:
        threads.append(("copy", threading.get_ident()))
        copy_bytes(*args)

    e = emu({"namespaces": [{"nsid": 1, "size": "64MiB"}], "controllers": [{"cntlid": 1}]})
    h = e.host()
    loop_thread = e.call(threading.get_ident)
    data = bytes(range(256)) * 8192  # 2 MiB
    for k in range(0, len(data), 128 << 10):
        assert h.write(1, k // 512, data[k:k + (128 << 10)]).ok
    monkeypatch.setattr(ns_mod.Namespace, "punch", spy_punch)
    monkeypatch.setattr(copy_mod, "copy_bytes", spy_copy)
    ranges = struct.pack("<I4xQH", 0, 0, 2048 - 1) + bytes(14) + struct.pack("<I4xQH", 0, 2048, 2048 - 1) + bytes(14)
    c = h.command(1, IoOpcode.COPY, nsid=1, data=ranges, cdw10=8192, cdw12=1)  # 2 ranges of 1 MiB
    assert c.ok
    assert h.read(1, 8192 + 100, 8).data == data[100 * 512:108 * 512]
    assert [k for k, _ in threads] == ["copy", "copy"] and all(t != loop_thread for _, t in threads)
    threads.clear()
    assert h.format_nvm(1, lbaf=0, ses=1).ok
    assert any(k == "punch" and t != loop_thread for k, t in threads)
    assert h.read(1, 8192, 8).data == bytes(4096)  # erased


def test_flushes_queued_together_share_one_sync(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A doorbell releasing 100 Flushes while the worker threads are busy: the Flushes join
    one job (each arrived before it started, so one fdatasync covers them all) and all
    complete successfully."""
    import threading

    from emulator.nvme import io_cmds, offload

    class ThreadSafeScheduler(ManualScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.lock = threading.Lock()

        def call_soon_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
            with self.lock:
                self.soon.append((fn, args))

    sched = ThreadSafeScheduler()
    ctrl, h = _direct(sched, io_queues=1)
    syncs: list[list[int]] = []
    real = io_cmds.sync_files
    monkeypatch.setattr(io_cmds, "sync_files", lambda fds: (syncs.append(fds), real(fds))[1])
    gate = threading.Event()
    busy = [offload._pool.submit(gate.wait, 10) for _ in range(2)]  # both workers occupied
    cids = [h.submit(1, 0x00, nsid=1, ring=False) for _ in range(100)]
    h.ring_sq(1)
    while sched.run_one_turn():
        pass
    gate.set()
    for b in busy:
        b.result()
    offload.wait_idle()
    while sched.run_one_turn():
        pass
    done = {c.cid: c for c in h.reap(1)}
    assert sorted(done) == sorted(cids) and all(c.ok for c in done.values())
    assert len(syncs) == 1, syncs


def test_suspend_completes_offloaded_commands_first(emu, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """TP4159 Suspend: every fetched command is complete before the controller is suspended,
    including one whose fdatasync is still running on a worker thread."""
    import time

    from emulator.host.lm import MigrationHost
    from emulator.nvme import namespace as ns_mod
    from emulator.nvme.spec import IoOpcode
    from tp4159_common import IO, LM_CONFIG, MMC, flush_posted
    fdatasync = ns_mod.os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        time.sleep(0.3)  # a slow disk
        fdatasync(fd)

    e = emu(LM_CONFIG)
    g, m = e.host(IO, io_queues=1), MigrationHost(e.host(MMC))
    monkeypatch.setattr(ns_mod.os, "fdatasync", slow_fdatasync)
    cid = g.submit(1, IoOpcode.FLUSH, nsid=1)
    flush_posted(g)  # the Flush is fetched and its fdatasync runs on a worker thread
    assert m.suspend(IO).ok
    assert g.poll(1, cid) is not None  # completed before the suspend, not held by it
    assert m.resume(IO).ok
