"""What OACS.GLSS (Get LBA Status 10h/11h) brings along (NVM CS 1.2 §5.2.2):
the LBA Status Information log (0Eh) and the LBA Status Information
Attributes feature (15h).  Log Page Attributes already advertise extended
Get Log Page offsets.

Log 0Eh (NVM CS 1.2 Figure 201): a 16-byte header (LSLPLEN: length of the
log, NLSLNE: namespace elements, ESTULB: estimate of unrecoverable LBAs,
LSGC: generation counter) and one element per attached namespace holding
Write Uncorrectable marks: NEID (the NSID), NLRD range descriptors, RATYPE
11h (tracked), each descriptor RSLBA and RNLB.  Choices: RNLB is a count of
LBAs (not 0's based); LSGC counts mark changes since the emulator started.
Write Uncorrectable raises the LBA Status Information Alert (emulator.nvme.nvm_cmds)
through :func:`lba_status_changed`.

Feature 15h (NVM CS 1.2 §4.1.3.5, Figure 99): LSIPI (31:16) is the poll
interval the host should keep between reads of log 0Eh with RAE=0; the host
cannot change it.  LSIRI (15:0, default LSIPI) is the least time the
controller delays an alert, both in 100 ms units.  The alert is sent only
when there are Tracked LBAs, the report interval has run out and LSGC has
moved since the last alert.  The interval starts with the first change the
controller sees and restarts at each read of log 0Eh with RAE=0.  A change
inside the interval arms one timer for its end; changes meanwhile are
coalesced into that one alert.  Time is the scheduler's clock (the event
loop's; a test passes a fake one).
"""
from __future__ import annotations

import struct
import time
import weakref
from typing import TYPE_CHECKING

from emulator.nvme.tables import FeatureSpec, Result
from emulator.nvme.features import AEC_LBA_STATUS_NOTICES
from emulator.nvme.identify import OACS_GLSS
from emulator.nvme.lba_status import ATYPE_TRACKED_UNRECOVERABLE
from emulator.nvme.ns_mgmt import post_notice
from emulator.nvme.spec import FID, LID, Command

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller
    from emulator.nvme.interfaces import TimerHandle

FID_LBA_STATUS_INFO_ATTRIBUTES = 0x15  # LSIRI 15:0, LSIPI 31:16 (NVM CS 1.2 Figure 99)
LSIPI = 1  # 100 ms units: the host may poll log 0Eh every 100 ms
LSIRI_MASK = 0xFFFF  # the host sets LSIRI only
_DEFAULT = (LSIPI << 16) | LSIPI  # LSIRI defaults to LSIPI
INTERVAL_UNIT = 0.1  # seconds
AEI_LBA_STATUS_ALERT = 0x05  # Notice: LBA Status Information Alert (NVM CS 1.2 Figure 89)
RAE = 1 << 15  # Get Log Page CDW10 Retain Asynchronous Event
ALERT_KEY = "lba_status_alert"  # [report interval start (scheduler clock), LSGC at the last alert]
LOG_HEADER = struct.Struct("<III2xH")  # LSLPLEN, NLSLNE, ESTULB, reserved, LSGC
NS_ELEMENT = struct.Struct("<IIB7x")  # NEID, NLRD, RATYPE
RANGE_DESCRIPTOR = struct.Struct("<QI4x")  # RSLBA, RNLB


def lba_status_information(ctrl: "Controller", cmd: Command) -> bytes:
    if not cmd.cdw10 & RAE:  # the alert is cleared and LSIRI restarts (§4.1.3.5)
        _alert_state(ctrl)[0] = _now(ctrl)
    body = bytearray()
    elements = estimate = generation = 0
    for ns in ctrl.attached_namespaces():
        generation += ns.uncorrectable.generation
        ranges = ns.uncorrectable.ranges()
        if not ranges:
            continue
        elements += 1
        body += NS_ELEMENT.pack(ns.nsid, len(ranges), ATYPE_TRACKED_UNRECOVERABLE)
        for s, e in ranges:
            body += RANGE_DESCRIPTOR.pack(s, min(e - s, 0xFFFFFFFF))
            estimate += e - s
    length = LOG_HEADER.size + len(body)
    return LOG_HEADER.pack(length, elements, min(estimate, 0xFFFFFFFF), generation & 0xFFFF) + bytes(body)


def identify_glss(ctrl: "Controller", b: bytearray) -> None:
    oacs = struct.unpack_from("<H", b, 256)[0]
    struct.pack_into("<H", b, 256, oacs | OACS_GLSS)


# ------------------------------------------------------------------ LBA Status Information Alert
_timers: "weakref.WeakKeyDictionary[Controller, TimerHandle]" = weakref.WeakKeyDictionary()


def _now(ctrl: "Controller") -> float:
    clock = getattr(ctrl.scheduler, "time", None)  # asyncio's loop.time(), or a test's
    return float(clock()) if clock is not None else time.monotonic()


def _alert_state(ctrl: "Controller") -> list[float]:
    """[start of the report interval, LSGC at the last alert] (plain data, in vendor state)."""
    state = ctrl.state.vendor.get(ALERT_KEY)
    if state is None:
        state = ctrl.state.vendor[ALERT_KEY] = [_now(ctrl), -1]
    return state


def _generation(ctrl: "Controller") -> tuple[int, bool]:
    """LSGC as log 0Eh reports it, and whether any attached namespace has Tracked LBAs."""
    namespaces = ctrl.attached_namespaces()
    return (sum(ns.uncorrectable.generation for ns in namespaces) & 0xFFFF,
            any(ns.uncorrectable.ranges() for ns in namespaces))


def lba_status_changed(ctrl: "Controller") -> None:
    """Tracked LBAs of a namespace attached to ``ctrl`` changed: alert now, or when LSIRI ends."""
    if not ctrl.state.features.get(FID.ASYNC_EVENT_CONFIG, 0) & AEC_LBA_STATUS_NOTICES:
        return  # the host polls (§4.1.3.5); the interval still runs from its last read
    if ctrl in _timers:
        return  # coalesced into the alert already due
    lsiri = ctrl.state.features.get(FID_LBA_STATUS_INFO_ATTRIBUTES, _DEFAULT) & LSIRI_MASK
    interval = lsiri * INTERVAL_UNIT
    # never beyond one interval: a start taken on another clock (a migrated state) cannot stall it
    wait = min(_alert_state(ctrl)[0] + interval - _now(ctrl), interval)
    if wait <= 0 or ctrl.scheduler is None:
        _alert(ctrl)
    else:
        _timers[ctrl] = ctrl.scheduler.call_later(wait, _alert_due, ctrl)


def _alert_due(ctrl: "Controller") -> None:
    _timers.pop(ctrl, None)
    if ctrl.state.features.get(FID.ASYNC_EVENT_CONFIG, 0) & AEC_LBA_STATUS_NOTICES:
        _alert(ctrl)


def _alert(ctrl: "Controller") -> None:
    """Send the alert if there are Tracked LBAs and LSGC moved since the last one."""
    generation, tracked = _generation(ctrl)
    state = _alert_state(ctrl)
    if tracked and generation != state[1]:
        state[1] = generation
        post_notice(ctrl, AEC_LBA_STATUS_NOTICES, AEI_LBA_STATUS_ALERT, LID.LBA_STATUS_INFORMATION)


def _attributes_set(ctrl: "Controller", cmd: Command) -> Result:
    """Set Features 15h: LSIRI only (LSIPI "is not changeable by the host"); Dword 0 of the
    completion holds the attributes (§4.1.3.5)."""
    value = (LSIPI << 16) | (cmd.cdw11 & LSIRI_MASK)
    ctrl.state.features[FID_LBA_STATUS_INFO_ATTRIBUTES] = value
    return value, 0


LBA_STATUS_INFO_FEATURE = FeatureSpec(default=_DEFAULT, writable=LSIRI_MASK, set=_attributes_set)
