from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import os

import pytest
from hypothesis import settings

sys.path.insert(0, str(Path(__file__).parent))

# The project's own pytest plugin (also registered through the pytest11 entry point when
# the package is installed; loading it twice under the same name is a no-op).
pytest_plugins = ["pytester", "emulator.pytest_plugin"]

# CI runs property tests with a fixed seed (reproducible); local runs explore.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
    settings.load_profile("ci")

from emu_fixture import Emu  # noqa: E402


@pytest.fixture
def emu() -> Iterator[Callable[..., Emu]]:
    """Factory: ``emu(config_dict=None)`` starts a subsystem over vfio-user."""
    made: list[Emu] = []

    def make(config: dict[str, Any] | None = None, start: bool = True, visible_writes: str = "boot") -> Emu:
        e = Emu(config, visible_writes=visible_writes)
        made.append(e)
        return e.start() if start else e

    yield make
    for e in made:
        e.cleanup()
