"""Everything a controller needs to resume, as plain data.

Live migration (TP4159 Get/Set Controller State, and handing a controller to
another process) and restarts serialise these objects; the runtime classes
in controller.py and queues.py hold no other durable state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SQState:
    """An I/O or admin Submission Queue (cf. Base 2.1 Figure 619, I/O SQ State)."""
    qid: int
    base: int  # PRP1 of Create I/O SQ (physically contiguous)
    size: int  # entries (1's based)
    cqid: int
    head: int = 0
    tail: int = 0  # last doorbell value
    qprio: int = 0
    pc: bool = True


@dataclass
class CQState:
    """A Completion Queue (cf. Base 2.1 Figure 620, I/O CQ State)."""
    qid: int
    base: int
    size: int
    iv: int = 0  # interrupt vector
    ien: bool = True
    head: int = 0  # last host doorbell
    tail: int = 0  # controller's next slot
    phase: int = 1  # phase tag the controller writes into slot ``tail``
    pc: bool = True
    # Completions of commands already executed that found the CQ full, oldest
    # first, as [DW0, DW1, SQHD, SQID, CID, status]: posted as soon as the host
    # frees a slot (a completion is never lost, Base 2.1 §3.3.1.5).
    held: list[list[int]] = field(default_factory=list)


@dataclass
class RegisterState:
    cc: int = 0
    csts: int = 0
    aqa: int = 0
    asq: int = 0
    acq: int = 0
    intms: int = 0  # interrupt mask (pin-based / MSI only)


@dataclass
class AerState:
    """Asynchronous Event Request bookkeeping (Base 2.1 §5.1.2)."""
    outstanding: list[int] = field(default_factory=list)  # CIDs held by the controller
    pending: list[list[int]] = field(default_factory=list)  # [dw0, dw1] events not yet reported
    masked_types: list[int] = field(default_factory=list)  # AETs reported, awaiting log read


@dataclass
class ControllerState:
    cntlid: int
    regs: RegisterState = field(default_factory=RegisterState)
    # The queues, in a copy made by Controller.snapshot() (the running
    # controller keeps them in Controller.sqs / Controller.cqs).
    sqs: list[SQState] = field(default_factory=list)
    cqs: list[CQState] = field(default_factory=list)
    # Current feature values by FID (values only for features with a dword
    # representation; 0x09 is per vector: see ivc).
    features: dict[int, int] = field(default_factory=dict)
    ivc: dict[int, int] = field(default_factory=dict)  # Interrupt Vector Config, per vector
    granted_sqs: int = 0  # Number of Queues (0's based NSQA), once set
    granted_cqs: int = 0
    queues_set: bool = False
    aer: AerState = field(default_factory=AerState)
    error_count: int = 0
    error_log: list[list[int]] = field(default_factory=list)  # [count, sqid, cid, status, lba, nsid]
    host_id: str = ""
    smart: dict[str, int] = field(default_factory=dict)  # counters for the SMART log
    suspended: bool = False  # TP4159 Migration Send / Suspend
    vendor: dict[str, Any] = field(default_factory=dict)  # extensions (TP4159 etc.)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ControllerState":
        d = dict(d)
        d["regs"] = RegisterState(**d["regs"])
        d["sqs"] = [SQState(**q) for q in d["sqs"]]
        d["cqs"] = [CQState(**q) for q in d["cqs"]]
        d["aer"] = AerState(**d["aer"])
        d["features"] = {int(k): v for k, v in d["features"].items()}
        d["ivc"] = {int(k): v for k, v in d["ivc"].items()}
        return cls(**d)
