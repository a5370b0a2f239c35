"""Get Features / Set Features (Base 2.1 §5.1.11, §5.1.25).

Each feature is a small spec: default value, which bits the host may set,
whether it is namespace specific, and optional custom get/set handlers for
features with data buffers or side effects.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING

from emulator.nvme.spec import (
    FID, Command, CommandSpecific, Generic, generic, invalid_field, specific,
)
from emulator.nvme.tables import FeatureSpec, Result

if TYPE_CHECKING:
    from emulator.nvme.controller import Controller

WCTEMP = 0x157  # 343 K; also the default Over Temperature Threshold
SEL_DEFAULT, SEL_SAVED, SEL_SUPPORTED = 1, 2, 3  # Get Features SEL (§5.1.11)
CAP_NS_SPECIFIC, CAP_CHANGEABLE = 0x2, 0x4  # SEL 11b capabilities (saveable: none)


# Async Event Config bits we can generate (OAES in Identify Controller):
# SMART critical warnings 7:0, Namespace Attribute notices bit 8, LBA Status
# Information notices bit 13 (Base 2.1 Figure 413).
AEC_NS_ATTRIBUTE_NOTICES, AEC_LBA_STATUS_NOTICES = 1 << 8, 1 << 13
AEC_SUPPORTED = 0xFF | AEC_NS_ATTRIBUTE_NOTICES | AEC_LBA_STATUS_NOTICES


def reset_features(ctrl: "Controller") -> None:
    s = ctrl.state
    s.features = {fid: spec.default for fid, spec in ctrl.tables.features.items()}
    s.ivc = {}
    s.granted_sqs = s.granted_cqs = ctrl.config.max_io_queues - 1
    s.vendor.pop("timestamp", None)


def _number_of_queues_set(ctrl: "Controller", cmd: Command) -> Result:
    # §5.1.25.1.7: NSQR/NCQR are 0's based; 0xFFFF is invalid.
    nsqr, ncqr = cmd.cdw11 & 0xFFFF, cmd.cdw11 >> 16
    if nsqr == 0xFFFF or ncqr == 0xFFFF:
        raise invalid_field("NSQR/NCQR 65535")
    if any(qid for qid in ctrl.sqs) or any(qid for qid in ctrl.cqs):
        raise generic(Generic.COMMAND_SEQUENCE_ERROR, "I/O queues already exist")
    top = ctrl.config.max_io_queues - 1
    s = ctrl.state
    s.granted_sqs, s.granted_cqs = min(nsqr, top), min(ncqr, top)
    value = s.granted_sqs | (s.granted_cqs << 16)
    s.features[FID.NUMBER_OF_QUEUES] = value
    return value, 0


def _number_of_queues_get(ctrl: "Controller", cmd: Command) -> Result:
    s = ctrl.state
    return s.granted_sqs | (s.granted_cqs << 16), 0


def _ivc_get(ctrl: "Controller", cmd: Command) -> Result:
    iv = cmd.cdw11 & 0xFFFF
    if iv >= ctrl.config.msix_vectors:
        raise invalid_field("interrupt vector out of range")
    return iv | (ctrl.state.ivc.get(iv, 0) & 0x10000), 0


def _ivc_set(ctrl: "Controller", cmd: Command) -> Result:
    iv = cmd.cdw11 & 0xFFFF
    if iv >= ctrl.config.msix_vectors:
        raise invalid_field("interrupt vector out of range")
    ctrl.state.ivc[iv] = cmd.cdw11 & 0x10000
    return 0, 0


def _timestamp_set(ctrl: "Controller", cmd: Command) -> Result:
    data = ctrl.data_from_host(cmd, 8)
    ms = int.from_bytes(data[:6], "little")
    ctrl.state.vendor["timestamp"] = [ms, time.monotonic()]
    return 0, 0


def _timestamp_get(ctrl: "Controller", cmd: Command) -> Result:
    ts = ctrl.state.vendor.get("timestamp")
    if ts:
        ms, origin = ts
        now, attrs = ms + int((time.monotonic() - origin) * 1000), 0x2  # Synch=0, TS set by host
    else:
        now, attrs = int((time.monotonic() - ctrl.started) * 1000), 0x0  # since reset
    ctrl.data_to_host(cmd, (now & 0xFFFFFFFFFFFF).to_bytes(6, "little") + bytes([attrs, 0]))
    return 0, 0


def _host_behavior_set(ctrl: "Controller", cmd: Command) -> Result:
    ctrl.state.vendor["host_behavior"] = ctrl.data_from_host(cmd, 512).hex()
    return 0, 0


def _host_behavior_get(ctrl: "Controller", cmd: Command) -> Result:
    ctrl.data_to_host(cmd, bytes.fromhex(ctrl.state.vendor.get("host_behavior", "")), 512)
    return 0, 0


def _host_id_set(ctrl: "Controller", cmd: Command) -> Result:
    size = 16 if cmd.cdw11 & 1 else 8  # EXHID
    ctrl.state.host_id = ctrl.data_from_host(cmd, size).hex()
    return 0, 0


def _host_id_get(ctrl: "Controller", cmd: Command) -> Result:
    size = 16 if cmd.cdw11 & 1 else 8
    ctrl.data_to_host(cmd, bytes.fromhex(ctrl.state.host_id)[:size], size)
    return 0, 0


def _temperature_key(cdw11: int) -> str:
    # TMPSEL bits 19:16, THSEL bits 21:20
    return f"tmpth_{(cdw11 >> 16) & 0xF}_{(cdw11 >> 20) & 0x3}"


def _temperature_get(ctrl: "Controller", cmd: Command) -> Result:
    tmpsel, thsel = (cmd.cdw11 >> 16) & 0xF, (cmd.cdw11 >> 20) & 0x3
    if thsel > 1 or tmpsel not in (0, 1, 0xF):
        raise invalid_field("TMPSEL/THSEL")
    default = WCTEMP if thsel == 0 else 0
    value = ctrl.state.vendor.get(_temperature_key(cmd.cdw11), default)
    return value | (cmd.cdw11 & 0x3F0000), 0


def _temperature_set(ctrl: "Controller", cmd: Command) -> Result:
    tmpsel, thsel = (cmd.cdw11 >> 16) & 0xF, (cmd.cdw11 >> 20) & 0x3
    if thsel > 1 or tmpsel not in (0, 1, 0xF):
        raise invalid_field("TMPSEL/THSEL")
    ctrl.state.vendor[_temperature_key(cmd.cdw11)] = cmd.cdw11 & 0xFFFF
    return 0, 0


def _unsupported(ctrl: "Controller", cmd: Command) -> Result:
    raise invalid_field("feature not supported by this controller")


# Every feature of every controller; TP4159 adds 21h (emulator/nvme/dispatch.py).
BASE_FEATURES: dict[int, FeatureSpec] = {
    FID.ARBITRATION: FeatureSpec(default=0x7, writable=0xFFFFFF07),
    FID.POWER_MANAGEMENT: FeatureSpec(writable=0xFF, set=None),
    FID.TEMPERATURE_THRESHOLD: FeatureSpec(get=_temperature_get, set=_temperature_set),
    FID.ERROR_RECOVERY: FeatureSpec(writable=0xFFFF, ns_specific=True),
    FID.VOLATILE_WRITE_CACHE: FeatureSpec(default=0x1, writable=0x1),
    FID.NUMBER_OF_QUEUES: FeatureSpec(get=_number_of_queues_get, set=_number_of_queues_set),
    FID.INTERRUPT_COALESCING: FeatureSpec(writable=0xFFFF),
    FID.INTERRUPT_VECTOR_CONFIG: FeatureSpec(get=_ivc_get, set=_ivc_set),
    FID.WRITE_ATOMICITY: FeatureSpec(writable=0x1),
    FID.ASYNC_EVENT_CONFIG: FeatureSpec(writable=AEC_SUPPORTED),
    FID.AUTONOMOUS_POWER_STATE: FeatureSpec(changeable=False, set=_unsupported),
    FID.HOST_MEMORY_BUFFER: FeatureSpec(changeable=False, set=_unsupported),  # HMPRE=0
    FID.TIMESTAMP: FeatureSpec(get=_timestamp_get, set=_timestamp_set),
    FID.KEEP_ALIVE_TIMER: FeatureSpec(),
    FID.NON_OP_POWER_STATE: FeatureSpec(writable=0x1),
    FID.HOST_BEHAVIOR: FeatureSpec(get=_host_behavior_get, set=_host_behavior_set),
    FID.SOFTWARE_PROGRESS_MARKER: FeatureSpec(writable=0xFF),
    FID.HOST_IDENTIFIER: FeatureSpec(get=_host_id_get, set=_host_id_set),
}


def _lookup(ctrl: "Controller", cmd: Command, fid: int) -> FeatureSpec:
    spec = ctrl.tables.features.get(fid)
    if spec is None:
        raise invalid_field(f"feature {fid:#x} not supported")
    if spec.ns_specific:
        if cmd.nsid not in (0, 0xFFFFFFFF):
            ctrl.namespace(cmd.nsid)
    elif cmd.nsid not in (0, 0xFFFFFFFF):
        # §5.1.25: a controller-scope feature with a specific NSID
        raise specific(CommandSpecific.FEATURE_NOT_NS_SPECIFIC)
    return spec


def get_features(ctrl: "Controller", cmd: Command) -> Result:
    fid, sel = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 0x7
    spec = _lookup(ctrl, cmd, fid)
    if sel == SEL_SUPPORTED:
        caps = (CAP_NS_SPECIFIC if spec.ns_specific else 0) | (CAP_CHANGEABLE if spec.changeable else 0)
        return caps, 0
    if sel > SEL_SUPPORTED:
        raise invalid_field("SEL")
    if sel in (SEL_DEFAULT, SEL_SAVED) and spec.get is None:
        return spec.default, 0  # nothing is saveable: saved == default
    if spec.get is not None:
        return spec.get(ctrl, cmd)
    return ctrl.state.features.get(fid, spec.default), 0


def set_features(ctrl: "Controller", cmd: Command) -> Result:
    fid, save = cmd.cdw10 & 0xFF, bool(cmd.cdw10 >> 31)
    spec = _lookup(ctrl, cmd, fid)
    if save:
        raise specific(CommandSpecific.FEATURE_NOT_SAVEABLE)
    if spec.set is not None:
        return spec.set(ctrl, cmd)
    if not spec.changeable:
        raise specific(CommandSpecific.FEATURE_NOT_CHANGEABLE)
    ctrl.state.features[fid] = cmd.cdw11 & spec.writable
    return 0, 0

