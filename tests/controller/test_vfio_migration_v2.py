"""vfio-user migration v2 (issue 15): a VMM-style client moves a VM between two emulator
instances, A -> B -> A, while its guest runs random I/O with a verify model.

At each switch (both devices stopped) the destination's RAM equals the source's,
including the pages the device wrote (completion entries, read data), and the
destination namespace file equals the source's.  Every command gets exactly one
completion and every read returns the model's data, across both switches."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emulator.host.guest_io import RandomIo
from emulator.host.vmm import Vmm, VmRam, get_state, read_stream, set_state
from emulator.subsystem.migstream import SECTION, Kind
from emulator.vfio_user import messages as m
from emulator.vfio_user.client import VfioUserClient, VfioUserError
from emulator.vfio_user.migration import MigState
from lm_helpers import sparse_diff
from tp4159_common import lm  # noqa: F401  (fixture)

NS_BYTES = 16 << 20
BLOCKS = 1024  # the guest's working set: the first 4 MiB


def config(shared_file: str | None = None) -> dict[str, Any]:
    ns: dict[str, Any] = {"nsid": 1, "size": "16MiB", "lba_size": 512}
    if shared_file is not None:
        ns.update(file=shared_file, shared_storage=True)
    return {"namespaces": [ns], "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1]}]}


def ns_file(e: Any) -> Path:
    return Path(e.config.namespaces[0].file)


def test_vm_migrates_there_and_back_under_random_io(emu: Any) -> None:
    a, b = emu(config()), emu(config())
    vmm = Vmm(a.rt.socket(1), ram_bytes=16 << 20)
    guest = RandomIo(vmm.host, 1, BLOCKS, seed=15)
    try:
        for _ in range(20):
            guest.step(16)
        checks: list[tuple[bool, list[int]]] = []
        for src, dst in ((a, b), (b, a)):
            def compare(old: VmRam, new: VmRam) -> None:  # both devices stopped
                checks.append((bytes(old.view) == bytes(new.view), sparse_diff(ns_file(src), ns_file(dst), NS_BYTES)))
            guest.drain()
            guest.step(8, unrung=3)  # the last step before the stop leaves SQEs not rung
            rep = vmm.migrate(dst.rt.socket(1), lambda: guest.step(24, unrung=2), before_switch=compare)
            assert guest.busy and guest.unrung  # commands in flight across the switch
            assert checks[-1][0], "destination RAM differs from the source's at the switch"
            assert checks[-1][1] == [], f"namespace differs at offsets {checks[-1][1]}"
            assert rep.device_pages_reported > 0  # the device's CQ and read-data writes were logged
            assert rep.stream_bytes > 0 and rep.rounds >= 1
            # the guest goes on on the destination with the same queues; its MSI-X vector
            # (table restored from the stream, eventfd given by the VMM) fires there
            guest.drain()
            while vmm.host.t.wait_irq(1, 0):
                pass
            guest.step(4, leave_in_flight=False)
            assert vmm.host.t.wait_irq(1, 10.0), "no MSI-X interrupt from the destination"
            for _ in range(10):
                guest.step(16)
            guest.drain()
        guest.drain()
        guest.verify_all()
        assert guest.completions >= guest.writes + guest.reads and guest.writes > 100
        assert not guest.busy
    finally:
        vmm.close()


def test_source_keeps_running_when_the_destination_refuses(emu: Any) -> None:
    """A failed migration (destination refuses the stream) leaves the source RUNNING, nothing lost."""
    a, b = emu(config()), emu(config())
    vmm = Vmm(a.rt.socket(1), ram_bytes=16 << 20)
    guest = RandomIo(vmm.host, 1, BLOCKS, seed=3)
    try:
        for _ in range(5):
            guest.step(16)

        def corrupt(old: VmRam, new: VmRam) -> None:
            raise RuntimeError("switch refused")
        with pytest.raises(RuntimeError):
            vmm.migrate(b.rt.socket(1), lambda: guest.step(8), before_switch=corrupt)
        assert get_state(vmm.client) == MigState.RUNNING
        for _ in range(5):
            guest.step(16)
        guest.drain()
        guest.verify_all()
    finally:
        vmm.close()


def _stop_copy_stream(e: Any) -> tuple[bytes, Vmm, RandomIo]:
    """A whole stream from RUNNING -> STOP_COPY of a controller with some data written."""
    vmm = Vmm(e.rt.socket(1), ram_bytes=8 << 20)
    guest = RandomIo(vmm.host, 1, 64, seed=7)
    for _ in range(4):
        guest.step(8, leave_in_flight=False)
    assert vmm.host.write(1, 1000 * 8, b"\xee" * 4096).ok  # far from the guest's blocks
    set_state(vmm.client, MigState.STOP_COPY)
    out = bytearray()
    read_stream(vmm.client, out.extend)
    return bytes(out), vmm, guest


def _section_offset(stream: bytes, kind: Kind) -> int:
    pos = 0
    while pos < len(stream):
        k, _, _, length, _ = SECTION.unpack_from(stream, pos)
        if k == kind:
            return pos
        pos += SECTION.size + length
    raise AssertionError(f"no {kind.name} section")


def _resume(e: Any, stream: bytes) -> tuple[VfioUserClient, Exception | None, dict[str, Any]]:
    """RESUMING, the stream, STOP; the controller's state as it was in RESUMING."""
    dst = VfioUserClient(e.rt.socket(1))
    dst.negotiate()
    set_state(dst, MigState.RESUMING)
    before = e.call(lambda: e.subsystem.controllers[1].export_state(0.0))
    err: Exception | None = None
    try:
        for i in range(0, len(stream), 64 << 10):
            dst.call(m.MigDataWriteRequest(stream[i:i + 64 << 10]))
        set_state(dst, MigState.STOP)
    except VfioUserError as ex:
        err = ex
    return dst, err, before


@pytest.mark.parametrize("damage", ["flipped byte", "truncated tail", "wrong version"])
def test_corrupt_stream_is_refused(emu: Any, damage: str) -> None:
    """Refused on RESUMING (EINVAL): the destination's controller and namespace (data
    and allocation) untouched; the source returns to RUNNING and its guest carries on
    with all its data."""
    a, b = emu(config()), emu(config())
    old = Vmm(b.rt.socket(1), ram_bytes=8 << 20)  # data of an earlier life on the destination
    for blk in range(0, 96, 2):  # where the stream writes too; not at block 1000
        assert old.host.write(1, blk * 8, bytes([blk + 1]) * 4096).ok
    old.close()
    b_file, b_copy = ns_file(b), b.state_dir / "before.img"
    shutil.copyfile(b_file, b_copy)
    nuse = b.call(lambda: b.subsystem.namespaces[1].nuse())
    stream, vmm, guest = _stop_copy_stream(a)
    bad = bytearray(stream)
    if damage == "flipped byte":  # in the Controller State: every DATA section was written before
        bad[_section_offset(stream, Kind.CONTROLLER) + SECTION.size + 40] ^= 0x40
    elif damage == "truncated tail":
        del bad[-100:]
    else:
        bad[16 + 8] = 2  # HEADER body: magic (8 bytes), then version u32
    dst, err, before = _resume(b, bytes(bad))
    assert isinstance(err, VfioUserError) and err.errno == errno.EINVAL
    after = b.call(lambda: b.subsystem.controllers[1].export_state(0.0))
    assert after["state"] == before["state"]  # the destination controller is untouched
    assert get_state(dst) in (MigState.RESUMING, MigState.ERROR)
    # ... and so is its namespace: data and allocation as before the stream
    assert sparse_diff(b_copy, b_file, NS_BYTES) == []
    assert b.call(lambda: b.subsystem.namespaces[1].nuse()) == nuse
    dst.reset()
    assert get_state(dst) == MigState.RUNNING
    dst.close()
    # the source goes back to RUNNING (STOP_COPY -> STOP -> RUNNING) with nothing lost
    set_state(vmm.client, MigState.RUNNING)
    assert get_state(vmm.client) == MigState.RUNNING
    for _ in range(4):
        guest.step(8)
    guest.verify_all()
    vmm.close()


def test_shared_storage_streams_no_user_data(emu: Any, tmp_path: Path) -> None:
    shared = str(tmp_path / "shared-ns1.img")
    a = emu(config(shared))
    stream, vmm, guest = _stop_copy_stream(a)
    assert len(stream) < 64 << 10  # states only: no 4 KiB blocks of user data
    assert guest.writes > 0
    set_state(vmm.client, MigState.RUNNING)
    vmm.close()


def test_vm_migrates_on_shared_storage(emu: Any, tmp_path: Path) -> None:
    """Both instances on one backing file: the stream carries the states only, and the
    guest finds all its data on the destination (nothing deallocated there)."""
    shared = str(tmp_path / "shared-ns1.img")
    a, b = emu(config(shared)), emu(config(shared))
    vmm = Vmm(a.rt.socket(1), ram_bytes=16 << 20)
    guest = RandomIo(vmm.host, 1, BLOCKS, seed=4)
    try:
        for _ in range(10):
            guest.step(16)
        rep = vmm.migrate(b.rt.socket(1), lambda: guest.step(16))
        assert rep.stream_bytes < 64 << 10
        for _ in range(10):
            guest.step(16)
        guest.drain()
        guest.verify_all()
        assert guest.writes > 50
    finally:
        vmm.close()


def test_dma_logging_reports_the_device_writes(emu: Any) -> None:
    """DMA_LOGGING_* over the Track Memory Changes mechanism: the page size asked for
    or the nearest supported one, reported back; the pages the device wrote."""
    from emulator.host.memory import PAGE
    from emulator.vfio_user import protocol as p
    from emulator.vfio_user.migration import (FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
                                              FEATURE_DMA_LOGGING_STOP, LOGGING_HEAD, LOGGING_RANGE, LOGGING_REPORT)
    a = emu(config())
    vmm = Vmm(a.rt.socket(1), ram_bytes=8 << 20)
    c, ram = vmm.client, vmm.ram
    try:
        def start(page: int) -> int:
            reply = c.device_feature(p.DEVICE_FEATURE_SET | FEATURE_DMA_LOGGING_START,
                                     LOGGING_HEAD.pack(page, 1, 0) + LOGGING_RANGE.pack(ram.iova, ram.size))
            return LOGGING_HEAD.unpack_from(reply.data)[0]

        def stop() -> None:
            c.device_feature(p.DEVICE_FEATURE_SET | FEATURE_DMA_LOGGING_STOP, LOGGING_HEAD.pack(0, 0, 0))

        def report(page: int) -> np.ndarray:
            n = ram.size // page
            reply = c.device_feature(p.DEVICE_FEATURE_GET | FEATURE_DMA_LOGGING_REPORT,
                                     LOGGING_REPORT.pack(ram.iova, ram.size, page), 8 + 24 + 8 * ((n + 63) // 64))
            bits = np.unpackbits(np.frombuffer(reply.data, np.uint8, offset=24), bitorder="little")
            assert not bits[n:].any()
            return np.flatnonzero(bits[:n])
        assert start(512) == 4096
        stop()
        assert start(1 << 30) == 4 << 20  # MAXMRTG: 4 MiB granules
        stop()
        with pytest.raises(VfioUserError) as e:  # more than 2^24 granules even at 4 MiB
            c.device_feature(p.DEVICE_FEATURE_SET | FEATURE_DMA_LOGGING_START,
                             LOGGING_HEAD.pack(4096, 1, 0) + LOGGING_RANGE.pack(0, 1 << 63))
        assert e.value.errno == errno.EINVAL
        assert start(8192) == 8192
        vmm.host.write(1, 0, b"\x11" * 4096)
        report(4096)  # read-and-clear: what enabling the queues left behind
        buf = ram.alloc(4096)
        cid = vmm.host.submit(1, 0x02, nsid=1, prp1=buf, cdw12=7)  # Read 8 LBAs into buf
        assert vmm.host.wait(1, cid).ok
        pages = report(4096)
        q = vmm.host.queues[1]
        want = {(buf - ram.iova) // PAGE, (q.cq_iova - ram.iova) // PAGE}
        granule_pages = {pg ^ (pg & 1) for pg in want} | {pg | 1 for pg in want}  # 8 KiB granules
        assert want <= set(pages.tolist()) <= granule_pages
        assert len(report(4096)) == 0  # cleared
        stop()
        # num_ranges 0: everything the client mapped (the whole RAM here)
        reply = c.device_feature(p.DEVICE_FEATURE_SET | FEATURE_DMA_LOGGING_START, LOGGING_HEAD.pack(4096, 0, 0))
        assert LOGGING_HEAD.unpack_from(reply.data)[0] == 4096
        cid = vmm.host.submit(1, 0x02, nsid=1, prp1=buf, cdw12=7)
        assert vmm.host.wait(1, cid).ok
        assert (buf - ram.iova) // PAGE in set(report(4096).tolist())
        stop()
    finally:
        vmm.close()


def test_every_arc_on_the_nvme_device(emu: Any) -> None:
    """The state machine on the real device: every valid arc reaches its state (through
    DEVICE_RESET to start from RUNNING); RESUMING -> STOP without a stream fails with
    EINVAL into ERROR; the controller serves I/O again after a RUNNING arc."""
    from emulator.vfio_user.migration import ARCS, arc_path
    a = emu(config())
    vmm = Vmm(a.rt.socket(1), ram_bytes=8 << 20)
    c = vmm.client
    states = list(ARCS)
    try:
        for cur in states:
            for new in states:
                c.reset()
                path = arc_path(MigState.RUNNING, cur)
                assert path is not None
                set_state(c, cur)
                full = arc_path(cur, new)
                if full is None:
                    with pytest.raises(VfioUserError) as e:
                        set_state(c, new)
                    assert e.value.errno == errno.EINVAL and get_state(c) == cur
                    continue
                if cur == MigState.RESUMING and full:  # leaving RESUMING commits: no stream here
                    with pytest.raises(VfioUserError) as e:
                        set_state(c, new)
                    assert e.value.errno == errno.EINVAL and get_state(c) == MigState.ERROR
                    continue
                set_state(c, new)
                assert get_state(c) == new, (cur, new)
        c.reset()  # DEVICE_RESET also resets the controller: bring it up again
        vmm.host.init(io_queues=1)
        assert vmm.host.write(1, 0, b"\x5a" * 512).ok
        set_state(c, MigState.STOP)
        set_state(c, MigState.RUNNING)
        assert vmm.host.read(1, 0, 1).data == b"\x5a" * 512
    finally:
        vmm.close()


def test_one_mechanism_two_front_ends(lm: Any) -> None:
    """TP4159 Track Memory Changes (the MMC's Track Send/Receive) and VFIO DMA logging
    (the guest connection's DEVICE_FEATURE) watch the same controller at once and see
    the same device writes; each front end reads-and-clears only its own bitmap."""
    from emulator.host.memory import PAGE
    from emulator.vfio_user import protocol as p
    from emulator.vfio_user.migration import (FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START,
                                              LOGGING_HEAD, LOGGING_RANGE, LOGGING_REPORT)
    from tp4159_common import IO
    g, mmc = lm.g, lm.m
    client, mem = g.t.client, g.mem
    assert mmc.track_memory(IO, [(mem.iova, mem.size >> 12)]).ok
    client.device_feature(p.DEVICE_FEATURE_SET | FEATURE_DMA_LOGGING_START,
                          LOGGING_HEAD.pack(PAGE, 1, 0) + LOGGING_RANGE.pack(mem.iova, mem.size))
    n = mem.size // PAGE

    def vfio_pages() -> set[int]:
        reply = client.device_feature(p.DEVICE_FEATURE_GET | FEATURE_DMA_LOGGING_REPORT,
                                      LOGGING_REPORT.pack(mem.iova, mem.size, PAGE), 8 + 24 + 8 * ((n + 63) // 64))
        bits = np.unpackbits(np.frombuffer(reply.data, np.uint8, offset=24), bitorder="little")[:n]
        return {mem.iova + int(i) * PAGE for i in np.flatnonzero(bits)}

    def tmc_pages() -> set[int]:
        _, _, _, runs = mmc.parse_tracked(mmc.track_receive(IO).data)
        return {a + i for a, length in runs for i in range(0, length, PAGE)}
    vfio_pages(), tmc_pages()  # what enabling tracking left behind
    buf = mem.alloc(PAGE)
    c = g.command(1, 0x02, nsid=1, prp1=buf, cdw12=7)  # Read: data + a CQE written by the device
    assert c.ok
    want = {buf, g.queues[1].cq_iova // PAGE * PAGE}
    assert want <= tmc_pages()
    assert want <= vfio_pages()  # still there: the TMC read cleared only its own bitmap
    assert vfio_pages() == set() and tmc_pages() == set()


def test_random_feature_requests_on_the_nvme_device(emu: Any) -> None:
    """Random DEVICE_FEATURE requests at the real device (random states, logging ranges,
    reports): never an internal error, never a dropped connection; the controller
    serves I/O afterwards."""
    import random
    from emulator.vfio_user import protocol as p
    from emulator.vfio_user.migration import (LOGGING_HEAD, LOGGING_RANGE, LOGGING_REPORT, MIG_STATE_DATA)
    a = emu(config())
    vmm = Vmm(a.rt.socket(1), ram_bytes=8 << 20)
    c, ram = vmm.client, vmm.ram
    rng = random.Random(9)
    try:
        for _ in range(300):
            index = rng.choice([1, 2, 2, 2, 6, 7, 8, 3])
            op = rng.choice([p.DEVICE_FEATURE_GET, p.DEVICE_FEATURE_SET, p.DEVICE_FEATURE_PROBE | p.DEVICE_FEATURE_GET])
            if index == 2:
                data = MIG_STATE_DATA.pack(rng.randrange(9), 0)
            elif index == 6:
                data = LOGGING_HEAD.pack(1 << rng.randrange(8, 32), 1, 0) + LOGGING_RANGE.pack(
                    ram.iova + rng.randrange(0, ram.size, 4096), rng.randrange(1, ram.size))
            elif index == 8:
                data = LOGGING_REPORT.pack(ram.iova + rng.randrange(0, ram.size, 4096), rng.randrange(1, 1 << 24),
                                           1 << rng.randrange(12, 24))
            else:
                data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 8, 16])))
            try:
                c.device_feature(op | index, data, argsz=rng.choice([0, 16, 64 << 10]))
            except VfioUserError as e:
                assert e.errno in (errno.EINVAL, errno.ENOTTY, errno.EBUSY), (index, op, e)
            if rng.random() < 0.1:
                try:
                    c.call(m.MigDataReadRequest(rng.randrange(1, 1 << 16)))
                except VfioUserError as e:
                    assert e.errno == errno.EINVAL
        c.reset()
        vmm.host.init(io_queues=1)
        assert vmm.host.write(1, 8, b"\x77" * 512).ok
        assert vmm.host.read(1, 8, 1).data == b"\x77" * 512
    finally:
        vmm.close()
