"""A blocking vfio-user client: for tests, tools and a userspace NVMe host driver.

It uses the same codec as the server, reads messages the same exact-size way
(so fds stay with their message), and answers server-to-client DMA_READ /
DMA_WRITE requests that arrive while it waits for a reply -- against the
``memory`` object given to it (anything with ``read(addr, n)`` and
``write(addr, data)`` raising on a bad address, e.g. a
:class:`~emulator.memory.MappedMemory`).  Transfers are cut at the server's
``max_data_xfer_size`` and fd lists at its ``max_msg_fds``.
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user.codec import CLOSED, NEED_DATA, Connection, Event, InvalidMessage, Role, close_fds
from emulator.vfio_user.sockio import ancillary_size, recv_chunk, send_all

CLIENT_CAPS: dict[str, Any] = {"max_msg_fds": 16, "max_data_xfer_size": p.MAX_DATA_XFER_SIZE,
                               "pgsizes": p.PGSIZE, "max_dma_maps": p.MAX_DMA_MAPS, "write_multiple": True}


class VfioUserError(OSError):
    """The server answered a request with an error (``errno``), or its reply was unusable."""

    def __init__(self, err: int, command: int, reason: str = "") -> None:
        super().__init__(err, f"{p.command_name(command)}: {reason or os.strerror(err)}")
        self.command = command


class DmaTarget(Protocol):
    def read(self, addr: int, length: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


@dataclass
class RawMessage:
    msg_id: int
    command: int
    msg_size: int
    flags: int
    error_no: int
    payload: bytes
    fds: list[int]

    @property
    def is_error(self) -> bool:
        return bool(self.flags & p.FLAG_ERROR)


class VfioUserClient:
    """One connection to a vfio-user server (``path``, or an already connected ``sock``)."""

    def __init__(self, path: str | None = None, timeout: float = 5.0, *, sock: socket.socket | None = None,
                 memory: DmaTarget | None = None, max_fds: int = CLIENT_CAPS["max_msg_fds"]) -> None:
        if sock is None:
            if path is None:
                raise ValueError("need a path or a socket")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(timeout)
        self.sock = sock
        self.memory = memory
        self.conn = Connection(Role.CLIENT, max_fds=max_fds)
        self._ancsize = ancillary_size(max_fds)
        self.server_caps: dict[str, Any] = {}
        self._replies: dict[int, m.Message | InvalidMessage] = {}  # arrived, not yet waited for
        self.max_msg_fds = 1  # the server's, once negotiated
        self.max_data_xfer_size = p.MAX_DATA_XFER_SIZE

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.conn.close()
        self.sock.close()

    # -- message plumbing ----------------------------------------------------------------
    def send(self, msg: m.Message) -> int:
        """Send without waiting (pair with :meth:`wait` unless NO_REPLY); returns the msg_id."""
        data, fds = self.conn.send(msg)
        send_all(self.sock, data, fds)
        return msg.msg_id

    def _next(self) -> Event:
        while True:
            ev = self.conn.next_event()
            if ev is not NEED_DATA:
                return ev
            data, fds, truncated = recv_chunk(self.sock, self.conn.next_read_size(), self._ancsize)
            self.conn.receive_data(data, fds, truncated)

    def call(self, msg: m.Message) -> Any:
        """Send a request and return its reply; an error reply raises VfioUserError."""
        return self.wait(self.send(msg))

    def wait(self, msg_id: int) -> Any:
        """The reply to request ``msg_id``, serving server requests meanwhile.

        Replies to other pipelined requests are kept for their own wait().
        """
        while msg_id not in self._replies:
            self._dispatch(self._next())
        reply = self._replies.pop(msg_id)
        if isinstance(reply, InvalidMessage):
            raise VfioUserError(reply.errno, reply.command, f"bad reply: {reply.reason}")
        if isinstance(reply, m.ErrorReply):
            raise VfioUserError(reply.errno, reply.command)
        return reply

    def process_requests(self, timeout: float = 0.0) -> int:
        """Answer server-to-client requests arriving within ``timeout``; returns how many."""
        served = 0
        old = self.sock.gettimeout()
        self.sock.settimeout(timeout)
        try:
            while True:
                try:
                    served += self._dispatch(self._next())
                except (TimeoutError, BlockingIOError):
                    return served
        finally:
            self.sock.settimeout(old)

    def _dispatch(self, ev: Event) -> bool:
        """Handle one incoming event; True if it was a server request (now answered)."""
        if ev is CLOSED:
            raise ConnectionError("the server closed the connection")
        if isinstance(ev, InvalidMessage):
            if ev.unsolicited:
                raise p.FatalProtocolError(f"the server sent {ev.reason}")
            if ev.is_reply:  # a broken reply to one of our requests
                self._replies[ev.msg_id] = ev
            elif ev.needs_reply:
                self.send(m.ErrorReply(ev.command, ev.errno, msg_id=ev.msg_id))
            return False
        assert isinstance(ev, m.Message)
        if ev.IS_REPLY:
            self._replies[ev.msg_id] = ev
            return False
        self._serve(ev)
        return True

    def _serve(self, req: m.Message) -> None:
        """Answer a DMA_READ / DMA_WRITE from the server against ``self.memory``."""
        reply: m.Message
        try:
            if self.memory is None:
                raise VfioUserError(errno.ENODEV, req.COMMAND, "no memory to serve DMA")
            if isinstance(req, m.DmaReadRequest):
                if req.count > CLIENT_CAPS["max_data_xfer_size"]:
                    raise VfioUserError(errno.E2BIG, req.COMMAND)
                reply = m.DmaReadReply(req.address, bytes(self.memory.read(req.address, req.count)))
            elif isinstance(req, m.DmaWriteRequest):
                self.memory.write(req.address, req.data)
                reply = m.DmaWriteReply(req.address, len(req.data))
            else:
                raise VfioUserError(errno.EINVAL, req.COMMAND)
        except VfioUserError as e:
            reply = m.ErrorReply(req.COMMAND, e.errno or errno.EINVAL)
        except Exception:  # the memory refused the address (DmaError, ValueError, ...)
            reply = m.ErrorReply(req.COMMAND, errno.EFAULT)
        if not req.no_reply:
            reply.msg_id = req.msg_id
            self.send(reply)

    # -- raw access for malformed-input tests ------------------------------------------------
    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        send_all(self.sock, data, list(fds))

    def recv_raw(self) -> RawMessage | None:
        """Read one message as it is (header, then msg_size-16 bytes); None at end of stream."""
        head, fds = self._recv_exact(p.HEADER_SIZE)
        if len(head) < p.HEADER_SIZE:
            close_fds(fds)
            return None
        msg_id, command, size, flags, err = p.HEADER.unpack_from(head)
        body, more = self._recv_exact(max(0, size - p.HEADER_SIZE))
        return RawMessage(msg_id, command, size, flags, err, body, fds + more)

    def _recv_exact(self, n: int) -> tuple[bytes, list[int]]:
        data, fds = b"", []
        while len(data) < n:
            chunk, more, _ = recv_chunk(self.sock, n - len(data), self._ancsize)
            fds += more
            if not chunk:
                break
            data += chunk
        return data, fds

    # -- commands -----------------------------------------------------------------------------
    def negotiate(self, capabilities: dict[str, Any] | None = None) -> dict[str, Any]:
        """VERSION; returns the server's capabilities and adopts its limits."""
        reply = self.call(m.VersionRequest(0, 0, dict(CLIENT_CAPS if capabilities is None else capabilities)))
        if reply.major != 0 or reply.minor != 0:
            raise VfioUserError(errno.EPROTO, p.Command.VERSION, f"server version {reply.major}.{reply.minor}")
        caps = reply.capabilities
        self.server_caps = caps
        self.max_msg_fds = int(caps.get("max_msg_fds", 1))
        # never more than our own codec sends in one message
        self.max_data_xfer_size = min(int(caps.get("max_data_xfer_size", p.MAX_DATA_XFER_SIZE)),
                                      p.MAX_DATA_XFER_SIZE)
        return caps

    def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = p.DMA_FLAG_READ | p.DMA_FLAG_WRITE) -> None:
        self.call(m.DmaMapRequest(iova, size, flags, offset, fd))

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> m.DmaUnmapReply:
        return self.call(m.DmaUnmapRequest(iova, size, flags))

    def device_info(self) -> m.DeviceInfoReply:
        return self.call(m.DeviceInfoRequest())

    def region_info(self, index: int) -> m.RegionInfoReply:
        """Region info with its caps, asking again with a bigger argsz when they did not fit.

        The caller owns ``reply.fd`` (fds of superseded replies are closed).
        """
        argsz = p.REGION_INFO.size
        for _ in range(4):
            reply: m.RegionInfoReply = self.call(m.RegionInfoRequest(index, argsz=argsz))
            if reply.argsz <= argsz:
                return reply
            argsz = reply.argsz
            close_fds(reply.attached_fds())
        raise VfioUserError(errno.EPROTO, p.Command.DEVICE_GET_REGION_INFO, "argsz keeps growing")

    def irq_info(self, index: int) -> m.IrqInfoReply:
        return self.call(m.IrqInfoRequest(index))

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        out = bytearray()
        for pos in range(0, count, self.max_data_xfer_size) if count else (0,):
            n = min(count - pos, self.max_data_xfer_size)
            reply = self.call(m.RegionReadRequest(index, offset + pos, n))
            if len(reply.data) != n:
                raise VfioUserError(errno.EIO, p.Command.REGION_READ, f"{len(reply.data)} of {n} bytes")
            out += reply.data
        return bytes(out)

    def region_write(self, index: int, offset: int, data: bytes, posted: bool = False) -> None:
        """Write ``data``; ``posted`` sends NO_REPLY (no answer, not even on error)."""
        if posted and 0 < len(data) <= 8:  # a doorbell: encoded without a message object
            send_all(self.sock, self.conn.posted_write(index, offset, bytes(data)))
            return
        for pos in range(0, len(data), self.max_data_xfer_size) if data else (0,):
            req = m.RegionWriteRequest(index, offset + pos, bytes(data[pos:pos + self.max_data_xfer_size]),
                                       no_reply=posted)
            if posted:
                self.send(req)
            else:
                self.call(req)

    def region_write_multi(self, writes: Sequence[tuple[int, int, bytes]], posted: bool = True) -> None:
        """REGION_WRITE_MULTI of (region, offset, <= 8 bytes) writes, NO_REPLY like QEMU by default."""
        req = m.RegionWriteMultiRequest(list(writes), no_reply=posted)
        if posted:
            self.send(req)
        else:
            self.call(req)

    def set_irqs(self, index: int, flags: int, start: int = 0, count: int = 0, fds: Sequence[int] = (),
                 data: bytes = b"") -> None:
        """SET_IRQS; eventfds go in chunks of the server's max_msg_fds, like QEMU."""
        fds = list(fds)
        if not fds:
            self.call(m.SetIrqsRequest(index, flags, start, count, data=data))
            return
        if len(fds) != count:
            raise ValueError(f"{len(fds)} fds for count {count}")
        step = max(1, self.max_msg_fds)
        for pos in range(0, count, step):
            chunk = fds[pos:pos + step]
            self.call(m.SetIrqsRequest(index, flags, start + pos, len(chunk), chunk))

    def reset(self) -> None:
        self.call(m.DeviceResetRequest())

    def device_feature(self, flags: int, data: bytes = b"", argsz: int = 0) -> m.DeviceFeatureReply:
        return self.call(m.DeviceFeatureRequest(flags, data, argsz))
