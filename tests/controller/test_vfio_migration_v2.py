"""vfio-user migration v2 (issue 15): a VMM-style client moves a VM between two emulator
instances, A -> B -> A, while its guest runs random I/O with a verify model.

At each switch (both devices stopped) the destination's RAM equals the source's,
including the pages the device wrote (completion entries, read data), and the
destination namespace file equals the source's.  Every command gets exactly one
completion and every read returns the model's data, across both switches."""
from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from emulator.host.guest_io import RandomIo
from emulator.host.vmm import Vmm, VmRam, get_state, read_stream, set_state
from emulator.vfio_user import messages as m
from emulator.vfio_user.client import VfioUserClient, VfioUserError
from emulator.vfio_user.migration import MigState
from lm_helpers import sparse_diff

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
            # the guest goes on on the destination with the same queues
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


def _stop_copy_stream(e: Any) -> tuple[bytes, VmRam, VfioUserClient]:
    """A whole stream from STOP -> STOP_COPY of a controller with some data written."""
    vmm = Vmm(e.rt.socket(1), ram_bytes=8 << 20)
    guest = RandomIo(vmm.host, 1, 64, seed=7)
    for _ in range(4):
        guest.step(8, leave_in_flight=False)
    set_state(vmm.client, MigState.STOP_COPY)
    out = bytearray()
    read_stream(vmm.client, out.extend)
    return bytes(out), vmm.ram, vmm.client


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
    a, b = emu(config()), emu(config())
    stream, ram, src = _stop_copy_stream(a)
    bad = bytearray(stream)
    if damage == "flipped byte":
        bad[len(bad) // 2] ^= 0x40
    elif damage == "truncated tail":
        del bad[-100:]
    else:
        bad[16 + 8] = 2  # HEADER body: magic (8 bytes), then version u32
    dst, err, before = _resume(b, bytes(bad))
    assert isinstance(err, VfioUserError) and err.errno == errno.EINVAL
    after = b.call(lambda: b.subsystem.controllers[1].export_state(0.0))
    assert after["state"] == before["state"]  # the destination controller is untouched
    assert get_state(dst) in (MigState.RESUMING, MigState.ERROR)
    dst.reset()
    assert get_state(dst) == MigState.RUNNING
    dst.close()
    # the source goes back to RUNNING and keeps its data
    set_state(src, MigState.RUNNING)
    assert get_state(src) == MigState.RUNNING
    src.close()
    ram.close()


def test_shared_storage_streams_no_user_data(emu: Any, tmp_path: Path) -> None:
    shared = str(tmp_path / "shared-ns1.img")
    a = emu(config(shared))
    stream, ram, src = _stop_copy_stream(a)
    assert len(stream) < 64 << 10  # states only: no 4 KiB blocks of user data
    set_state(src, MigState.RUNNING)
    src.close()
    ram.close()
