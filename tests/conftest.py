from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from emu_fixture import Emu  # noqa: E402


@pytest.fixture
def emu() -> Iterator[Callable[..., Emu]]:
    """Factory: ``emu(config_dict=None)`` starts a subsystem over vfio-user."""
    made: list[Emu] = []

    def make(config: dict[str, Any] | None = None, start: bool = True) -> Emu:
        e = Emu(config)
        made.append(e)
        return e.start() if start else e

    yield make
    for e in made:
        e.cleanup()
