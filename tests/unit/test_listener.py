"""The accept back-off shared by the vfio-user and control socket servers
(emulator/vfio_user/listener.py): no spinning on a listener whose accept fails."""
from __future__ import annotations

import errno
import logging
import socket
from typing import Any, Callable

from emulator.vfio_user import listener
from emulator.vfio_user.listener import accept_or_back_off

LOG = logging.getLogger("test")


class FakeLoop:
    def __init__(self) -> None:
        self.removed: list[int] = []
        self.later: list[tuple[float, Callable[[], Any]]] = []

    def remove_reader(self, fd: int) -> None:
        self.removed.append(fd)

    def call_later(self, delay: float, callback: Callable[[], Any]) -> None:
        self.later.append((delay, callback))


class FailingListener:
    def fileno(self) -> int:
        return 42

    def accept(self) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")


def test_failed_accept_backs_off_then_resumes(caplog):
    loop, resumed = FakeLoop(), []
    with caplog.at_level(logging.ERROR, logger="test"):
        got = accept_or_back_off(FailingListener(), loop, LOG, "control accept",  # type: ignore[arg-type]
                                 lambda: resumed.append(True))
    assert got is None and loop.removed == [42]
    assert [d for d, _ in loop.later] == [listener.ACCEPT_BACKOFF] and not resumed
    loop.later[0][1]()
    assert resumed == [True]
    assert "control accept failed" in caplog.text


def test_nothing_waiting_and_a_connection(tmp_path):
    loop = FakeLoop()
    path = str(tmp_path / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as srv:
        srv.bind(path)
        srv.listen(1)
        srv.setblocking(False)
        assert accept_or_back_off(srv, loop, LOG, "accept", lambda: None) is None  # type: ignore[arg-type]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            sock = accept_or_back_off(srv, loop, LOG, "accept", lambda: None)  # type: ignore[arg-type]
            assert sock is not None
            sock.close()
    assert loop.removed == [] and loop.later == []
