"""The I/O fast path caches its per-call conditions (emulator/nvme/fastpath.py, fastgen.py):
each change between two calls on the same controller must make the next call step aside
(or see the new state), on the C and the Python implementation."""
from __future__ import annotations

import os
import threading
from typing import Any

from emulator.nvme import fastpath
from emulator.nvme.namespace import Namespace
from emulator.nvme.spec import AdminOpcode, Generic, IoOpcode
from test_fastpath import CFG, path, sealed_host, served  # noqa: F401  (path: the fixture)

ctrl_of = lambda e: e.subsystem.controllers[1]  # noqa: E731


def test_an_admin_command_is_never_taken_for_a_read(emu: Any, path: str) -> None:
    """Get Log Page is admin opcode 02h, as Read is for the NVM command set: with an NSID
    of a namespace and CDW10..12 that would make an LBA range, it stays a Get Log Page."""
    e, h = sealed_host(emu)
    assert h.write(1, 2, b"\xab" * 512).ok  # the fast path has its namespace table now
    before = served(e)[path]
    smart = h.get_log_page(0x02, 4, nsid=1)  # CDW10 = 02h, NUMD 0: "LBA 2, 1 block"
    assert smart.data != b"\xab" * 4  # bytes 0..3 of the SMART / Health log
    assert served(e)[path] == before


def test_a_namespace_detached_between_two_calls(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    data = os.urandom(4096)
    assert h.write(2, 0, data, lba_size=4096).ok
    before = served(e)[path]
    assert h.ns_attach(2, [1], detach=True).ok
    c = h.read(2, 0, 1, lba_size=4096)
    assert not c.ok and c.sc in (Generic.INVALID_NAMESPACE, Generic.INVALID_FIELD)
    assert served(e)[path] == before
    assert h.ns_attach(2, [1]).ok
    assert h.read(2, 0, 1, lba_size=4096).data == data
    assert served(e)[path] == before + 1


def test_write_uncorrectable_marked_and_healed_between_two_calls(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    data = os.urandom(4096)
    assert h.write(1, 0, data).ok and h.read(1, 0, 8).ok
    before = served(e)[path]
    assert h.command(1, IoOpcode.WRITE_UNCORRECTABLE, nsid=1, cdw10=100, cdw12=0).ok
    assert h.read(1, 0, 8).ok  # no overlap: the normal path reads it
    assert h.read(1, 100, 1).sct == 2  # Unrecovered Read Error
    assert served(e)[path] == before
    assert h.write(1, 100, os.urandom(512)).ok  # heals the mark (normal path)
    assert served(e)[path] == before
    assert h.read(1, 0, 8).data == data
    assert served(e)[path] == before + 1


def test_a_format_between_two_calls_changes_the_geometry(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    assert h.write(1, 8, os.urandom(4096)).ok
    before = served(e)[path]
    assert h.format_nvm(1, lbaf=1).ok  # 4096-byte LBAs now, every LBA deallocated
    data = os.urandom(8192)
    assert h.write(1, 3, data, lba_size=4096).ok
    assert h.read(1, 3, 2, lba_size=4096).data == data
    assert h.read(1, 0, 1, lba_size=4096).data == bytes(4096)
    assert served(e)[path] == before + 3
    nsze = (16 << 20) // 4096
    assert h.read(1, nsze - 1, 2, lba_size=4096).sc == Generic.LBA_OUT_OF_RANGE


def test_a_sanitize_started_between_two_calls(emu: Any, path: str, monkeypatch: Any) -> None:
    """While the sanitize operation runs (its erase held here), I/O is aborted with
    Sanitize In Progress by the normal path; afterwards GDE is set until a Write."""
    e, h = sealed_host(emu)
    assert h.read(1, 0, 8).ok
    before = served(e)[path]
    go = threading.Event()
    punch = Namespace.punch

    def held_punch(self: Namespace, slba: int, nlb: int) -> None:
        go.wait(10)
        punch(self, slba, nlb)
    monkeypatch.setattr(Namespace, "punch", held_punch)
    cid = h.submit(0, AdminOpcode.SANITIZE, cdw10=0x2)  # Block Erase, on a worker
    c = h.read(1, 0, 8)
    assert c.sc == Generic.SANITIZE_IN_PROGRESS
    assert served(e)[path] == before
    go.set()
    assert h.wait(0, cid).ok
    assert h.write(1, 0, os.urandom(4096)).ok  # clears GDE (normal path)
    assert served(e)[path] == before
    assert h.read(1, 0, 8).ok and served(e)[path] == before + 1


def test_a_write_observer_registered_between_two_calls(emu: Any, path: str) -> None:
    """An on_write observer the fast path does not know (vfio-user migration's dirty
    logging is one) must see every write: the next call steps aside."""
    e, h = sealed_host(emu)
    assert h.write(1, 0, os.urandom(4096)).ok
    before = served(e)[path]
    seen: list[tuple[int, int, int]] = []
    hook = lambda ctrl, nsid, slba, nlb, dealloc: seen.append((nsid, slba, nlb))  # noqa: E731
    e.call(lambda: ctrl_of(e).observers.on_write.append(hook))
    assert h.write(1, 64, os.urandom(1024)).ok
    assert seen == [(1, 64, 2)] and served(e)[path] == before
    e.call(lambda: ctrl_of(e).observers.on_write.remove(hook))
    assert h.write(1, 64, os.urandom(1024)).ok and served(e)[path] == before + 1


def test_a_data_method_replaced_on_the_namespace_between_two_calls(emu: Any, path: str) -> None:
    e, h = sealed_host(emu)
    data = os.urandom(4096)
    assert h.write(1, 0, data).ok
    before = served(e)[path]
    ns = e.subsystem.namespaces[1]
    calls: list[int] = []
    original = ns.read_into

    def read_into(slba: int, views: list[memoryview]) -> None:
        calls.append(slba)
        original(slba, views)
    e.call(lambda: setattr(ns, "read_into", read_into))
    assert h.read(1, 0, 8).data == data
    assert calls == [0] and served(e)[path] == before
    e.call(lambda: delattr(ns, "read_into"))
    assert h.read(1, 0, 8).data == data and served(e)[path] == before + 1


def test_a_namespace_deleted_and_created_between_two_calls(emu: Any, path: str) -> None:
    e, h = sealed_host(emu, {**CFG, "subsystem": {"capacity": "64MiB", "max_namespaces": 4}})
    assert h.read(2, 0, 1, lba_size=4096).ok
    before = served(e)[path]
    assert h.ns_attach(2, [1], detach=True).ok and h.ns_delete(2).ok
    assert h.read(2, 0, 1, lba_size=4096).sc == Generic.INVALID_NAMESPACE
    c = h.ns_create(1024, flbas=0)  # 512-byte LBAs this time
    assert c.ok
    nsid = c.dw0
    assert h.ns_attach(nsid, [1]).ok
    data = os.urandom(1024)
    assert h.write(nsid, 1022, data).ok and h.read(nsid, 1022, 2).data == data
    assert h.read(nsid, 1023, 2).sc == Generic.LBA_OUT_OF_RANGE
    assert served(e)[path] == before + 2


def test_the_sq_head_cq_tail_and_phase_after_many_wraps(emu: Any, path: str) -> None:
    """The C path derives SQ head, CQ tail and phase from the count it returns."""
    e, h = sealed_host(emu, qsize=5)
    data = os.urandom(512)
    assert h.write(1, 9, data).ok
    for _ in range(23):
        assert h.read(1, 9, 1).data == data
    sq, cq = e.call(lambda: (ctrl_of(e).sqs[1], ctrl_of(e).cqs[1]))
    q = h.queues[1]
    assert (sq.head, cq.tail) == (q.sq_tail, q.cq_head) == (24 % 5, 24 % 5)
    assert cq.phase == q.phase
    assert served(e)[path] >= 24 and fastpath.PATH == path


def test_a_controller_state_restored_between_two_calls(emu: Any, path: str) -> None:
    """Controller.restore (a hand-over, a migration) brings new SQ and CQ objects: the
    per-SQ tables are made again, and the I/O goes on where the rings are."""
    e, h = sealed_host(emu)
    data = os.urandom(4096)
    assert h.write(1, 0, data).ok
    before = served(e)[path]
    ctrl = ctrl_of(e)
    old = e.call(lambda: ctrl.sqs[1])
    e.call(lambda: ctrl.import_state(ctrl.export_state()))
    assert e.call(lambda: ctrl.sqs[1]) is not old
    for _ in range(3):
        assert h.read(1, 0, 8).data == data
    assert served(e)[path] == before + 3
