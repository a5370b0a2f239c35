"""Fixtures for tests that boot real Linux guests (QEMU, TCG) and run the emulator.

* ``guest_env``     the provisioned tool box (scripts/guest-env).  Missing: skipped with
                    "run scripts/guest-env" outside CI; a failure when CI=true.
* ``boot_disk_env`` the tool box plus the host tools that build boot disks (same rule).
* ``guest_workdir`` a short per-test directory (UNIX socket paths must stay < 108 bytes),
                    removed when the test passes, kept (and named in the report) when not.
* ``boot_guest``    ``boot_guest(body_or_spec, *, vfio_user=(), qemu_nvme=(), timeout=180,
                    check=True, wait=True, qmp=False, name="guest")`` -> GuestResult
                    (or the running Guest with ``wait=False``; it is killed at teardown).
* ``fake_emulator_cmd``  argv of tests/guest/fake_emulator.py (listens, never answers).
* ``emulator``      ``emulator(config=None, *, name="emu", expect=None, command=None,
                    timeout=60, settle=0.0)`` -> started EmulatorProcess (stopped at teardown).
                    ``config`` is a YAML path, a dict (written to <workdir>/<name>.yaml with
                    ``state_dir`` defaulting to <workdir>/<name>), or None (embedded default).

When a test fails, the tail of every guest console and emulator log it used is added
to the pytest report.  Tests using these fixtures get the ``guest`` marker automatically.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytest
import yaml

from emulator.guest.emuproc import EmulatorProcess
from emulator.guest.env import GuestEnv, GuestEnvMissing
from emulator.guest.qemu import Guest, GuestResult, GuestSpec, QemuNvme, VfioUserDevice

IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
FAKE_EMULATOR = Path(__file__).with_name("fake_emulator.py")
FAKE_EMULATOR_CMD = [sys.executable, str(FAKE_EMULATOR), "serve"]
WORK_BASE = Path(tempfile.gettempdir()) / "nvme-emu-tests"
GUEST_FIXTURES = {"guest_env", "boot_guest"}


class _Registry:
    """What a test started, for failure reports and teardown."""

    def __init__(self) -> None:
        self.guests: list[Guest] = []
        self.emulators: list[EmulatorProcess] = []
        self.workdirs: list[Path] = []


def _registry(request: pytest.FixtureRequest) -> _Registry:
    reg = getattr(request.node, "_guest_registry", None)
    if reg is None:
        reg = _Registry()
        request.node._guest_registry = reg
    return reg


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if GUEST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.guest)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item._guest_failed = True  # type: ignore[attr-defined]
        reg: _Registry | None = getattr(item, "_guest_registry", None)
        if reg is None:
            return
        for g in reg.guests:
            rep.sections.append((f"guest console tail: {g.name} ({g.console_log})",
                                 g.console_tail(60) or "(empty)"))
        for e in reg.emulators:
            rep.sections.append((f"emulator log tail: {e.name} ({e.log_path})", e.log_tail(60) or "(empty)"))
        for d in reg.workdirs:
            rep.sections.append(("guest test work dir (kept)", str(d)))


@pytest.fixture(scope="session")
def fake_emulator_cmd() -> list[str]:
    """argv prefix of a stand-in emulator that keeps only the process contract."""
    return list(FAKE_EMULATOR_CMD)


@pytest.fixture(scope="session")
def guest_env() -> GuestEnv:
    try:
        return GuestEnv.load()
    except GuestEnvMissing as e:
        if IN_CI:
            pytest.fail(f"CI=true and the guest tool box is missing (guest tests never skip in CI): {e}",
                        pytrace=False)
        pytest.skip(f"run scripts/guest-env ({e})")
        raise  # unreachable


@pytest.fixture(scope="session")
def boot_disk_env(guest_env: GuestEnv) -> GuestEnv:
    """The tool box with the host tools that build boot disks (same skip/fail rule as guest_env)."""
    from emulator.guest.diskimage import require_tools
    try:
        require_tools(guest_env)
    except GuestEnvMissing as e:
        if IN_CI:
            pytest.fail(f"CI=true and the boot-disk tools are missing (guest tests never skip in CI): {e}",
                        pytrace=False)
        pytest.skip(f"run scripts/guest-env ({e})")
    return guest_env


@pytest.fixture
def guest_workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    WORK_BASE.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix="t-", dir=WORK_BASE))
    reg = _registry(request)
    reg.workdirs.append(d)
    yield d
    if not getattr(request.node, "_guest_failed", False):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def emulator(request: pytest.FixtureRequest, guest_workdir: Path) -> Iterator[Callable[..., EmulatorProcess]]:
    reg = _registry(request)

    def start(config: Path | str | dict[str, Any] | None = None, *, name: str = "emu",
              expect: int | None = None, command: Sequence[str] | None = None,
              timeout: float = 60.0, settle: float = 0.0) -> EmulatorProcess:
        cfg_path: Path | None
        if isinstance(config, dict):
            cfg = dict(config)
            cfg.setdefault("state_dir", str(guest_workdir / name))
            Path(cfg["state_dir"]).mkdir(parents=True, exist_ok=True)
            cfg_path = guest_workdir / f"{name}.yaml"
            cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        else:
            cfg_path = Path(config) if config is not None else None
        n = sum(1 for e in reg.emulators if e.name.split("#")[0] == name)
        log = guest_workdir / (f"{name}.log" if n == 0 else f"{name}.{n + 1}.log")   # keep earlier runs' logs
        proc = EmulatorProcess(cfg_path, log, name=name if n == 0 else f"{name}#{n + 1}", expect=expect,
                               command=command, cwd=guest_workdir, settle=settle)
        reg.emulators.append(proc)
        proc.start(timeout=timeout)
        return proc

    yield start
    for p in reg.emulators:
        p.stop()


@pytest.fixture
def boot_guest(request: pytest.FixtureRequest, guest_env: GuestEnv,
               guest_workdir: Path) -> Iterator[Callable[..., Any]]:
    reg = _registry(request)

    def boot(body_or_spec: str | GuestSpec, *, vfio_user: Sequence[Path | str | VfioUserDevice] = (),
             qemu_nvme: Sequence[QemuNvme] = (), timeout: float = 180.0, check: bool = True,
             wait: bool = True, qmp: bool = False, name: str = "guest",
             emulators: Sequence[EmulatorProcess] | None = None) -> GuestResult | Guest:
        if isinstance(body_or_spec, GuestSpec):
            spec = body_or_spec
        else:
            spec = GuestSpec(init=body_or_spec)
        spec.vfio_user += [d if isinstance(d, VfioUserDevice) else VfioUserDevice(d) for d in vfio_user]
        spec.qemu_nvme += list(qemu_nvme)
        g = Guest(guest_env, spec, guest_workdir / name, name=name, qmp=qmp,
                  emulators=reg.emulators if emulators is None else emulators)
        reg.guests.append(g)
        g.start()
        if not wait:
            return g
        return g.wait(timeout=timeout, check=check)

    yield boot
    for g in reg.guests:
        g.kill()
