"""The vfio-user server: a UNIX socket on an asyncio loop, one client at a time.

The socket layer reads up to ``READ_SIZE`` bytes per non-blocking
``recvmsg`` (several queued messages, e.g. the doorbell writes a guest rang
in a row, in one system call); the codec keeps every fd with its message by
stream position (Linux ends a read right after the data that brought fds).
It drains everything available per wakeup (up to a budget of messages, so that
device timers on the same loop still run), hands each message to the
:class:`~emulator.vfio_user.session.Session` strictly in arrival order and
sends the replies.  A hand-over moves what was read and not handled yet
(part of a message, and its fds) with the connection.  Output that does not
fit the socket is queued and reading pauses until it drains.  Any fatal protocol error, socket error or internal
error drops that client only; the server then accepts the next one.  Device
state lives in the backend and survives clients.

No client can hold the socket hostage:

* a client that has not sent VERSION within ``handshake_timeout`` seconds of
  being served is dropped;
* a client that connects while another is attached waits (unread) for at
  most ``busy_wait`` seconds: it is served as soon as the attached client
  leaves (a QEMU restarted right after the previous one exited attaches),
  otherwise its VERSION is answered with an EBUSY error and it is closed.
  At most ``MAX_WAITING`` wait; more are closed at once.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import struct
from collections import deque
from typing import Any

from emulator.vfio_user import protocol as p
from emulator.vfio_user.backend import DeviceBackend
from emulator.vfio_user.codec import CLOSED, NEED_DATA, Connection, InvalidMessage, Role, close_fds
from emulator.vfio_user.dmawrite import Mode
from emulator.vfio_user.listener import accept_or_back_off
from emulator.vfio_user.messages import Message
from emulator.vfio_user.session import HandoverState, Session
from emulator.vfio_user.sockio import ancillary_size, bytes_waiting, recv_chunk, send_chunk, send_parts


MAX_WAITING = 4  # connections waiting for the attached client to leave
READ_SIZE = 1 << 16  # bytes asked of one recvmsg (several messages; more to finish a big one)


class _Client:
    __slots__ = ("sock", "fd", "conn", "session", "out", "timer", "reading")

    def __init__(self, sock: socket.socket, conn: Connection, session: Session) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.conn = conn
        self.session = session
        self.out: deque[tuple[memoryview, list[int]]] = deque()  # unsent output, fds with its first byte
        self.timer: asyncio.TimerHandle | None = None  # the handshake deadline
        self.reading = True  # False while paused for a hand-over (messages wait in the socket)


class VfioUserServer:
    """Serves one :class:`DeviceBackend` on the UNIX socket ``path``."""

    def __init__(self, path: str | os.PathLike[str], backend: DeviceBackend, loop: asyncio.AbstractEventLoop,
                 log: logging.Logger | None = None, *, max_msg_fds: int = p.MAX_MSG_FDS,
                 max_data_xfer_size: int = p.MAX_DATA_XFER_SIZE, budget: int = 256,
                 handshake_timeout: float = 10.0, busy_wait: float = 3.0,
                 visible_writes: Mode = "off") -> None:
        if not 1 <= max_msg_fds <= 16:  # QEMU refuses a server advertising more than 16
            raise ValueError(f"max_msg_fds {max_msg_fds} outside 1..16")
        if not p.PGSIZE <= max_data_xfer_size <= p.MAX_MSG_SIZE - 64:  # QEMU reads 4 KiB of config at once
            raise ValueError(f"max_data_xfer_size {max_data_xfer_size} outside 4096..{p.MAX_MSG_SIZE - 64}")
        self.path = os.fspath(path)
        self.backend = backend
        self.loop = loop
        self.log = log or logging.getLogger(__name__)
        self.max_msg_fds = max_msg_fds
        self.max_data_xfer_size = max_data_xfer_size
        self._budget = budget  # messages handled per wakeup
        self.visible_writes = visible_writes  # device writes sent as DMA_WRITE (dmawrite.py)
        self._ancsize = ancillary_size(max_msg_fds)
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._client: _Client | None = None
        self._closed = False
        self.handshake_timeout = handshake_timeout
        self.busy_wait = busy_wait
        self._waiting: deque[tuple[socket.socket, asyncio.TimerHandle]] = deque()

    # -- listening -------------------------------------------------------------------
    def start(self) -> None:
        """Bind (mode 0600, replacing a stale socket file) and start accepting."""
        if self._listener is not None:
            raise RuntimeError("server already started")
        self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)  # never world-accessible, not even between bind and chmod
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            sock.listen(4)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self._closed = False
        self._accept(True)
        self.log.info("vfio-user server listening on %s", self.path)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket; not replacing it", self.path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                os.unlink(self.path)
                self.log.info("removed stale socket %s", self.path)
                return
            except FileNotFoundError:
                return
            except TimeoutError:
                pass
        raise OSError(errno.EADDRINUSE, "another server is listening", self.path)

    def _accept(self, on: bool) -> None:
        if self._listener is None:
            return
        if on:
            self.loop.add_reader(self._listener.fileno(), self._on_accept)
        else:
            self.loop.remove_reader(self._listener.fileno())

    def _on_accept(self) -> None:
        assert self._listener is not None
        sock = accept_or_back_off(self._listener, self.loop, self.log, "accept", lambda: self._accept(True))
        if sock is None:
            return
        if self._client is not None or self._waiting:
            self._hold(sock)
            return
        self._serve(sock, None)

    def _hold(self, sock: socket.socket) -> None:
        """A connection while a client is attached: it waits, bounded (see the module text)."""
        if len(self._waiting) >= MAX_WAITING:
            self.log.warning("refused a vfio-user client: another client is attached and %d are waiting",
                             len(self._waiting))
            sock.close()
            return
        sock.setblocking(False)
        self._waiting.append((sock, self.loop.call_later(self.busy_wait, self._refuse, sock)))

    def _refuse(self, sock: socket.socket) -> None:
        """Answer a waiting client's first request with EBUSY, then close it."""
        self._waiting = deque(w for w in self._waiting if w[0] is not sock)
        self.log.warning("refused a vfio-user client after %.1f s: another client is attached", self.busy_wait)
        try:
            head = sock.recv(p.HEADER_SIZE, socket.MSG_PEEK)
            if len(head) == p.HEADER_SIZE:
                msg_id, command = p.HEADER.unpack(head)[:2]
                send_chunk(sock, p.HEADER.pack(msg_id, command, p.HEADER_SIZE, p.TYPE_REPLY | p.FLAG_ERROR,
                                               errno.EBUSY))
            for _ in range(64):  # drain what it sent (closing over unread data would reset the reply)
                data, fds, _ = recv_chunk(sock, 1 << 16, self._ancsize)
                close_fds(fds)
                if not data:
                    break
        except OSError:
            pass
        sock.close()

    def _serve_next(self) -> None:
        """Serve the longest-waiting connection, if any (the attached client left)."""
        if self._waiting and self._client is None and not self._closed:
            sock, timer = self._waiting.popleft()
            timer.cancel()
            self._serve(sock, None)

    def _handshake_expired(self, c: _Client) -> None:
        c.timer = None
        if self._client is c and not c.session.negotiated:
            self._drop(c, p.FatalProtocolError(f"no VERSION within {self.handshake_timeout:g} s"))

    def _serve(self, sock: socket.socket, state: HandoverState | None, reading: bool = True,
               device_state: dict[str, Any] | None = None) -> None:
        sock.setblocking(False)
        session = None
        pending: tuple[bytes, list[tuple[int, bool, list[int]]]] = (b"", [])
        if state is not None:
            pending = state.take_input()  # read by the old owner, not yet handled
        try:
            if device_state:
                load = getattr(self.backend, "import_device_state", None)
                if load is None:
                    raise ValueError("this device backend takes no device state")
                load(device_state)
            session = Session(self.backend, self.log, watch=self.loop.add_reader, unwatch=self.loop.remove_reader,
                              max_msg_fds=self.max_msg_fds, max_data_xfer_size=self.max_data_xfer_size,
                              visible_writes=self.visible_writes, notify=self._schedule_requests)
            session.attach()
            if state is not None:
                session.restore(state)
        except Exception:
            self.log.exception("cannot attach the device to a new client")
            if session is not None:
                session.close()
            sock.close()
            self._accept(not self._closed)
            close_fds(fd for _, _, fds in pending[1] for fd in fds)
            if state is not None:
                state.close()
                raise
            self._serve_next()
            return
        conn = Connection(Role.SERVER, max_fds=self.max_msg_fds, posted_writes=True)
        try:
            conn.import_input(*pending)
        except ValueError as e:  # a hand-over state that lies about its input: not this stream
            self.log.error("hand-over input refused: %s", e)
            session.close()
            sock.close()
            self._accept(not self._closed)
            raise
        client = _Client(sock, conn, session)
        self._client = client
        if state is None:
            client.timer = self.loop.call_later(self.handshake_timeout, self._handshake_expired, client)
        client.reading = reading
        if reading:
            self.loop.add_reader(client.fd, self._on_readable)
        self.log.info("vfio-user client connected%s", "" if state is None else " (handed over)")

    # -- the receive path ------------------------------------------------------------------
    def _on_readable(self) -> None:
        """Handle what is buffered, then read and handle until the socket is empty, at most
        ``budget`` messages per call (the rest after the loop's other work)."""
        c = self._client
        if c is None or not c.reading:
            return
        conn = c.conn
        sock, fd, ancsize = c.sock, c.fd, self._ancsize
        left = self._budget
        first = True
        try:
            while True:
                left = self._process(c, left)
                if left <= 0:
                    if not left:  # budget spent: more may be buffered, come back soon
                        self.loop.call_soon(self._on_readable)
                    return
                # Read on until the socket is empty even after a short read: a message that
                # arrived while these were handled (the second of a doorbell pair) costs a
                # recvmsg here, and a whole loop wakeup otherwise.  After the first read,
                # FIONREAD says whether one waits: a recvmsg failing with EAGAIN costs
                # several times more.  (The end of the stream or an error reads as 0 there:
                # the loop reports the socket readable again and the recvmsg sees it.)
                if not first and not bytes_waiting(fd):
                    return
                first = False
                size = conn.next_read_size()
                if size < READ_SIZE:
                    size = READ_SIZE
                try:
                    data, fds, truncated = recv_chunk(sock, size, ancsize)
                except (BlockingIOError, InterruptedError):
                    return
                conn.receive_data(data, fds, truncated)
        except Exception as e:  # fatal protocol error, socket error, or a bug: drop this client only
            self._drop(c, e)

    def _process(self, c: _Client, left: int) -> int:
        """Handle up to ``left`` whole messages buffered; the budget left (0: spent), or -1
        once the client is gone, paused for a hand-over or has output waiting."""
        conn, session = c.conn, c.session
        posted_write = session.posted_write
        while left > 0:
            if not c.reading:
                return -1
            ev = conn.next_event()
            left -= 1
            if type(ev) is tuple:  # a posted write of 1-8 bytes, e.g. a doorbell: the hot path
                posted_write(*ev)
                continue
            if ev is NEED_DATA:
                return -1 if c.out else left + 1
            if ev is CLOSED:
                self._drop(c, None)
                return -1
            if type(ev) is InvalidMessage:
                reply = session.invalid(ev)
            else:
                reply = session.handle(ev)  # type: ignore[arg-type]
            if reply is not None:
                self._send(c, reply)
            if self._client is not c:
                return -1
        return 0

    # -- the send path ---------------------------------------------------------------------
    def _schedule_requests(self) -> None:
        """The session has requests for the client: send them once the current message is handled."""
        self.loop.call_soon(self._send_requests)

    def _send_requests(self) -> None:
        c = self._client
        if c is None:
            return
        try:
            msgs = c.session.take_requests()
            for msg in msgs:
                self._send(c, msg)
            c.session.requests_sent()
        except Exception as e:  # noqa: BLE001 - a socket error or a bug: drop this client only
            self._drop(c, e)

    def _send(self, c: _Client, msg: Message) -> None:
        parts, size, fds = c.conn.send_parts(msg)  # header and payload as iovecs: no copy
        if c.out:
            c.out.append((memoryview(b"".join(parts)), fds))
            return
        try:
            sent = send_parts(c.sock, parts, fds)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < size:  # (copied once, here, to keep what the socket did not take)
            c.out.append((memoryview(b"".join(parts))[sent:], [] if sent else fds))
            self.loop.remove_reader(c.fd)
            self.loop.add_writer(c.fd, self._on_writable)

    def _on_writable(self) -> None:
        c = self._client
        if c is None:
            return
        assert c.reading
        try:
            while c.out:
                data, fds = c.out[0]
                try:
                    sent = send_chunk(c.sock, data, fds)
                except (BlockingIOError, InterruptedError):
                    return
                if sent < len(data):
                    c.out[0] = (data[sent:], [])
                    return
                c.out.popleft()
        except OSError as e:
            self._drop(c, e)
            return
        self.loop.remove_writer(c.fd)
        self.loop.add_reader(c.fd, self._on_readable)
        self.loop.call_soon(self._on_readable)  # messages read before the pause may be buffered

    # -- disconnect, close, hand-over ------------------------------------------------------
    def _release(self, c: _Client) -> None:
        """Forget client ``c`` (socket left open) and accept the next one."""
        self._client = None
        if c.timer is not None:
            c.timer.cancel()
            c.timer = None
        self.loop.remove_reader(c.fd)
        self.loop.remove_writer(c.fd)
        c.conn.close()
        c.session.close()
        self._accept(not self._closed)
        self._serve_next()

    def _drop(self, c: _Client, exc: BaseException | None) -> None:
        if self._client is not c:
            return
        if exc is None:
            self.log.info("vfio-user client disconnected")
        elif isinstance(exc, (p.ProtocolError, OSError)):
            self.log.warning("dropping vfio-user client: %s", exc)
        else:
            self.log.error("dropping vfio-user client after an internal error", exc_info=exc)
        self._release(c)
        c.sock.close()

    @property
    def connected(self) -> bool:
        return self._client is not None

    def peer_credentials(self) -> tuple[int, int, int] | None:
        """(pid, uid, gid) of the connected client (SO_PEERCRED), or None."""
        c = self._client
        if c is None:
            return None
        try:
            raw = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        pid, uid, gid = struct.unpack("3i", raw)
        return pid, uid, gid

    @property
    def session(self) -> Session | None:
        return self._client.session if self._client is not None else None

    def disconnect(self) -> None:
        """Drop the current client (if any) as if it had gone away."""
        if self._client is not None:
            self._drop(self._client, None)

    def close(self) -> None:
        """Drop the client, stop listening, remove the socket file (if still ours)."""
        self._closed = True
        for sock, timer in self._waiting:
            timer.cancel()
            sock.close()
        self._waiting.clear()
        self.disconnect()
        if self._listener is not None:
            self._accept(False)
            self._listener.close()
            self._listener = None
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def detach_connection(self) -> tuple[socket.socket, HandoverState]:
        """Stop serving the live client and hand back its socket and state.

        The session is torn down here as on a disconnect (backend detached,
        device state kept); the returned state holds duplicates of the DMA and
        interrupt fds, and what was read of the socket and not handled yet
        (part of a message, with duplicates of its fds).  Raises RuntimeError
        when no client is connected or a reply is half sent (call again later).
        """
        c = self._client
        if c is None:
            raise RuntimeError("no client connected")
        if c.out or c.session.requests_pending:
            raise RuntimeError("a reply is half sent or DMA_WRITEs await replies")
        state = c.session.export()
        try:
            state.input, state.input_fds = c.conn.export_input()
        except BaseException:
            state.close()
            raise
        self._release(c)
        self.log.info("vfio-user client detached for hand-over")
        return c.sock, state

    def adopt_connection(self, sock: socket.socket, state: HandoverState, *, reading: bool = True,
                         device_state: dict[str, Any] | None = None) -> None:
        """Serve a live, negotiated connection detached elsewhere (consumes ``state``'s fds).

        ``device_state`` (from the other server's :meth:`export_connection`)
        is loaded into the backend first.  With ``reading=False`` the session
        is set up (DMA maps, interrupt fds) but the socket is not read until
        :meth:`start_reading`; :meth:`disconnect` then discards it.
        """
        if self._client is not None:
            state.close()
            sock.close()
            raise RuntimeError("a client is already connected")
        self._accept(False)
        self._serve(sock, state, reading, device_state)

    # -- hand-over in steps: pause, export, (the new owner adopts), release ----------------
    def pause(self) -> None:
        """Stop reading the client (later messages wait in the socket; part of one may be
        buffered here, :meth:`export_connection` carries it).

        RuntimeError when no client is connected, a reply is half sent, or
        DMA_WRITE requests await their replies (call again later).
        """
        c = self._client
        if c is None:
            raise RuntimeError("no client connected")
        if not c.reading:
            return
        if c.out or c.session.requests_pending:
            raise RuntimeError("a reply is half sent or DMA_WRITEs await replies")
        c.reading = False
        self.loop.remove_reader(c.fd)
        self.log.info("vfio-user client paused for hand-over")

    def start_reading(self) -> None:
        """Undo :meth:`pause` (or start an adopted connection): read the socket again."""
        c = self._client
        if c is None:
            raise RuntimeError("no client connected")
        if not c.reading:
            c.reading = True
            self.loop.add_reader(c.fd, self._on_readable)
            self.loop.call_soon(self._on_readable)  # messages may already wait, read or not

    @property
    def buffered(self) -> int:
        """Bytes read from the client's socket and not handled yet (part of a message)."""
        return self._client.conn.buffered if self._client is not None else 0

    @property
    def paused(self) -> bool:
        return self._client is not None and not self._client.reading

    def export_connection(self) -> tuple[int, HandoverState, dict[str, Any]]:
        """For a paused client: a dup of its socket fd, its session and buffered input (fds
        dup'ed) and the backend's opaque device state.  The client stays here, paused, until
        :meth:`release`."""
        c = self._client
        if c is None or c.reading:
            raise RuntimeError("the client is not paused")
        export = getattr(self.backend, "export_device_state", None)
        device = export() if export is not None else {}
        state = c.session.export()
        try:
            state.input, state.input_fds = c.conn.export_input()
            return os.dup(c.fd), state, device
        except BaseException:
            state.close()
            raise

    def release(self) -> None:
        """Forget a paused client for good (its new owner serves it); accept new clients."""
        c = self._client
        if c is None or c.reading:
            raise RuntimeError("the client is not paused")
        self._release(c)
        c.sock.close()
        self.log.info("vfio-user client released after hand-over")
