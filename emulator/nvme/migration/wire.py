"""TP4159 wire layouts and code points (NVMe Base 2.1 / 2.3, NVM Command Set 1.2).

Every structure the migration commands put on the wire is declared here once;
the command modules only pack and unpack through these.  Section numbers are
Base 2.1 unless said otherwise (Base 2.3 numbers in brackets).
"""
from __future__ import annotations

import struct
import uuid
from enum import IntEnum

# --- Command fields ------------------------------------------------------------------


def sel(cdw10: int) -> int:
    """Select (SEL), CDW10 bits 7:0, of 3Dh/3Eh/41h/42h/45h."""
    return cdw10 & 0xFF


def mos(cdw10: int) -> int:
    """Management Operation Specific (MOS), CDW10 bits 31:16."""
    return (cdw10 >> 16) & 0xFFFF


def offset64(cdw12: int, cdw13: int) -> int:
    """A 64-bit byte offset from CDW12 (low) and CDW13 (high)."""
    return cdw12 | (cdw13 << 32)


# --- Controller Data Queue command, 45h (§5.1.4 [5.2.4]) ---------------------------
class CdqSel(IntEnum):
    CREATE = 0x0
    DELETE = 0x1
    # C0h-FFh are vendor specific.  nvme-emu: Create a CDQ whose (physically
    # contiguous) memory address is in CDW13:CDW14 instead of PRP1, so that a
    # host with only a passthrough ioctl (which owns PRP1) can place a CDQ in
    # memory it reserved, e.g. a Linux guest with memmap=.
    VS_CREATE_AT = 0xC0


QT_UDMQ = 0x0  # Queue Type: User Data Migration Queue (MOS[7:0])
CDW11_PC = 0x1  # Physically Contiguous
CDQ_ENTRY_SIZE_T0 = 32  # LBA Migration Queue Entry Type 0 (NVM CS 1.2 Figure 177)

# --- LBA Migration Queue Entry Type 0 (NVM CS 1.2 §5.6, Figure 177) ------------------
# NSID, NLB (0's based), SLBA, reserved 30:16, LBAMQA (byte 31: CDQP is in it and
# is written last, Base §8.1.6).
LMQ_ENTRY = struct.Struct("<IIQ15xB")
LMQ_BODY_LEN = LMQ_ENTRY.size - 1  # bytes 30:0, written before byte 31
assert LMQ_ENTRY.size == CDQ_ENTRY_SIZE_T0


class Esa(IntEnum):
    """Entry Sequence Attribute, LBAMQA bits 3:1."""
    NORMAL = 0b000
    FIRST = 0b001  # first entry since logging started or since resume
    LAST_STOPPED = 0b010  # last: logging stopped by Track Send (LACT=0)
    LAST_SUSPENDED = 0b011  # last: the controller was suspended
    LAST_FULL = 0b111  # last: the queue became full, logging stopped


class Lbacir(IntEnum):
    """LBA Change Information Attribute, LBAMQA bits 7:6."""
    RANGE = 0b00  # NSID/SLBA/NLB describe the changed range
    WHOLE_NAMESPACE = 0b01  # every LBA of NSID changed
    NO_RANGE = 0b10  # marker entry without a range


def lbamqa(cdqp: int, esa: int, dlba: bool, lbacir: int) -> int:
    """LBAMQA: CDQP bit 0, ESA 3:1, DLBA bit 5, LBACIR 7:6."""
    return (cdqp & 1) | ((esa & 0x7) << 1) | (int(dlba) << 5) | ((lbacir & 0x3) << 6)


# --- Feature 21h, Controller Data Queue (§5.1.25.1.23, Figures 424-427) --------------
CDQ_FEATURE_ETPT = 1 << 31  # CDW11 bit 31 Enable Tail Pointer Trigger
CDQ_FEATURE_DATA = struct.Struct("<II504x")  # HP, TPT, reserved 511:08 (Figure 427)

# One-Shot asynchronous event information (Base §5.1.2, Figure 155)
AEI_CDQ_TAIL_POINTER = 0x00
AEI_CDQ_FULL = 0x01

# --- Track Send 3Dh / Track Receive 3Eh (§5.1.27 [5.2.28], §5.1.26 [5.2.27]) --------
TRACK_SEL_LUDC = 0x0  # Log User Data Changes
TRACK_SEL_TMC = 0x1  # Track Memory Changes
LACT_STOP, LACT_START = 0x0, 0x1  # Logging Action, MOS bits 3:0
TACT_START = 0x1  # Tracking Action, MOS bit 0
TRACK_RECEIVE_SEL_TMC = 0x0  # Tracked Memory Changes

# Track Memory Changes data structure (host to controller): VER, reserved,
# RMRTG (2^n x 4 KiB), RNMRTD; then 12-byte Memory Range Tracking Descriptors.
TMC_HEADER = struct.Struct("<B2xBI")
TMC_DESCRIPTOR = struct.Struct("<QI")  # SADDR, LEN (units of RMRTG)
# Tracked Memory Changes data structure (controller to host): VER, ATTRB (MTR
# bit 0, SUSP bit 1), CNTLID, NTMCD, RPMPG, reserved; then 16-byte descriptors.
TRACKED_HEADER = struct.Struct("<BBHIH6x")
TRACKED_DESCRIPTOR = struct.Struct("<QI4x")  # SADDR, LEN (units of RPMPG)
ATTRB_MTR, ATTRB_SUSP = 0x1, 0x2
GRANULE_BASE_SHIFT = 12  # granularity codes are 2^n x 4 KiB

# --- Migration Send 41h / Migration Receive 42h (§5.1.17 [5.2.17], §5.1.16) --------
MIGRATION_SEND_SUSPEND = 0x0
MIGRATION_SEND_RESUME = 0x1
MIGRATION_SEND_SET_STATE = 0x2
MIGRATION_RECEIVE_GET_STATE = 0x0
STYPE_NOTIFICATION, STYPE_SUSPEND = 0x0, 0x1
SUSPEND_DUDMQ = 1 << 31  # CDW11 bit 31


class Seqind(IntEnum):
    """Set Controller State Sequence Indicator, MOS bits 1:0."""
    MIDDLE = 0b00
    FIRST = 0b01
    LAST = 0b10
    ONLY = 0b11


CSUP = 0x1  # Migration Receive DW0 bit 0: suspended for the whole command

# --- Controller State data structure (Figures 358-361 [2.3: 5.2.16.1.1]) -------------
# VER, CSATTR, reserved 15:3, NVMECSS (16 bytes, dwords), VSS (16 bytes, dwords);
# the 128-bit sizes are packed as low/high qwords.
CS_HEADER = struct.Struct("<HB13xQQQQ")
CSATTR_SUSPENDED = 0x1
NVMECS_HEADER = struct.Struct("<HHH2x")  # VER, NIOSQ, NIOCQ, reserved
# I/O Submission Queue State: IOSQPRP1, IOSQQSIZE (0's based), IOSQID, CQID,
# IOSQA (PC bit 0, QPRIO 2:1), IOSQHP, IOSQTP, reserved.
IOSQ_STATE = struct.Struct("<QHHHHHH4x")
# I/O Completion Queue State: IOCQPRP1, IOCQQSIZE (0's based), IOCQID, IOCQHP,
# IOCQTP, IOCQA (PC bit 0, IEN bit 1, S0PT bit 2, IV 31:16), reserved.
IOCQ_STATE = struct.Struct("<QHHHHI4x")
assert CS_HEADER.size == 48 and IOSQ_STATE.size == 24 and IOCQ_STATE.size == 24
IOSQA_PC, IOSQA_QPRIO_SHIFT = 0x1, 1
IOCQA_PC, IOCQA_IEN, IOCQA_S0PT, IOCQA_IV_SHIFT = 0x1, 0x2, 0x4, 16

NVME_CS_VERSION_0 = 0x0000  # the only NVMe Controller State version (VER)

# --- Vendor specific controller state (our format, CSUUIDI) ---------------------------
# The UUID that names nvme-emu's vendor specific controller state format in
# Identify CNS 20h (RFC 9562 version 5, from the name below).
VENDOR_STATE_UUID = uuid.uuid5(uuid.NAMESPACE_URL, "https://nvme-emu.invalid/controller-state/1")
# Header of the vendor area: magic, format version, flags, JSON length, CRC-32.
VENDOR_STATE_HEADER = struct.Struct("<8sHHII12x")
VENDOR_STATE_MAGIC = b"NVEMUCS1"
VENDOR_STATE_FORMAT = 1

# --- Identify (§5.1.13) ----------------------------------------------------------------
CNS20_HEADER = struct.Struct("<BB")  # NV, NUUID; then NV 2-byte versions, NUUID UUIDs
# Identify Controller fields (byte offsets of Base 2.1 Identify Controller, as in libnvme struct nvme_id_ctrl)
IDC_OACS = 256
OACS_HMLMS = 1 << 11  # Host Managed Live Migration Support
IDC_LM_LIMITS = struct.Struct("<HHBBBxHHHHH")  # CMMRTD..MCDQPC at bytes 570..587
IDC_LM_LIMITS_OFFSET = 570
TRATTR_THMCS, TRATTR_TUDCS, TRATTR_MRTLL = 0x1, 0x2, 0x4
NVM_IDC_LBAMQF = 24  # CNS 06h byte 24: LBA Migration Queue Format (0h = Type 0)
