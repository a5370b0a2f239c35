"""Live migration faults (issue 10): the source keeps serving the guest whatever fails.

- the destination refuses (Set Controller State) or dies before Resume: the source resumes;
- the MMH dies at any stage before the commit (the destination's Resume): the source's MMC
  loses its host, so its LBA Migration Queue, logging and memory tracking go and the
  controller it suspended resumes; the source reads the guest's connection again; the
  destination discards what it adopted.  After the commit the destination finishes alone;
- the LBA Migration Queue fills (ESA 111b): the MMH copies the whole allocated space
  again and still finishes with equal files;
- the destination cannot write (out of space): a clear error, the source goes on.
"""
from __future__ import annotations

import errno
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from emulator.mmh.endpoint import Endpoint
from emulator.mmh.engine import Engine, Options, Report
from emulator.nvme.migration.model import mmc_state
from lm_helpers import WritingGuest, sparse_diff

NS_BYTES = 16 << 20


def config(max_io_queues: int = 4) -> dict[str, Any]:
    return {
        "namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512}],
        "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1], "max_io_queues": max_io_queues},
                        {"cntlid": 2, "type": "mmc", "namespaces": [1]}],
    }


def engine(src: Any, dst: Any, options: Options | None = None, **hooks: Any) -> Engine:
    return Engine(Endpoint("source", str(src.config.control_path), 1),
                  Endpoint("destination", str(dst.config.control_path), 1), options, **hooks)


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def source_is_clean(a: Any) -> bool:
    """Source controller running and reading its guest; its MMC runs no queue or tracking."""
    def look() -> bool:
        ctrl, mmc = a.subsystem.controllers[1], a.subsystem.controllers[2]
        st = mmc_state(mmc)
        server = a.rt.runtime.servers[1]
        return (not ctrl.state.suspended and not st.cdqs and not st.tracks
                and server.connected and not server.paused)
    return wait_until(lambda: a.call(look))


def assert_guest_goes_on(guest: WritingGuest) -> None:
    before = guest.writes
    assert wait_until(lambda: guest.writes > before + 20), "the guest stalled"
    guest.stop()
    assert not guest.errors, guest.errors
    assert guest.verify() == []


@pytest.fixture
def pair(emu: Any) -> tuple[Any, Any, WritingGuest]:
    a, b = emu(config()), emu(config())
    g = a.host(1, io_queues=1, qsize=32)
    for blk in range(32):
        g.write(1, blk * 8, bytes([blk + 1]) * 4096)
    return a, b, WritingGuest(g)


def test_destination_refuses_the_state(emu: Any) -> None:
    a, b = emu(config()), emu(config(max_io_queues=1))
    g = a.host(1, io_queues=2, qsize=32)  # queue 2 does not exist on b: Not Enough Resources
    guest = WritingGuest(g).start()
    r = engine(a, b).run()
    assert not r.ok and "Set Controller State" in (r.error or ""), r
    assert source_is_clean(a)
    assert_guest_goes_on(guest)
    assert b.call(lambda: not b.rt.runtime.servers[1].connected)


def test_destination_dies_before_resume(pair: tuple[Any, Any, WritingGuest]) -> None:
    a, b, guest = pair
    guest.start()
    r = engine(a, b, before_switch=lambda e: b.stop()).run()
    assert not r.ok, r
    assert source_is_clean(a)
    assert_guest_goes_on(guest)


class Killed(BaseException):
    """The MMH process dies: its sockets close, it cleans nothing up."""


def kill_at(stage: str) -> Callable[[Engine], Callable[[str], None]]:
    def make(e: Engine) -> Callable[[str], None]:
        def hook(s: str) -> None:
            if s != stage:
                return
            for ep in (e.src, e.dst):
                socks = [ep.control.sock if ep.control else None,
                         ep.host.t.client.sock if ep.host else None]  # type: ignore[attr-defined]
                for sock in socks:
                    if sock is not None:
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
            raise Killed(stage)
        return hook
    return make


@pytest.mark.parametrize("stage", ["logging", "suspended", "paused", "adopted"])
def test_mmh_killed(pair: tuple[Any, Any, WritingGuest], stage: str) -> None:
    a, b, guest = pair
    guest.start()
    e = engine(a, b)
    e.on_stage = kill_at(stage)(e)
    with pytest.raises(Killed):
        e.run()
    assert source_is_clean(a)
    assert wait_until(lambda: b.call(lambda: not b.rt.runtime.servers[1].connected))
    assert_guest_goes_on(guest)
    # and a later migration goes through
    r = engine(a, b).run()
    assert r.ok, r.error


def test_mmh_killed_after_the_commit(pair: tuple[Any, Any, WritingGuest]) -> None:
    """Killed right after the destination's Resume: the destination finishes the hand-over."""
    a, b, guest = pair
    guest.start()
    e = engine(a, b)
    e.on_stage = kill_at("resumed")(e)
    with pytest.raises(Killed):
        e.run()

    def b_serves() -> bool:
        server = b.rt.runtime.servers[1]
        return server.connected and not server.paused and not b.subsystem.controllers[1].state.suspended
    assert wait_until(lambda: b.call(b_serves))
    assert a.call(lambda: not a.rt.runtime.servers[1].connected and a.subsystem.controllers[1].state.suspended)
    assert_guest_goes_on(guest)


def test_full_lba_migration_queue_falls_back_to_a_full_copy(emu: Any) -> None:
    a, b = emu(config()), emu(config())
    g = a.host(1, io_queues=1, qsize=32)

    def burst(stage: str) -> None:
        if stage == "logging":  # more writes than the queue holds
            for blk in range(40):
                assert g.write(1, (100 + blk) * 8, bytes([blk]) * 4096).ok
    diffs: list[list[int]] = []
    e = engine(a, b, Options(lmq_slots=8), on_stage=burst,
               before_switch=lambda _: diffs.append(sparse_diff(Path(a.config.namespaces[0].file),
                                                                Path(b.config.namespaces[0].file),
                                                                NS_BYTES)))
    r = e.run()
    assert r.ok, r.error
    assert r.lmq_overflows >= 1 and diffs == [[]], r
    assert all(g.read(1, (100 + blk) * 8, 8).data == bytes([blk]) * 4096 for blk in range(40))


def test_destination_out_of_space(pair: tuple[Any, Any, WritingGuest]) -> None:
    a, b, guest = pair

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    b.call(lambda: setattr(b.subsystem.namespaces[1], "write_from", full))
    guest.start()
    r: Report = engine(a, b).run()
    assert not r.ok and "destination write" in (r.error or "") and "Internal Error" in (r.error or ""), r
    assert source_is_clean(a)
    assert_guest_goes_on(guest)
