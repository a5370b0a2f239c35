"""The control socket server: JSON-RPC 2.0 requests on an asyncio loop.

Methods are plain callables ``fn(req: Request) -> result`` (any JSON value,
or a :class:`Reply` to return fds as well), or coroutine functions.  A method
raises :class:`MethodError` to refuse (the message goes to the client) and
owns the request's fds (``req.fds``): whatever it does not keep it closes.
Replies go out in request order per connection.  ``on_disconnect`` callbacks
get the :class:`ControlConnection` that went away, so a method can tie state
to the client that asked for it (``req.conn``).
"""
from __future__ import annotations

import asyncio
import errno
import inspect
import json
import logging
import os
import socket
import stat
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Union

from emulator.control import wire
from emulator.vfio_user.codec import close_fds
from emulator.vfio_user.listener import accept_or_back_off
from emulator.vfio_user.sockio import ancillary_size, recv_chunk, send_all


class MethodError(Exception):
    """Raised by a method to refuse the request; ``code`` defaults to METHOD_FAILED."""

    def __init__(self, message: str, code: int = wire.METHOD_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Reply:
    """A method's result with fds to send (they are closed after sending)."""
    result: Any
    fds: list[int] = field(default_factory=list)


class ControlConnection:
    """One connected client; ``data`` is free for methods to tie state to it."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number
        self.buf = bytearray()
        self.fds: list[int] = []
        self.chain: asyncio.Future[None] | None = None  # replies in request order
        self.data: dict[str, Any] = {}
        self.closed = False


@dataclass
class Request:
    method: str
    params: dict[str, Any]
    fds: list[int]
    conn: ControlConnection


Method = Callable[[Request], Union[Any, Awaitable[Any]]]


class ControlServer:
    def __init__(self, path: str | os.PathLike[str], loop: asyncio.AbstractEventLoop,
                 log: logging.Logger | None = None) -> None:
        self.path = os.fspath(path)
        self.loop = loop
        self.log = log or logging.getLogger("nvme-emu.control")
        self.methods: dict[str, Method] = {}
        self.on_disconnect: list[Callable[[ControlConnection], None]] = []
        self._listener: socket.socket | None = None
        self._conns: dict[int, ControlConnection] = {}
        self._count = 0
        self._ancsize = ancillary_size(wire.MAX_FDS)
        self.register("rpc.methods", lambda req: sorted(self.methods))

    def register(self, name: str, fn: Method) -> None:
        """Add (or replace) method ``name``."""
        self.methods[name] = fn

    # -- listening ---------------------------------------------------------------
    def start(self) -> None:
        """Bind with mode 0600 (replacing a stale socket) and accept clients."""
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    try:
                        probe.connect(self.path)
                        raise OSError(errno.EADDRINUSE, "another process listens", self.path)
                    except ConnectionRefusedError:
                        os.unlink(self.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.setblocking(False)
        self._listener = sock
        self.loop.add_reader(sock.fileno(), self._on_accept)
        self.log.info("control socket listening on %s", self.path)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def _on_accept(self) -> None:
        assert self._listener is not None
        fd = self._listener.fileno()
        sock = accept_or_back_off(
            self._listener, self.loop, self.log, "control accept",
            lambda: self._listener is not None and self.loop.add_reader(fd, self._on_accept))
        if sock is None:
            return
        sock.setblocking(False)
        self._count += 1
        conn = ControlConnection(sock, self._count)
        self._conns[sock.fileno()] = conn
        self.loop.add_reader(sock.fileno(), self._on_readable, conn)

    # -- requests ----------------------------------------------------------------
    def _on_readable(self, conn: ControlConnection) -> None:
        try:
            data, fds, truncated = recv_chunk(conn.sock, 65536, self._ancsize)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.log.warning("control client %d: %s", conn.number, e)
            self._drop(conn)
            return
        conn.fds += fds
        if not data or truncated:
            self._drop(conn)
            return
        conn.buf += data
        while (nl := conn.buf.find(b"\n")) >= 0:
            line = bytes(conn.buf[:nl])
            del conn.buf[:nl + 1]
            self._line(conn, line)
            if conn.closed:
                return
        if len(conn.buf) > wire.MAX_LINE:
            self.log.warning("control client %d: line too long", conn.number)
            self._drop(conn)

    def _line(self, conn: ControlConnection, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            self._queue(conn, None, wire.error(None, wire.PARSE_ERROR, "not JSON"))
            return
        if not isinstance(msg, dict):
            self._queue(conn, None, wire.error(None, wire.INVALID_REQUEST, "not an object"))
            return
        nfds = msg.get("nfds", 0)
        if not isinstance(nfds, int) or not 0 <= nfds <= len(conn.fds):
            self.log.warning("control client %d: nfds %r with %d fds received", conn.number, nfds,
                             len(conn.fds))
            self._drop(conn)
            return
        fds, conn.fds = conn.fds[:nfds], conn.fds[nfds:]
        msg_id, method, params = msg.get("id"), msg.get("method"), msg.get("params", {})
        if msg.get("jsonrpc") != "2.0" or not isinstance(method, str) or not isinstance(params, dict):
            close_fds(fds)
            self._queue(conn, None, wire.error(msg_id, wire.INVALID_REQUEST, "not a JSON-RPC 2.0 request"))
            return
        fn = self.methods.get(method)
        if fn is None:
            close_fds(fds)
            self._queue(conn, None, wire.error(msg_id, wire.METHOD_NOT_FOUND, f"no method {method!r}"))
            return
        req = Request(method, params, fds, conn)
        if inspect.iscoroutinefunction(fn):
            self._queue(conn, msg_id, self.loop.create_task(self._run_async(fn, req, msg_id)))
        else:
            self._queue(conn, msg_id, self._run(fn, req, msg_id))

    def _run(self, fn: Method, req: Request, msg_id: Any) -> tuple[bytes, list[int]]:
        try:
            return self._reply(msg_id, fn(req))
        except Exception as e:
            return self._failure(req, msg_id, e)

    async def _run_async(self, fn: Method, req: Request, msg_id: Any) -> tuple[bytes, list[int]]:
        try:
            return self._reply(msg_id, await fn(req))  # type: ignore[misc]
        except Exception as e:
            return self._failure(req, msg_id, e)

    @staticmethod
    def _reply(msg_id: Any, value: Any) -> tuple[bytes, list[int]]:
        if isinstance(value, Reply):
            return wire.result(msg_id, value.result, len(value.fds)), value.fds
        return wire.result(msg_id, value), []

    def _failure(self, req: Request, msg_id: Any, e: Exception) -> tuple[bytes, list[int]]:
        if isinstance(e, MethodError):
            self.log.info("control %s refused: %s", req.method, e)
            return wire.error(msg_id, e.code, str(e)), []
        if isinstance(e, (KeyError, TypeError, ValueError)):
            self.log.info("control %s: bad params: %r", req.method, e)
            return wire.error(msg_id, wire.INVALID_PARAMS, f"bad params: {e!r}"), []
        self.log.exception("control %s failed", req.method)
        return wire.error(msg_id, wire.INTERNAL_ERROR, f"internal error: {e!r}"), []

    def _queue(self, conn: ControlConnection, msg_id: Any,
               out: bytes | tuple[bytes, list[int]] | asyncio.Task[tuple[bytes, list[int]]]) -> None:
        """Send replies in request order (an async method's reply waits for it)."""
        prev = conn.chain

        async def send() -> None:
            if prev is not None:
                await prev
            if isinstance(out, asyncio.Task):
                data, fds = await out
            elif isinstance(out, tuple):
                data, fds = out
            else:
                data, fds = out, []
            self._send(conn, data, fds)

        if (prev is None or prev.done()) and not isinstance(out, asyncio.Task):
            data, fds = out if isinstance(out, tuple) else (out, [])
            self._send(conn, data, fds)
            return
        conn.chain = self.loop.create_task(send())

    def _send(self, conn: ControlConnection, data: bytes, fds: list[int]) -> None:
        try:
            if not conn.closed:
                conn.sock.setblocking(True)
                conn.sock.settimeout(5.0)
                try:
                    send_all(conn.sock, data, fds)
                finally:
                    conn.sock.setblocking(False)
        except OSError as e:
            self.log.warning("control client %d: reply not sent: %s", conn.number, e)
            self._drop(conn)
        finally:
            close_fds(fds)

    def _drop(self, conn: ControlConnection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.sock.fileno(), None)
        self.loop.remove_reader(conn.sock.fileno())
        conn.sock.close()
        close_fds(conn.fds)
        conn.fds = []
        for cb in self.on_disconnect:
            try:
                cb(conn)
            except Exception:
                self.log.exception("control disconnect callback failed")
