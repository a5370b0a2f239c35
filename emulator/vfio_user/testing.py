"""Run a vfio-user server in-process, on its own asyncio loop in a background thread.

    with ServerThread(backend) as srv:
        with VfioUserClient(srv.path) as client:
            client.negotiate()
            srv.call(lambda: backend.something)   # runs on the server's loop

Everything that touches the backend or the server while it runs must go
through :meth:`ServerThread.call` (the loop thread owns them).  Exceptions
that escape loop callbacks are collected in ``errors`` so a test can assert
that the server never crashed.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, TypeVar

from emulator import pollloop
from emulator.vfio_user.backend import DeviceBackend
from emulator.vfio_user.server import VfioUserServer

T = TypeVar("T")


class ServerThread:
    """A :class:`VfioUserServer` for ``backend`` listening on ``path`` (default: a fresh temp dir)."""

    def __init__(self, backend: DeviceBackend, path: str | None = None, *, log: logging.Logger | None = None,
                 **server_kwargs: Any) -> None:
        self._tmpdir = None if path is not None else tempfile.mkdtemp(prefix="vfio-user-")
        self.path = path if path is not None else os.path.join(self._tmpdir or "", "vfio-user.sock")
        self.backend = backend
        self.loop = pollloop.new_event_loop()
        self.loop.set_exception_handler(self._loop_error)
        try:
            self.server = VfioUserServer(self.path, backend, self.loop, log, **server_kwargs)
        except BaseException:
            self.loop.close()
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
            raise
        self.errors: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._run, name="vfio-user-server", daemon=True)

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.errors.append(context)
        loop.default_exception_handler(context)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start)
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self.call(self.server.close)
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 5.0) -> T:
        """Run ``fn(*args)`` on the server's loop and return its result (or raise its exception)."""
        done = threading.Event()
        result: list[Any] = []

        def run() -> None:
            try:
                result.append((True, fn(*args)))
            except BaseException as e:  # handed to the calling thread
                result.append((False, e))
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        if not done.wait(timeout):
            raise TimeoutError(f"server loop did not run {fn!r} within {timeout} s")
        ok, value = result[0]
        if not ok:
            raise value
        return value

    def wait_until(self, predicate: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Poll ``predicate`` on the loop until it returns something true; TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.call(predicate)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{predicate!r} still false after {timeout} s")
            time.sleep(0.005)

    def wait_disconnected(self, timeout: float = 5.0) -> None:
        """Wait until the server has let its client go."""
        self.wait_until(lambda: not self.server.connected, timeout)
