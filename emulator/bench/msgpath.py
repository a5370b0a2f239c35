"""Benchmark: CPU per vfio-user message on the server side, without sockets or a controller.

    python -m emulator.bench.msgpath [--per-read N] [--repeat 7]

Posted 4-byte BAR0 writes (SQ tail doorbells, as QEMU and ``nvme-emu bench``
send them) go through the server's receive path -- codec, session, PCI
function -- into a device that only counts them; ``--per-read`` messages
arrive in each chunk, as one ``recvmsg`` of the server returns them.  Prints
the best of ``--repeat`` runs in process CPU µs per message (CPU time, so
that other work on a shared machine disturbs it less than wall time).
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Callable

from emulator.pci.function import NvmePciFunction
from emulator.vfio_user import messages as m
from emulator.vfio_user.codec import NEED_DATA, Connection, InvalidMessage, Role
from emulator.vfio_user.session import Session


class _CountingDevice:
    """An MmioDevice that counts writes (its doorbells through prepared handlers)."""

    def __init__(self) -> None:
        self.writes = 0

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.writes += 1

    def mmio_writer(self, offset: int, size: int) -> Callable[[int], None] | None:
        """Prepared handlers for doorbells, as the controller offers them."""
        return self._count if size == 4 and offset >= 0x1000 else None

    def _count(self, value: int) -> None:
        self.writes += 1

    def mmio_read(self, offset: int, size: int) -> int:
        return 0

    def set_memory(self, memory: object) -> None:
        pass

    def function_reset(self) -> None:
        pass


def per_message_us(per_read: int, rounds: int = 20_000) -> float:
    """CPU µs per message through codec -> session -> PCI function, the way the server drives them."""
    device = _CountingDevice()
    session = Session(NvmePciFunction(device=device), logging.getLogger(__name__))  # type: ignore[arg-type]
    session.attach()
    session.negotiated = True
    client = Connection(Role.CLIENT)
    chunk = b"".join(client.send(m.RegionWriteRequest(0, 0x1000 + 8 * (i % 4), b"\x01\0\0\0", no_reply=True))[0]
                     for i in range(per_read))
    server = Connection(Role.SERVER, posted_writes=True)
    handle, invalid, posted = session.handle, session.invalid, session.posted_write
    t = time.process_time()
    for _ in range(rounds):
        server.receive_data(chunk)
        while (ev := server.next_event()) is not NEED_DATA:
            if type(ev) is tuple:
                posted(*ev)
            elif type(ev) is InvalidMessage:
                invalid(ev)
            else:
                handle(ev)  # type: ignore[arg-type]
    spent = time.process_time() - t
    assert device.writes == rounds * per_read
    return spent / (rounds * per_read) * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-read", type=int, default=1, help="messages per chunk (per recvmsg)")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    best = min(per_message_us(args.per_read) for _ in range(args.repeat))
    print(f"{best:.2f} µs CPU per posted doorbell write ({args.per_read} per read)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
