"""Sans-IO vfio-user connection: bytes and fds in, typed messages out, and back.

Modelled on h11: the :class:`Connection` never touches a socket.  The
transport feeds it what ``recvmsg`` returned (:meth:`receive_data`, an empty
``data`` meaning end of stream): any number of messages, or part of one.
Linux hands out SCM_RIGHTS fds with the first byte of the sender's
``sendmsg`` and ends a read right after the data that brought them, so the
fds of a chunk go to the message holding its last byte (a reader that asks
for exactly :meth:`next_read_size` bytes, header then body, gets the same
attribution).

:meth:`next_event` returns a request or reply message, an
:class:`InvalidMessage` (the message was skipped, the stream is still in
sync; answer it with an error reply if ``needs_reply``), ``NEED_DATA``, or
``CLOSED``; with ``posted_writes=True`` a server's posted REGION_WRITE of
1-8 bytes (a doorbell) comes out as a plain :data:`PostedWrite` tuple, with
no message object.  A header that cannot be trusted (msg_size < 16 or above the
limit, unknown type bits) raises :class:`FatalProtocolError`, now and on every
later call: drop the peer.  fds of anything that is not handed out inside a
message are closed here.  :meth:`export_input` and :meth:`import_input` move
what was received and not handed out yet to another connection (a hand-over).

:meth:`send` turns a message into ``(bytes, fds)``, assigning request ids
and enforcing the reply rules: only requests that asked for a reply get one,
exactly once, and only a GET_REGION_INFO reply may carry an fd (one).
"""
from __future__ import annotations

import errno
import enum
import os
import struct
from collections import deque
from dataclasses import dataclass
from typing import Iterable

from emulator.vfio_user import protocol as p
from emulator.vfio_user.messages import REPLY_TYPES, REQUEST_TYPES, SERVER_REQUESTS, ErrorReply, Message
from emulator.vfio_user.protocol import Buffer, FatalProtocolError, LocalProtocolError, MessageError


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")
CLOSED = _Sentinel("CLOSED")


@dataclass(slots=True)
class InvalidMessage:
    """A message that was received whole but could not be accepted."""

    msg_id: int
    command: int
    errno: int
    reason: str
    is_reply: bool = False
    no_reply: bool = False
    unsolicited: bool = False  # a reply to no request of ours

    @property
    def needs_reply(self) -> bool:
        return not (self.is_reply or self.no_reply)


# A posted (NO_REPLY) REGION_WRITE of 1-8 bytes, the hot message (a doorbell), as
# (region, offset, data): decoded without a message object when the connection was
# made with ``posted_writes=True``.
PostedWrite = tuple[int, int, bytes]

Event = Message | InvalidMessage | _Sentinel | PostedWrite

_REGION_WRITE = int(p.Command.REGION_WRITE)
_POSTED = p.TYPE_COMMAND | p.FLAG_NO_REPLY
_REGION_ACCESS = p.REGION_ACCESS
_SMALL_WRITE_HEAD = p.HEADER_SIZE + p.REGION_ACCESS.size
_SMALL_WRITE = _SMALL_WRITE_HEAD + 8
_SMALL_WRITE_UNPACK = struct.Struct(p.HEADER.format + p.REGION_ACCESS.format.lstrip("<=")).unpack_from


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Connection:
    """One end of a vfio-user stream, as ``role``."""

    def __init__(self, role: Role, *, max_fds: int = p.MAX_MSG_FDS, max_msg_size: int = p.MAX_MSG_SIZE,
                 posted_writes: bool = False) -> None:
        self.role = role
        # a server's posted REGION_WRITEs of 1-8 bytes come out as PostedWrite tuples
        self._posted = posted_writes and role is Role.SERVER
        self.max_fds = max_fds
        self.max_msg_size = max_msg_size
        self._accepts = {cmd: cls for cmd, cls in REQUEST_TYPES.items()
                         if (cmd in SERVER_REQUESTS) == (role is Role.CLIENT)}
        self._sends = frozenset(REQUEST_TYPES.keys() - self._accepts.keys())
        # Received bytes not yet handed out start at _buf[_pos]: a chunk as recvmsg returned
        # it (bytes, no copy) or, while a message is incomplete, a bytearray collecting it.
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._rx = 0  # stream bytes received so far
        self._size = 0  # msg_size of the message at _buf[_pos] once its header is in, else 0
        # (stream offset of the last byte of the chunk they came with, fds, control data truncated)
        self._fds: deque[tuple[int, list[int], bool]] = deque()
        self._eof = False
        self._error: FatalProtocolError | None = None
        self._next_id = 0
        self.awaiting_reply: dict[int, int] = {}  # our requests: msg_id -> command
        self._owed: dict[int, list[int]] = {}  # the peer's requests that want a reply: msg_id -> commands

    # -- receiving ----------------------------------------------------------------
    def receive_data(self, data: bytes, fds: Iterable[int] = (), fds_truncated: bool = False) -> None:
        """Feed what one recvmsg returned (any number of messages, or part of one);
        ``data == b""`` is the end of the stream."""
        fds = list(fds)
        if self._error is not None or self._eof:
            close_fds(fds)
            return
        if not data:
            self._eof = True
            close_fds(fds)
            return
        if type(data) is not bytes:  # held without a copy below: must not change under us
            data = bytes(data)
        self._rx += len(data)
        if fds or fds_truncated:
            self._fds.append((self._rx - 1, fds, fds_truncated))
        buf, pos = self._buf, self._pos
        if pos >= len(buf):  # nothing left over: hold the chunk itself
            self._buf, self._pos = data, 0
        else:  # a partial message waits: append (a bytearray from here on)
            if type(buf) is not bytearray:
                buf = bytearray(memoryview(buf)[pos:])
            elif pos:
                del buf[:pos]
            buf += data
            self._buf, self._pos = buf, 0
        if not self._size:
            self._parse_header()

    def next_read_size(self) -> int:
        """Bytes to ask recvmsg for to complete the current header or body (0: none now).

        Reading exactly that keeps every fd with its message; a reader may
        ask for more (several messages in one read): the codec attributes fds
        by stream position either way."""
        if self._error is not None or self._eof:
            return 0
        have = len(self._buf) - self._pos
        if not self._size:
            return p.HEADER_SIZE - have
        return max(0, self._size - have)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out in a message."""
        return len(self._buf) - self._pos

    @property
    def at_message_boundary(self) -> bool:
        """Nothing of a message is buffered (a connection may be handed over now)."""
        return self._pos >= len(self._buf) and not self._fds and self._error is None

    def export_input(self) -> tuple[bytes, list[tuple[int, bool, list[int]]]]:
        """What was received and not handed out yet, for a new owner of the stream:
        (bytes, [(index of the last byte of the read that brought them, control data
        truncated, dups of the fds)]).  This connection keeps its own copy."""
        if self._error is not None:
            raise self._error
        start = self._rx - (len(self._buf) - self._pos)
        entries: list[tuple[int, bool, list[int]]] = []
        try:
            for last, fds, cut in self._fds:
                entries.append((last - start, cut, []))
                for fd in fds:
                    entries[-1][2].append(os.dup(fd))
        except OSError:
            close_fds(fd for _, _, dups in entries for fd in dups)
            raise
        return bytes(memoryview(self._buf)[self._pos:]), entries

    def import_input(self, data: bytes, entries: Iterable[tuple[int, bool, list[int]]]) -> None:
        """Take over :meth:`export_input`'s result (consumes its fds), as if it had been received
        here.  ValueError (fds closed) for an entry outside ``data`` or out of order."""
        entries = list(entries)
        pos = 0
        for i, (last, cut, fds) in enumerate(entries):
            if not pos <= last < len(data):
                close_fds(fd for _, _, rest in entries[i:] for fd in rest)
                raise ValueError(f"buffered fds at byte {last} of {len(data)}")
            self.receive_data(data[pos:last + 1], fds, cut)
            pos = last + 1
        if pos < len(data):
            self.receive_data(data[pos:])

    def _parse_header(self) -> None:
        pos = self._pos
        if len(self._buf) - pos < p.HEADER_SIZE:
            return
        msg_id, command, size, flags, _ = p.HEADER.unpack_from(self._buf, pos)
        kind = flags & p.FLAGS_TYPE_MASK
        if size < p.HEADER_SIZE or size > self.max_msg_size or kind not in (p.TYPE_COMMAND, p.TYPE_REPLY):
            self._fail(f"bad header (msg_id {msg_id}, command {command}, msg_size {size}, flags 0x{flags:x})")
        else:
            self._size = size

    def _fail(self, reason: str) -> None:
        self._error = FatalProtocolError(reason)
        self._discard()

    def _discard(self) -> None:
        self._buf, self._pos = b"", 0
        self._size = 0
        while self._fds:
            close_fds(self._fds.popleft()[1])

    def next_event(self) -> Event:
        if self._error is not None:
            raise self._error
        size, buf, pos = self._size, self._buf, self._pos
        if not size or len(buf) - pos < size:
            if self._eof:
                self._discard()  # a partial message and its fds
                return CLOSED
            return NEED_DATA
        end = pos + size
        if _SMALL_WRITE_HEAD < size <= _SMALL_WRITE and self._posted and not self._fds:
            # maybe a posted write of 1-8 bytes: header and access in one unpack
            _, command, _, flags, _, offset, region, count = _SMALL_WRITE_UNPACK(buf, pos)
            if command == _REGION_WRITE and flags == _POSTED and count == size - _SMALL_WRITE_HEAD:
                self._pos, self._size = end, 0  # (else the general path decides, or rejects it)
                if len(buf) - end >= p.HEADER_SIZE:
                    self._parse_header()
                data = buf[end - count:end]
                return region, offset, data if type(data) is bytes else bytes(data)
        msg_id, command, _, flags, err = p.HEADER.unpack_from(buf, pos)
        if type(buf) is bytes:
            payload = memoryview(buf)[pos + p.HEADER_SIZE:end]  # no copy: bytes never change
        else:
            payload = memoryview(bytes(memoryview(buf)[pos + p.HEADER_SIZE:end]))
        self._pos = end
        fds: list[int] = []
        truncated = False
        if self._fds:
            stop = self._rx - (len(buf) - end)  # stream offset just past this message
            while self._fds and self._fds[0][0] < stop:
                _, more, cut = self._fds.popleft()
                fds += more
                truncated |= cut
        self._size = 0
        if len(buf) - end >= p.HEADER_SIZE:
            self._parse_header()
        if flags & p.FLAGS_TYPE_MASK == p.TYPE_REPLY:
            return self._reply(msg_id, command, flags, err, payload, fds, truncated)
        return self._request(msg_id, command, flags, payload, fds, truncated)

    def _request(self, msg_id: int, command: int, flags: int, payload: memoryview,
                 fds: list[int], truncated: bool) -> Event:
        no_reply = bool(flags & p.FLAG_NO_REPLY)
        if not no_reply:
            self._owed.setdefault(msg_id, []).append(command)
        cls = self._accepts.get(command)
        if cls is None and command in p.KNOWN_COMMANDS:
            err = MessageError(f"{p.command_name(command)} is not a request a {self.role.value} accepts",
                               errno.ENOTSUP if command not in REQUEST_TYPES else errno.EINVAL)
        elif cls is None:
            err = MessageError(f"unknown command {command}")
        elif flags & ~(p.FLAGS_TYPE_MASK | p.FLAG_NO_REPLY):
            err = MessageError(f"request flags 0x{flags:x}")
        else:
            return self._decode(cls, msg_id, command, payload, fds, truncated, no_reply=no_reply)
        return self._invalid(msg_id, command, fds, err, no_reply=no_reply)

    def _reply(self, msg_id: int, header_command: int, flags: int, err: int, payload: memoryview,
               fds: list[int], truncated: bool) -> Event:
        command = self.awaiting_reply.pop(msg_id, None)  # QEMU too trusts the id, not the command
        if command is None:
            close_fds(fds)
            return InvalidMessage(msg_id, header_command, errno.EINVAL, f"reply {msg_id} answers no request",
                                  is_reply=True, unsolicited=True)
        if flags & p.FLAG_ERROR:
            close_fds(fds)
            return ErrorReply(command, err, msg_id=msg_id)
        return self._decode(REPLY_TYPES[command], msg_id, command, payload, fds, truncated, is_reply=True)

    def _decode(self, cls: type[Message], msg_id: int, command: int, payload: memoryview, fds: list[int],
                truncated: bool, is_reply: bool = False, no_reply: bool = False) -> Event:
        try:
            self._check_fds(cls, fds, truncated)
            msg = cls.decode(payload, fds)
        except MessageError as e:
            return self._invalid(msg_id, command, fds, e, is_reply, no_reply)
        msg.msg_id = msg_id
        msg.no_reply = no_reply
        return msg

    @staticmethod
    def _invalid(msg_id: int, command: int, fds: list[int], err: MessageError,
                 is_reply: bool = False, no_reply: bool = False) -> InvalidMessage:
        close_fds(fds)
        return InvalidMessage(msg_id, command, err.errno, err.reason, is_reply, no_reply)

    def _check_fds(self, cls: type[Message], fds: list[int], truncated: bool) -> None:
        if truncated:
            raise MessageError("control data truncated: more fds than the receiver accepts")
        if len(fds) > min(cls.MAX_FDS, self.max_fds):
            raise MessageError(f"{cls.__name__} with {len(fds)} fds")

    # -- sending -----------------------------------------------------------------------
    def send(self, msg: Message) -> tuple[bytes, list[int]]:
        """Encode ``msg``; a request without an id (-1) gets the next one."""
        parts, _, fds = self.send_parts(msg)
        return b"".join(parts), fds

    def posted_write(self, region: int, offset: int, data: bytes) -> bytes:
        """A client's posted REGION_WRITE of 1-8 bytes, encoded without a message object
        (the same bytes :meth:`send` makes of ``RegionWriteRequest(..., no_reply=True)``)."""
        count = len(data)
        if self.role is not Role.CLIENT or not 0 < count <= 8:
            raise LocalProtocolError(f"not a client's posted write of 1-8 bytes ({count} bytes)")
        msg_id = self._next_id
        self._next_id = (msg_id + 1) & 0xFFFF
        return (p.HEADER.pack(msg_id, _REGION_WRITE, _SMALL_WRITE_HEAD + count, _POSTED, 0)
                + _REGION_ACCESS.pack(offset, region, count) + data)

    def send_parts(self, msg: Message) -> tuple[list[Buffer], int, list[int]]:
        """:meth:`send` without joining: (header and payload buffers, their total size, fds),
        for a ``sendmsg`` with iovecs (no copy of a large payload)."""
        fds = msg.attached_fds()
        command = msg.COMMAND
        errno_ = 0
        if msg.IS_REPLY:
            flags = p.TYPE_REPLY
            if type(msg) is ErrorReply:
                command, errno_, flags = msg.command, msg.errno, p.TYPE_REPLY | p.FLAG_ERROR
            owed = self._owed.get(msg.msg_id, ())
            if command not in owed:
                raise LocalProtocolError(f"no {p.command_name(command)} request {msg.msg_id} waits for a reply")
            if fds and (command != p.Command.DEVICE_GET_REGION_INFO or len(fds) > 1):
                raise LocalProtocolError(f"a {p.command_name(command)} reply cannot carry {len(fds)} fds")
            owed.remove(command)  # type: ignore[union-attr]
            if not owed:
                del self._owed[msg.msg_id]
        else:
            if command not in self._sends:
                raise LocalProtocolError(f"a {self.role.value} does not send {p.command_name(command)} requests")
            if len(fds) > msg.MAX_FDS:
                raise LocalProtocolError(f"{type(msg).__name__} with {len(fds)} fds")
            if msg.msg_id < 0:
                msg.msg_id = self._next_id
                self._next_id = (self._next_id + 1) & 0xFFFF
            flags = p.FLAG_NO_REPLY if msg.no_reply else p.TYPE_COMMAND
            if not msg.no_reply:
                self.awaiting_reply[msg.msg_id] = command
        parts = msg.parts()
        size = p.HEADER_SIZE + sum(len(part) for part in parts)
        if size > self.max_msg_size:
            raise LocalProtocolError(f"{type(msg).__name__} of {size} bytes is over the message size limit")
        return [p.HEADER.pack(msg.msg_id, command, size, flags, errno_), *parts], size, fds

    def close(self) -> None:
        """Drop buffered data and close the fds that came with it."""
        self._eof = True
        self._discard()
