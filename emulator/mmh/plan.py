"""When pre-copy ends: the rule ``nvme-emu migrate`` (engine.py) and the VMM-style
vfio-user migration (emulator/host/vmm.py) share."""
from __future__ import annotations


def precopy_done(number: int, size: int, prev: int | None, max_rounds: int, small_bytes: int) -> bool:
    """Round ``number`` (1-based) left ``size`` bytes to copy, the round before ``prev``:
    stop pre-copying when it is small, no longer shrinking, or the last round allowed;
    what is left is copied after the stop."""
    return size <= small_bytes or (prev is not None and size >= prev) or number >= max_rounds
