"""NVMe constants and wire layouts (NVMe Base 2.1, NVM Command Set 1.2).

Every layout the controller puts on the wire is declared here once.
"""
from __future__ import annotations

import struct
from enum import IntEnum

# --- Controller registers (Base 2.1 §3.1.4, Figure 35) ---------------------
REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REG_CMBLOC = 0x38
REG_CMBSZ = 0x3C
DOORBELL_BASE = 0x1000

NVME_VERSION = (2 << 16) | (1 << 8)  # VS: 2.1.0

# CC fields (§3.1.4.5)
CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_AMS_SHIFT, CC_AMS_MASK = 11, 0x7
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOSQES_MASK = 16, 0xF
CC_IOCQES_SHIFT, CC_IOCQES_MASK = 20, 0xF

# CSTS fields (§3.1.4.6)
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2

SQE_SIZE = 64
CQE_SIZE = 16
SQES_LOG2 = 6
CQES_LOG2 = 4
MPS_MIN_LOG2 = 12  # 4 KiB pages
MPS_MAX_LOG2 = 16

BROADCAST_NSID = 0xFFFFFFFF

# --- Opcodes ----------------------------------------------------------------
class AdminOpcode(IntEnum):
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C
    NS_MANAGEMENT = 0x0D
    FW_COMMIT = 0x10
    FW_DOWNLOAD = 0x11
    DEVICE_SELF_TEST = 0x14
    NS_ATTACHMENT = 0x15
    KEEP_ALIVE = 0x18
    DIRECTIVE_SEND = 0x19
    DIRECTIVE_RECEIVE = 0x1A
    TRACK_SEND = 0x3D  # TP4159
    TRACK_RECEIVE = 0x3E
    MIGRATION_SEND = 0x41
    MIGRATION_RECEIVE = 0x42
    CONTROLLER_DATA_QUEUE = 0x45
    DOORBELL_BUFFER_CONFIG = 0x7C
    FORMAT_NVM = 0x80
    SECURITY_SEND = 0x81
    SECURITY_RECEIVE = 0x82
    SANITIZE = 0x84
    GET_LBA_STATUS = 0x86  # NVM Command Set admin command


class IoOpcode(IntEnum):
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_UNCORRECTABLE = 0x04
    COMPARE = 0x05
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09
    VERIFY = 0x0C
    COPY = 0x19


# --- Status (Base 2.1 §4.2.3) -----------------------------------------------
class SCT(IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2
    PATH = 3


class Generic(IntEnum):
    SUCCESS = 0x00
    INVALID_OPCODE = 0x01
    INVALID_FIELD = 0x02
    CID_CONFLICT = 0x03
    DATA_TRANSFER_ERROR = 0x04
    ABORTED_POWER_LOSS = 0x05
    INTERNAL_ERROR = 0x06
    ABORT_REQUESTED = 0x07
    ABORTED_SQ_DELETION = 0x08
    INVALID_NAMESPACE = 0x0B
    COMMAND_SEQUENCE_ERROR = 0x0C
    PRP_OFFSET_INVALID = 0x13
    SANITIZE_IN_PROGRESS = 0x1D
    LBA_OUT_OF_RANGE = 0x80
    CAPACITY_EXCEEDED = 0x81
    NS_NOT_READY = 0x82


class MediaError(IntEnum):
    """Media and Data Integrity Errors (SCT 2h, Base 2.1 Figure 104)."""
    COMPARE_FAILURE = 0x85
    UNRECOVERED_READ_ERROR = 0x81


class NvmCommandSpecific(IntEnum):
    """NVM Command Set specific statuses (SCT 1h, NVM CS 1.2 Figure 43)."""
    COMMAND_SIZE_LIMIT_EXCEEDED = 0x83
    INCOMPATIBLE_NAMESPACE_OR_FORMAT = 0x85
    OVERLAPPING_IO_RANGE = 0x87


class CommandSpecific(IntEnum):
    COMPLETION_QUEUE_INVALID = 0x00
    INVALID_QUEUE_IDENTIFIER = 0x01
    INVALID_QUEUE_SIZE = 0x02
    ABORT_COMMAND_LIMIT_EXCEEDED = 0x03
    ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED = 0x05
    INVALID_FIRMWARE_SLOT = 0x06
    INVALID_INTERRUPT_VECTOR = 0x08
    INVALID_LOG_PAGE = 0x09
    INVALID_FORMAT = 0x0A
    INVALID_QUEUE_DELETION = 0x0C
    FEATURE_NOT_SAVEABLE = 0x0D
    FEATURE_NOT_CHANGEABLE = 0x0E
    FEATURE_NOT_NS_SPECIFIC = 0x0F
    OVERLAPPING_RANGE = 0x14
    NS_INSUFFICIENT_CAPACITY = 0x15
    NS_IDENTIFIER_UNAVAILABLE = 0x16
    NS_ALREADY_ATTACHED = 0x18
    NS_IS_PRIVATE = 0x19
    NS_NOT_ATTACHED = 0x1A
    CONTROLLER_LIST_INVALID = 0x1C
    # TP4159 (Base 2.1 Figure 103)
    INVALID_CONTROLLER_IDENTIFIER = 0x1F
    INVALID_CONTROLLER_DATA_QUEUE = 0x37
    NOT_ENOUGH_RESOURCES = 0x38
    CONTROLLER_SUSPENDED = 0x39
    CONTROLLER_NOT_SUSPENDED = 0x3A
    CONTROLLER_DATA_QUEUE_FULL = 0x3B


def status_field(sct: int, sc: int, dnr: bool = True, more: bool = False) -> int:
    """The 15-bit Status Field (CQE DW3 bits 31:17), without the phase tag."""
    if sct == SCT.GENERIC and sc == Generic.SUCCESS:
        return 0
    return (sc & 0xFF) | ((sct & 0x7) << 8) | (int(more) << 13) | (int(dnr) << 14)


class NvmeError(Exception):
    """A command fails with (SCT, SC); DW0/DW1 may carry command-specific data."""

    def __init__(self, sct: int, sc: int, dnr: bool = True, dw0: int = 0, dw1: int = 0,
                 msg: str = "") -> None:
        super().__init__(msg or f"SCT {sct:#x} SC {sc:#x}")
        self.sct, self.sc, self.dnr, self.dw0, self.dw1 = sct, sc, dnr, dw0, dw1

    @property
    def status(self) -> int:
        return status_field(self.sct, self.sc, self.dnr)


def generic(sc: Generic, msg: str = "", dnr: bool = True) -> NvmeError:
    return NvmeError(SCT.GENERIC, sc, dnr=dnr, msg=msg or sc.name)


def specific(sc: CommandSpecific, msg: str = "", dw0: int = 0, dw1: int = 0) -> NvmeError:
    return NvmeError(SCT.COMMAND_SPECIFIC, sc, dw0=dw0, dw1=dw1, msg=msg or sc.name)


def media(sc: MediaError, msg: str = "") -> NvmeError:
    return NvmeError(SCT.MEDIA, sc, msg=msg or sc.name)


def invalid_field(msg: str = "") -> NvmeError:
    return generic(Generic.INVALID_FIELD, msg)


# --- Queue entries (Base 2.1 §4.1, §4.2) ------------------------------------
# SQE: CDW0 (OPC, FUSE/PSDT, CID), NSID, CDW2, CDW3, MPTR, PRP1, PRP2, CDW10..15
SQE = struct.Struct("<BBHIIIQQQIIIIII")
# CQE: DW0, DW1, SQHD, SQID, CID, Status|Phase
CQE = struct.Struct("<IIHHHH")


class Command:
    """A decoded Submission Queue Entry."""

    __slots__ = ("opc", "flags", "cid", "nsid", "cdw2", "cdw3", "mptr", "prp1", "prp2",
                 "cdw10", "cdw11", "cdw12", "cdw13", "cdw14", "cdw15", "sqid")

    def __init__(self, raw: bytes | memoryview, sqid: int = 0) -> None:
        (self.opc, self.flags, self.cid, self.nsid, self.cdw2, self.cdw3, self.mptr,
         self.prp1, self.prp2, self.cdw10, self.cdw11, self.cdw12, self.cdw13,
         self.cdw14, self.cdw15) = SQE.unpack_from(raw)
        self.sqid = sqid

    @property
    def psdt(self) -> int:
        """PRP or SGL for Data Transfer (CDW0 bits 15:14)."""
        return (self.flags >> 6) & 0x3

    @property
    def fuse(self) -> int:
        return self.flags & 0x3


def pack_sqe(opc: int, cid: int, nsid: int = 0, prp1: int = 0, prp2: int = 0,
             cdw10: int = 0, cdw11: int = 0, cdw12: int = 0, cdw13: int = 0,
             cdw14: int = 0, cdw15: int = 0, flags: int = 0, mptr: int = 0,
             cdw2: int = 0, cdw3: int = 0) -> bytes:
    return SQE.pack(opc, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2,
                    cdw10, cdw11, cdw12, cdw13, cdw14, cdw15)


# --- Features (Base 2.1 §5.1.25, Figure 385) --------------------------------
class FID(IntEnum):
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    LBA_RANGE_TYPE = 0x03
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIG = 0x0B
    AUTONOMOUS_POWER_STATE = 0x0C
    HOST_MEMORY_BUFFER = 0x0D
    TIMESTAMP = 0x0E
    KEEP_ALIVE_TIMER = 0x0F
    HOST_CONTROLLED_THERMAL = 0x10
    NON_OP_POWER_STATE = 0x11
    HOST_BEHAVIOR = 0x16
    CONTROLLER_DATA_QUEUE = 0x21  # TP4159
    SOFTWARE_PROGRESS_MARKER = 0x80
    HOST_IDENTIFIER = 0x81
    RESERVATION_NOTIFICATION_MASK = 0x82
    RESERVATION_PERSISTENCE = 0x83


# --- Log pages (Base 2.1 §5.1.12) -------------------------------------------
class LID(IntEnum):
    SUPPORTED_LOG_PAGES = 0x00
    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02
    FIRMWARE_SLOT = 0x03
    CHANGED_NAMESPACES = 0x04
    COMMANDS_SUPPORTED_EFFECTS = 0x05
    LBA_STATUS_INFORMATION = 0x0E
    FEATURE_IDENTIFIERS_SUPPORTED_EFFECTS = 0x12
    SANITIZE_STATUS = 0x81


# --- Identify CNS values (Base 2.1 §5.1.13, Figure 311) ---------------------
class CNS(IntEnum):
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NSID_LIST = 0x02
    NS_ID_DESCRIPTORS = 0x03
    CSI_NAMESPACE = 0x05
    CSI_CONTROLLER = 0x06
    CSI_ACTIVE_NSID_LIST = 0x07
    CS_INDEPENDENT_NAMESPACE = 0x08
    ALLOCATED_NSID_LIST = 0x10
    ALLOCATED_NAMESPACE = 0x11
    NS_CONTROLLER_LIST = 0x12
    CONTROLLER_LIST = 0x13
    IO_COMMAND_SET = 0x1C
    SUPPORTED_CTRL_STATE_FORMATS = 0x20  # TP4159 (Base 2.1 prints "21h": typo)


CSI_NVM = 0x00

# Asynchronous event types (Base 2.1 §5.1.2, Figure 146)
AET_ERROR = 0x0
AET_SMART = 0x1
AET_NOTICE = 0x2
AET_ONE_SHOT = 0x4
AET_IO_CMD_SET = 0x6
AET_VENDOR = 0x7
