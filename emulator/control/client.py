"""A blocking control-socket client (JSON-RPC 2.0 lines, fds by SCM_RIGHTS)."""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Sequence

from emulator.control import wire
from emulator.vfio_user.sockio import ancillary_size, recv_chunk, send_all


class ControlError(RuntimeError):
    """The server answered with a JSON-RPC error (or the connection broke: code None)."""

    def __init__(self, method: str, code: int | None, message: str) -> None:
        super().__init__(f"{method}: {message}" + (f" (code {code})" if code is not None else ""))
        self.method = method
        self.code = code
        self.message = message


class ControlClient:
    def __init__(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.path = os.fspath(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except OSError:
            self.sock.close()
            raise
        self._id = 0
        self._buf = bytearray()
        self._fds: list[int] = []
        self._ancsize = ancillary_size(wire.MAX_FDS)

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def call(self, method: str, params: dict[str, Any] | None = None,
             fds: Sequence[int] = ()) -> Any:
        """Call and return the result; any fds in the reply are closed (use call_fds)."""
        result, got = self.call_fds(method, params, fds)
        for fd in got:
            os.close(fd)
        return result

    def call_fds(self, method: str, params: dict[str, Any] | None = None,
                 fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
        """Call ``method``; returns (result, fds received).  ``fds`` are sent, not closed."""
        self._id += 1
        try:
            send_all(self.sock, wire.request(method, params or {}, self._id, len(fds)), fds)
            while True:
                msg = self._read_message()
                nfds = msg.get("nfds", 0)
                got, self._fds = self._fds[:nfds], self._fds[nfds:]
                if msg.get("id") != self._id:
                    for fd in got:
                        os.close(fd)
                    continue
                if "error" in msg:
                    for fd in got:
                        os.close(fd)
                    err = msg["error"]
                    raise ControlError(method, err.get("code"), err.get("message", ""))
                return msg.get("result"), got
        except OSError as e:
            raise ControlError(method, None, f"control socket {self.path}: {e}") from e

    def _read_message(self) -> dict[str, Any]:
        while (nl := self._buf.find(b"\n")) < 0:
            data, fds, _ = recv_chunk(self.sock, 65536, self._ancsize)
            self._fds += fds
            if not data:
                raise ConnectionError("control socket closed")
            self._buf += data
        line = bytes(self._buf[:nl])
        del self._buf[:nl + 1]
        return json.loads(line)  # type: ignore[no-any-return]
