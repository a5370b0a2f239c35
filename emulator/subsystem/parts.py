"""What the control-socket method groups (handover, monitor, migration_view) use of a
running emulator: the :class:`RuntimeParts` protocol, which
:class:`~emulator.subsystem.runtime.Runtime` satisfies.

They depend on this small interface rather than on the runtime module, and the
runtime imports and registers them: the imports run one way only.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from emulator.subsystem.config import SubsystemConfig
    from emulator.subsystem.subsystem import Subsystem
    from emulator.vfio_user.server import VfioUserServer


class RuntimeParts(Protocol):
    config: "SubsystemConfig"
    loop: asyncio.AbstractEventLoop
    log: logging.Logger
    subsystem: "Subsystem"
    servers: "dict[int, VfioUserServer]"
