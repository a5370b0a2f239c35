"""The only socket calls of the package: one recvmsg with fds, one sendmsg with fds (of one
buffer or several), and FIONREAD."""
from __future__ import annotations

import array
import fcntl
import socket
import termios
from typing import Sequence

_FD_SIZE = array.array("i").itemsize
# plain ints: the socket module's IntFlag members cost an enum operation per use on the hot path
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)
_MSG_NOSIGNAL = int(socket.MSG_NOSIGNAL)


_FIONREAD = termios.FIONREAD
_INT0 = bytes(4)


def bytes_waiting(fd: int) -> int:
    """Bytes waiting in a stream socket's receive queue (FIONREAD): 0 when a recvmsg would
    find nothing (EAGAIN), and also at the end of the stream or on an error, which the
    loop's next readiness report brings to a recvmsg.  Much cheaper than a recvmsg that
    fails with EAGAIN (no exception)."""
    return int.from_bytes(fcntl.ioctl(fd, _FIONREAD, _INT0), "little")


def ancillary_size(max_fds: int) -> int:
    """Room for ``max_fds`` SCM_RIGHTS fds in one recvmsg."""
    return socket.CMSG_SPACE(max_fds * _FD_SIZE)


def recv_chunk(sock: socket.socket, size: int, ancsize: int) -> tuple[bytes, list[int], bool]:
    """One recvmsg of at most ``size`` bytes: (data, fds, control data truncated).

    fds arrive close-on-exec.  ``data == b""`` is the end of the stream.
    """
    data, ancdata, flags, _ = sock.recvmsg(size, ancsize, _MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds += array.array("i", payload[:len(payload) - len(payload) % _FD_SIZE])
    return data, fds, bool(flags & _MSG_CTRUNC)


def send_chunk(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int] = ()) -> int:
    """One sendmsg; the fds travel with the first byte.  Returns the bytes sent."""
    if fds:
        return sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                            _MSG_NOSIGNAL)
    return sock.send(data, _MSG_NOSIGNAL)


def send_parts(sock: socket.socket, parts: Sequence[bytes | memoryview], fds: Sequence[int] = ()) -> int:
    """One sendmsg of several buffers (iovecs); the fds travel with the first byte.  Returns the
    bytes sent."""
    if fds:
        return sock.sendmsg(parts, [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                            _MSG_NOSIGNAL)
    return sock.sendmsg(parts, (), _MSG_NOSIGNAL)


def send_all(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Blocking send of a whole message, fds with its first byte."""
    sent = send_chunk(sock, data, fds)
    if sent < len(data):
        sock.sendall(memoryview(data)[sent:], _MSG_NOSIGNAL)
