"""Fixtures for tests that boot real Linux guests (QEMU, TCG) and run the emulator.

The project's guest tests use its own pytest plugin (``emulator/pytest_plugin.py``,
loaded by tests/conftest.py): ``nvme_emu``, ``nvme_guest``, ``nvme_emu_env`` and
``nvme_emu_workdir``.  The names below are the older spellings of the same fixtures:

* ``guest_env``     = ``nvme_emu_env`` (missing tool box: skip naming scripts/guest-env;
                    a failure when CI=true).
* ``boot_disk_env`` the tool box plus the host tools that build boot disks (same rule).
* ``guest_workdir`` = ``nvme_emu_workdir``.
* ``emulator``      = ``nvme_emu``: ``emulator(config=None, *, name="emu", expect=None,
                    command=None, timeout=60, settle=0.0)`` -> started emulator process.
* ``boot_guest``    = ``nvme_guest.boot``: ``boot_guest(body_or_spec, *, vfio_user=(),
                    qemu_nvme=(), timeout=180, check=True, wait=True, qmp=False,
                    name="guest")`` -> GuestResult (or the running Guest with ``wait=False``).
* ``fake_emulator_cmd``  argv of tests/guest/fake_emulator.py (listens, never answers).

Tests using these fixtures get the ``guest`` marker automatically.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from emulator.guest.env import GuestEnv, GuestEnvMissing
from emulator.pytest_plugin import GuestBooter, in_ci

FAKE_EMULATOR = Path(__file__).with_name("fake_emulator.py")
FAKE_EMULATOR_CMD = [sys.executable, str(FAKE_EMULATOR), "serve"]
GUEST_FIXTURES = {"guest_env", "boot_guest", "boot_disk_env", "nvme_guest", "nvme_emu_env"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if GUEST_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.guest)


@pytest.fixture(scope="session")
def fake_emulator_cmd() -> list[str]:
    """argv prefix of a stand-in emulator that keeps only the process contract."""
    return list(FAKE_EMULATOR_CMD)


@pytest.fixture(scope="session")
def guest_env(nvme_emu_env: GuestEnv) -> GuestEnv:
    return nvme_emu_env


@pytest.fixture(scope="session")
def boot_disk_env(guest_env: GuestEnv) -> GuestEnv:
    """The tool box with the host tools that build boot disks (same skip/fail rule as guest_env)."""
    from emulator.guest.diskimage import require_tools
    try:
        require_tools(guest_env)
    except GuestEnvMissing as e:
        if in_ci():
            pytest.fail(f"CI=true and the boot-disk tools are missing (guest tests never skip in CI): {e}",
                        pytrace=False)
        pytest.skip(f"run scripts/guest-env ({e})")
    return guest_env


@pytest.fixture
def guest_workdir(nvme_emu_workdir: Path) -> Path:
    return nvme_emu_workdir


@pytest.fixture
def emulator(nvme_emu: Callable[..., Any]) -> Callable[..., Any]:
    return nvme_emu


@pytest.fixture
def boot_guest(nvme_guest: GuestBooter) -> Callable[..., Any]:
    return nvme_guest.boot
