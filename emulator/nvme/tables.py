"""The shapes of a controller's command tables (a leaf: it imports no handler).

Handler modules take ``Result`` and the builder types from here; the tables
themselves are filled in one place, :mod:`emulator.nvme.dispatch`, for each
controller from its type and configuration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from emulator.nvme.spec import Command

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.namespace import Namespace

# A handler returns (DW0, DW1) on success, None to hold the command (AER),
# or raises NvmeError.
Result = Optional[tuple[int, int]]
Handler = Callable[["Controller", Command], Result]
CnsBuilder = Callable[["Controller", Command], bytes]  # one Identify data structure
LogBuilder = Callable[["Controller", Command], bytes]  # one log page, whole
CtrlPatcher = Callable[["Controller", bytearray], None]  # writes fields of CNS 01h / 06h
NsPatcher = Callable[["Controller", "Namespace", bytearray], None]  # writes fields of CNS 05h
WriteObserver = Callable[["Controller", int, int, int, bool], None]  # nsid, slba, nlb, dealloc
ControllerHook = Callable[["Controller"], None]
ControllerPredicate = Callable[["Controller"], bool]


@dataclass(frozen=True)
class FeatureSpec:
    """One feature (Base 2.1 §5.1.25): default value, which CDW11 bits the host
    may set, whether it is namespace specific, and optional get/set handlers
    for features with data buffers or side effects."""
    default: int = 0
    writable: int = 0xFFFFFFFF  # CDW11 bits the host may set
    ns_specific: bool = False
    changeable: bool = True
    get: Optional[Handler] = None
    set: Optional[Handler] = None


@dataclass(frozen=True)
class CommandTables:
    """Everything one controller answers, by code point."""
    admin: Mapping[int, Handler]  # admin opcode -> handler
    io: Mapping[int, Handler]  # NVM command set opcode -> handler
    cns: Mapping[int, CnsBuilder]  # Identify CNS -> data structure
    features: Mapping[int, FeatureSpec]  # FID -> feature
    log_pages: Mapping[int, LogBuilder]  # LID -> log page
    identify_controller: tuple[CtrlPatcher, ...] = ()  # fields of CNS 01h owned elsewhere
    identify_nvm_controller: tuple[CtrlPatcher, ...] = ()  # ... of CNS 06h
    identify_nvm_namespace: tuple[NsPatcher, ...] = ()  # ... of CNS 05h
    on_write: tuple[WriteObserver, ...] = ()  # user data changed by a command
    on_reset: tuple[ControllerHook, ...] = ()  # after a Controller Level Reset
    on_memory: tuple[ControllerHook, ...] = ()  # guest memory attached or detached
    # Admin opcodes of ``admin`` that a controller offers only when the predicate
    # holds (it may depend on the other controllers of the subsystem).
    admin_available: Mapping[int, ControllerPredicate] = field(default_factory=dict)


@dataclass
class Observers:
    """The controller's observer lists, started from its CommandTables."""
    on_write: list[WriteObserver] = field(default_factory=list)
    on_reset: list[ControllerHook] = field(default_factory=list)
    on_memory: list[ControllerHook] = field(default_factory=list)
