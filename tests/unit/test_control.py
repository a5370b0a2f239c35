"""The control socket: JSON-RPC 2.0 lines, fds by SCM_RIGHTS, errors, disconnect callbacks."""
from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from emulator.control import ControlClient, ControlError, ControlServer, MethodError, Reply, Request


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ControlServer, str, list[Any]]]:
    loop = asyncio.new_event_loop()
    path = str(tmp_path / "c.sock")
    server = ControlServer(path, loop)
    gone: list[Any] = []
    server.on_disconnect.append(lambda conn: gone.append(conn.data.get("tag")))
    server.register("echo", lambda req: req.params)

    def tag(req: Request) -> str:
        req.conn.data["tag"] = req.params["tag"]
        return "ok"
    server.register("tag", tag)

    def dup(req: Request) -> Reply:  # takes one fd, hands back two dups of it
        (fd,) = req.fds
        out = Reply({"got": 1}, [os.dup(fd), os.dup(fd)])
        os.close(fd)
        return out
    server.register("dup", dup)

    def refuse(req: Request) -> None:
        raise MethodError("no way")
    server.register("refuse", refuse)

    async def slow(req: Request) -> int:
        await asyncio.sleep(0.01)
        return 7
    server.register("slow", slow)
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        server.start()
        started.set()
        loop.run_forever()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(5)
    yield server, path, gone
    loop.call_soon_threadsafe(server.close)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    loop.close()


def test_calls_errors_and_fds(served: tuple[ControlServer, str, list[Any]]) -> None:
    server, path, gone = served
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with ControlClient(path) as c:
        assert c.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
        assert "echo" in c.call("rpc.methods")
        with pytest.raises(ControlError) as e:
            c.call("nope")
        assert e.value.code == -32601
        with pytest.raises(ControlError) as e:
            c.call("refuse")
        assert e.value.code == -32000 and "no way" in str(e.value)
        with pytest.raises(ControlError) as e:
            c.call("tag", {})  # KeyError in the method: invalid params
        assert e.value.code == -32602
        r, w = os.pipe()
        result, fds = c.call_fds("dup", {}, [w])
        assert result == {"got": 1} and len(fds) == 2
        os.write(fds[0], b"x")
        for fd in (w, *fds):
            os.close(fd)
        assert os.read(r, 1) == b"x"
        os.close(r)
        assert c.call("slow") == 7 and c.call("echo", {"b": 1}) == {"b": 1}  # in order after async
        assert c.call("tag", {"tag": "mmh"}) == "ok"
    deadline = 50
    while not gone and deadline:
        threading.Event().wait(0.02)
        deadline -= 1
    assert gone == ["mmh"]


def test_garbage_is_answered_or_dropped(served: tuple[ControlServer, str, list[Any]]) -> None:
    _, path, _ = served
    with ControlClient(path) as c:
        c.sock.sendall(b"not json\n")
        assert b'"code":-32700' in c.sock.recv(4096)
        c.sock.sendall(b'{"jsonrpc":"2.0","method":5,"id":1}\n')
        assert b'"code":-32600' in c.sock.recv(4096)
        assert c.call("echo", {"still": "alive"}) == {"still": "alive"}
