"""Seeded fuzzers that drive a running emulator over its real sockets.

* :func:`protocol_fuzz` sends vfio-user messages: mostly well framed with
  random fields (DMA maps of a random-filled memfd that it sometimes
  truncates, SET_IRQS with eventfds, pipes, memfds and /dev/null, register
  writes that enable the controller on garbage queues and ring doorbells,
  config space writes, resets), sometimes garbage.  The server may answer
  with an error or drop the connection; it must never stop answering.
* :func:`command_fuzz` submits random NVMe commands through the host driver;
  each must complete with some status other than Internal Error.

Both are deterministic for a seed: a failure is reported with the seed and
the input's index, and replaying the same seed replays the same inputs.
"""
from __future__ import annotations

import errno
import json
import os
import random
import socket
from dataclasses import dataclass, field

from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient
from emulator.vfio_user.codec import close_fds

RAM_IOVA = 0x1_0000_0000
RAM_SIZE = 1 << 20
BAR0, CONFIG = 0, p.PCI_CONFIG_REGION_INDEX
# CC, AQA, ASQ, ACQ, INTMS, INTMC and the first doorbells (Base 2.1 Figure 35)
_REG_OFFSETS = [0x14, 0x24, 0x28, 0x30, 0x0C, 0x10] + [0x1000 + 4 * k for k in range(8)]


@dataclass
class FuzzStats:
    name: str
    seed: int
    inputs: int = 0
    replies: int = 0
    error_replies: int = 0
    drops: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def fail(self, index: int, what: str) -> None:
        self.failures.append(f"{self.name} seed {self.seed} input {index}: {what}")

    def summary(self) -> str:
        extra = f", {self.error_replies} error replies, {self.drops} drops" if self.name == "protocol" else ""
        top = sorted(self.statuses.items(), key=lambda kv: -kv[1])[:6]
        st = f", statuses {dict(top)}" if self.statuses else ""
        return f"{self.name} seed {self.seed}: {self.inputs} inputs, {self.replies} replies{extra}{st}, " \
               f"{len(self.failures)} failures"


class _FdPool:
    """fds a hostile client passes around: memory, eventfds, pipes, /dev/null."""

    def __init__(self, rng: random.Random) -> None:
        self.ram = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.ram, RAM_SIZE)
        os.pwrite(self.ram, rng.randbytes(RAM_SIZE), 0)
        self.eventfds = [os.eventfd(0, os.EFD_CLOEXEC | (os.EFD_NONBLOCK if k else 0)) for k in range(3)]
        full = self.eventfds[0]  # a blocking eventfd at its maximum count
        os.write(full, (0xFFFFFFFFFFFFFFFE).to_bytes(8, "little"))
        self.pipe = os.pipe2(os.O_CLOEXEC)
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self.mem2 = os.memfd_create("fuzz-other", os.MFD_CLOEXEC)
        os.ftruncate(self.mem2, 1 << 16)

    def any(self, rng: random.Random) -> int:
        return rng.choice([self.ram, self.mem2, self.devnull, *self.pipe, *self.eventfds, *self.eventfds])

    def close(self) -> None:
        close_fds([self.ram, self.mem2, self.devnull, *self.pipe, *self.eventfds])


def _message(rng: random.Random, pool: _FdPool) -> tuple[int, bytes, list[int], bool]:
    """(command, payload, fds, expects a reply) of one random, mostly well-formed request."""
    c = p.Command
    kind = rng.choices(["version", "dma_map", "dma_unmap", "info", "region_info", "irq_info", "set_irqs",
                        "read", "write", "reg", "reset", "truncate", "other"],
                       [2, 8, 3, 1, 2, 1, 8, 6, 6, 20, 1, 1, 2])[0]
    fds: list[int] = []
    if kind == "version":
        caps = rng.choice([{}, {"max_msg_fds": rng.randrange(-2, 2000)}, {"pgsizes": rng.choice([0, 4096, 12])},
                           {"max_data_xfer_size": rng.choice([0, 1, 1 << 20, "x"])}, {"write_multiple": 1}])
        body = json.dumps({"capabilities": caps}).encode() + rng.choice([b"\0", b"", b"}\0"])
        return c.VERSION, p.VERSION.pack(0, rng.choice([0, 0, 1])) + body, fds, True
    if kind in ("dma_map", "truncate"):
        if kind == "truncate":  # the attack: the client shrinks its memory under a map, then regrows it
            os.ftruncate(pool.ram, rng.choice([0, 4096, RAM_SIZE // 2]))
            if rng.random() < 0.7:
                os.ftruncate(pool.ram, RAM_SIZE)
        iova = rng.choice([RAM_IOVA, RAM_IOVA + 4096 * rng.randrange(256), rng.randrange(1 << 64) & ~0xFFF])
        size = rng.choice([RAM_SIZE, 4096, 4096 * rng.randrange(1, 512), rng.randrange(1 << 64)])
        fds = rng.choice([[pool.ram], [pool.ram], [pool.any(rng)], [], [pool.ram, pool.mem2]])
        flags = rng.choice([3, 3, 1, 0, rng.randrange(1 << 32)])
        offset = rng.choice([0, 0, 4096, rng.randrange(1 << 63)])
        return c.DMA_MAP, p.DMA_MAP.pack(p.DMA_MAP.size, flags, offset, iova, size), fds, True
    if kind == "dma_unmap":
        iova = rng.choice([RAM_IOVA, 0, rng.randrange(1 << 64)])
        flags = rng.choice([0, 0, p.DMA_UNMAP_ALL, rng.randrange(8)])
        size = rng.choice([RAM_SIZE, 0, rng.randrange(1 << 64)])
        return c.DMA_UNMAP, p.DMA_UNMAP.pack(p.DMA_UNMAP.size, flags, iova, size), fds, True
    if kind == "info":
        return c.DEVICE_GET_INFO, p.DEVICE_INFO.pack(p.DEVICE_INFO.size, 0, 0, 0), fds, True
    if kind == "region_info":
        return (c.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(rng.choice([32, 64, 4096, 8]), 0, rng.randrange(12),
                                                            0, 0, 0), fds, True)
    if kind == "irq_info":
        return c.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(p.IRQ_INFO.size, 0, rng.randrange(7), 0), fds, True
    if kind == "set_irqs":
        index = rng.choice([p.PCI_MSIX_IRQ_INDEX, p.PCI_MSIX_IRQ_INDEX, p.PCI_INTX_IRQ_INDEX, rng.randrange(7)])
        kinds = [p.IRQ_SET_DATA_EVENTFD, p.IRQ_SET_DATA_NONE, p.IRQ_SET_DATA_BOOL]
        actions = [p.IRQ_SET_ACTION_TRIGGER, p.IRQ_SET_ACTION_MASK, p.IRQ_SET_ACTION_UNMASK]
        flags = rng.choice(kinds) | rng.choice(actions)
        if rng.random() < 0.05:
            flags = rng.randrange(1 << 32)
        start, count = rng.randrange(4), rng.choice([0, 1, 1, 2, 3])
        data = b""
        if flags & p.IRQ_SET_DATA_EVENTFD:
            fds = [pool.any(rng) for _ in range(count)]
        elif flags & p.IRQ_SET_DATA_BOOL:
            data = bytes(rng.randrange(2) for _ in range(count))
        return c.DEVICE_SET_IRQS, p.SET_IRQS.pack(p.SET_IRQS.size + len(data), flags, index, start, count) + data, \
            fds, True
    if kind == "read":
        region = rng.choice([BAR0, BAR0, CONFIG, rng.randrange(12)])
        offset = rng.choice([rng.randrange(0x40), rng.randrange(0x2000), rng.randrange(1 << 64)])
        count = rng.choice([1, 2, 4, 8, 4096, rng.randrange(1 << 21)])
        return c.REGION_READ, p.REGION_ACCESS.pack(offset, region, count), fds, True
    if kind in ("write", "reg"):
        if kind == "reg":
            region, offset = BAR0, rng.choice(_REG_OFFSETS)
            value = {0x14: rng.choice([0x460001, 0x460000, 0x464001, 0]),
                     0x24: rng.choice([0x000F000F, 0x003F003F, 0]),
                     0x28: RAM_IOVA + 4096 * rng.randrange(4), 0x30: RAM_IOVA + 4096 * rng.randrange(4, 8)}.get(
                offset, rng.randrange(0x40))
            size = 8 if offset in (0x28, 0x30) else 4
            if rng.random() < 0.3:  # bus master + MSI-X enable in config space, now and then
                region, offset, size, value = CONFIG, rng.choice([0x04, 0x42, 0x72]), 2, rng.choice([0x6, 0xC000])
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        else:
            region = rng.choice([BAR0, CONFIG, rng.randrange(12)])
            offset = rng.choice([rng.randrange(0x2000), rng.randrange(1 << 64)])
            data = rng.randbytes(rng.choice([1, 2, 4, 8, 0, 16]))
        return c.REGION_WRITE, p.REGION_ACCESS.pack(offset, region, len(data)) + data, fds, True
    if kind == "reset":
        return c.DEVICE_RESET, b"", fds, True
    command = rng.randrange(40)
    return command, rng.randbytes(rng.choice([0, 4, 16, 40])), ([pool.any(rng)] if rng.random() < 0.2 else []), \
        command in p.KNOWN_COMMANDS


def _reg(region: int, offset: int, value: int, size: int) -> tuple[int, bytes, list[int], bool]:
    data = value.to_bytes(size, "little")
    return p.Command.REGION_WRITE, p.REGION_ACCESS.pack(offset, region, size) + data, [], True


def _enable_program(rng: random.Random) -> list[tuple[int, bytes, list[int], bool]]:
    """Map the random RAM, enable the controller with admin queues in it, ring the doorbell:
    the controller then fetches garbage SQEs and runs them against garbage PRPs."""
    asq, acq = RAM_IOVA + 4096 * rng.randrange(4), RAM_IOVA + 4096 * rng.randrange(4, 8)
    return [(p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(p.DMA_UNMAP.size, p.DMA_UNMAP_ALL, 0, 0), [], True),
            (p.Command.DMA_MAP, p.DMA_MAP.pack(p.DMA_MAP.size, 3, 0, RAM_IOVA, RAM_SIZE), [-1], True),
            _reg(CONFIG, 0x04, 0x6, 2),  # memory space + bus master
            _reg(BAR0, 0x14, 0x460000, 4), _reg(BAR0, 0x24, 0x003F003F, 4),
            _reg(BAR0, 0x28, asq, 8), _reg(BAR0, 0x30, acq, 8), _reg(BAR0, 0x14, 0x460001, 4),
            _reg(BAR0, 0x1000, rng.randrange(1, 64), 4)]


def _connect(path: str, rng: random.Random, timeout: float) -> tuple[VfioUserClient, bool]:
    client = VfioUserClient(path, timeout=timeout)
    if rng.random() < 0.9:
        client.negotiate()
        return client, True
    return client, False


def _hang_up(client: VfioUserClient, stats: FuzzStats, index: int, timeout: float) -> None:
    """Stop sending on a desynchronised connection: the server must close it, not wait on it."""
    try:
        client.sock.shutdown(socket.SHUT_WR)
        while (reply := client.recv_raw()) is not None:  # replies to what it could still parse
            close_fds(reply.fds)
        stats.drops += 1
    except TimeoutError:
        stats.fail(index, f"the server kept a connection open {timeout:g} s after its client stopped sending")
    except OSError as e:
        if e.errno != errno.ECONNRESET:
            stats.fail(index, f"socket error: {e}")
        stats.drops += 1
    finally:
        client.close()


def protocol_fuzz(path: str, seed: int, count: int, timeout: float = 5.0) -> FuzzStats:
    """Send ``count`` random requests to the server at ``path``."""
    rng = random.Random(seed)
    stats = FuzzStats("protocol", seed)
    pool = _FdPool(rng)
    client: VfioUserClient | None = None
    program: list[tuple[int, bytes, list[int], bool]] = []
    desync = -1  # after a lying header: messages still sent on that connection before closing it
    try:
        for i in range(count):
            if client is None:
                desync = -1  # a new connection starts at a message boundary
                try:
                    client, _ = _connect(path, rng, timeout)
                except (OSError, TimeoutError) as e:
                    stats.fail(i, f"cannot reconnect: {e}")
                    return stats
            if not program and rng.random() < 0.03:
                program = _enable_program(rng)
            if program:
                command, payload, fds, reply_owed = program.pop(0)
                fds = [pool.ram if fd == -1 else fd for fd in fds]
            else:
                command, payload, fds, reply_owed = _message(rng, pool)
            flags = p.TYPE_COMMAND
            if rng.random() < 0.05:
                flags |= p.FLAG_NO_REPLY
                reply_owed = False
            size = p.HEADER_SIZE + len(payload)
            if desync < 0 and rng.random() < 0.02:
                # A lying header: the server cannot find the next message boundary.  It may wait for
                # bytes that never come (size + 1 takes the first byte of the next header), so no
                # reply can be expected on this connection any more: send a few more messages
                # blind, then shut down our side; the server must close the connection (the stream
                # ends mid-message) and serve the next client.
                size = rng.choice([0, 8, size + 1, 1 << 31])
                desync = rng.randrange(4)
                program = []
            elif desync >= 0:
                desync -= 1
            if desync >= 0:
                reply_owed = False
            msg_id = rng.randrange(1 << 16)
            stats.inputs += 1
            try:
                client.send_raw(p.HEADER.pack(msg_id, command, size, flags, 0) + payload, fds)
                if desync == 0:
                    _hang_up(client, stats, i, timeout)
                    client = None
                    continue
                if not reply_owed:
                    continue
                reply = client.recv_raw()
            except TimeoutError:
                stats.fail(i, f"no reply to {p.command_name(command)} within {timeout:g} s")
                client.close()
                client = None
                continue
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    stats.fail(i, f"socket error: {e}")
                reply = None
            if reply is None:
                stats.drops += 1
                client.close()
                client = None
                continue
            close_fds(reply.fds)
            stats.replies += 1
            stats.error_replies += reply.is_error
    finally:
        if client is not None:
            client.close()
        pool.close()
    return stats


def server_answers(path: str, timeout: float = 10.0) -> bool:
    """A fresh client negotiates and reads the PCI vendor ID."""
    try:
        with VfioUserClient(path, timeout=timeout) as c:
            c.negotiate()
            return len(c.region_read(CONFIG, 0, 4)) == 4
    except (OSError, TimeoutError, socket.timeout):
        return False
    except Exception:  # noqa: BLE001 - an error reply: the server is alive but unhappy
        return False


# -- NVMe commands ---------------------------------------------------------------------
_ADMIN_OPCODES = [0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x18, 0x3D, 0x3E, 0x41, 0x42,
                  0x45, 0x7C, 0x84, 0x86]
_IO_OPCODES = [0x00, 0x01, 0x02, 0x08, 0x09, 0x01, 0x02, 0x86]


def command_fuzz(path: str, seed: int, count: int, other: str | None = None) -> FuzzStats:
    """Submit ``count`` random commands to the controller at ``path``.

    ``other``: another controller's socket of the same process, read from now and
    then (one controller's hostile host must not stop the other).
    """
    from emulator.host.driver import CommandTimeout, NvmeHost
    from emulator.host.memory import HostMemory
    from emulator.host.transport import VfioUserTransport
    from emulator.nvme.spec import SCT, Generic

    rng = random.Random(seed)
    stats = FuzzStats("commands", seed)

    def host(sock: str) -> NvmeHost:
        h = NvmeHost(VfioUserTransport(VfioUserClient(sock), HostMemory(8 << 20)))
        h.init(io_queues=2)
        return h

    h = host(path)
    h2 = host(other) if other else None
    mem = h.mem
    try:
        for i in range(count):
            qid = rng.choice([0, 0, 1, 2])
            known = _IO_OPCODES if qid else _ADMIN_OPCODES
            opc = rng.choice(known) if rng.random() < 0.8 else rng.randrange(256)
            cdw = [rng.randrange(1 << 32) for _ in range(6)]
            if rng.random() < 0.5:
                cdw[0] &= 0xFFFF  # small SLBA / NUMD / queue ids: reach the commands' real work
                cdw[2] &= 0x3F
            nsid = rng.choice([0, 1, 1, 2, 0xFFFFFFFF, rng.randrange(1 << 32)])
            prp1 = rng.choice([mem.iova + rng.randrange(mem.size) & ~0x3, rng.randrange(1 << 64)])
            prp2 = rng.choice([mem.iova + rng.randrange(mem.size) & ~0x7, rng.randrange(1 << 64), 0])
            if qid == 0:
                if opc in (0x00, 0x04):  # never delete the queues the fuzzer relies on
                    cdw[0] = (cdw[0] & ~0xFFFF) | 7
                if opc == 0x0C:
                    opc = 0x18  # held AERs would fill the admin queue
                if opc in (0x41, 0x84):
                    cdw[0] &= ~0xFF  # no suspend / sanitize storms (parsing only)
                if (opc == 0x15 or opc == 0x0D and cdw[0] & 0xF == 1) and nsid in (1, 2, 0xFFFFFFFF):
                    nsid = rng.randrange(3, 0xFFFFFFFF)  # never delete, detach or attach the namespaces
                    # the soak's kill and disk-full cycles rely on (namespace 2 attached to this
                    # controller would take the fuzzed writes and Formats the soak's model knows nothing of)
            stats.inputs += 1
            try:
                c = h.command(qid, opc, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=cdw[0], cdw11=cdw[1],
                              cdw12=cdw[2], cdw13=cdw[3], cdw14=cdw[4], cdw15=cdw[5], timeout=10)
            except CommandTimeout as e:
                stats.fail(i, f"opcode {opc:#x} on queue {qid}: {e}")
                h.close()
                h = host(path)
                mem = h.mem
                continue
            stats.replies += 1
            key = f"{c.sct:x}/{c.sc:02x}"
            stats.statuses[key] = stats.statuses.get(key, 0) + 1
            if (c.sct, c.sc) == (SCT.GENERIC, Generic.INTERNAL_ERROR):
                stats.fail(i, f"opcode {opc:#x} on queue {qid} (cdw10 {cdw[0]:#x}): Internal Error")
            if h2 is not None and i % 50 == 0 and not h2.read(2, rng.randrange(1024), 8).ok:
                stats.fail(i, "the other controller's read failed")
        if not h.admin(0x18).ok:  # Keep Alive: still serving
            stats.fail(count, "controller stopped answering")
    finally:
        h.close()
        if h2 is not None:
            h2.close()
    return stats
