"""vfio-user wire constants and layouts, each declared once.

Everything on the wire is little-endian.  Every payload layout is a
precompiled :class:`struct.Struct`; payload offsets are relative to the end
of the 16-byte header (vfio-user-protocol.md §1.2, §8).  The error types of
the whole package live here too, so every layer can raise them.
"""
from __future__ import annotations

import enum
import errno as _errno
from struct import Struct

Buffer = bytes | bytearray | memoryview


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14  # obsolete (v1 migration), never sent by QEMU 11.1
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


KNOWN_COMMANDS = frozenset(int(c) for c in Command)


def command_name(command: int) -> str:
    return Command(command).name if command in KNOWN_COMMANDS else f"command {command}"


# -- header ----------------------------------------------------------------------
HEADER = Struct("<HHIII")  # msg_id, command, msg_size, flags, error_no
HEADER_SIZE = HEADER.size

FLAGS_TYPE_MASK = 0xF
TYPE_COMMAND = 0x0
TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
FLAGS_KNOWN = FLAGS_TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR

# -- limits ----------------------------------------------------------------------
MAX_DATA_XFER_SIZE = 1 << 20  # what we advertise and what we accept
MAX_MSG_FDS = 8  # fds per message we accept (and advertise)
MAX_DMA_MAPS = 65535  # the spec's default and QEMU's largest accepted value (a client announces it)
# DMA regions one client may map on this server (announced as max_dma_maps in
# the VERSION reply): each region holds an mmap (and, before Python 3.13, an fd).
SERVER_MAX_DMA_MAPS = 1024
PGSIZE = 4096
# Largest message accepted: a full data transfer plus generous headroom for
# the fixed part (libvfio-user accepts max_data_xfer_size + 32).
MAX_MSG_SIZE = MAX_DATA_XFER_SIZE + (64 << 10)
WRITE_MULTI_MAX_DATA = 8  # bytes of data per REGION_WRITE_MULTI entry

# -- payload layouts (§8) ----------------------------------------------------------
VERSION = Struct("<HH")  # major, minor; JSON + NUL follow
DMA_MAP = Struct("<IIQQQ")  # argsz, flags, offset, iova, size
DMA_UNMAP = Struct("<IIQQ")  # argsz, flags, iova, size
DEVICE_INFO = Struct("<IIII")  # argsz, flags, num_regions, num_irqs
REGION_INFO = Struct("<IIIIQQ")  # argsz, flags, index, cap_offset, size, offset
REGION_CAP_HEADER = Struct("<HHI")  # id, version, next (from the start of REGION_INFO)
SPARSE_MMAP_HEAD = Struct("<II")  # nr_areas, reserved
SPARSE_MMAP_AREA = Struct("<QQ")  # offset, size
REGION_TYPE_CAP = Struct("<II")  # type, subtype
IRQ_INFO = Struct("<IIII")  # argsz, flags, index, count
SET_IRQS = Struct("<IIIII")  # argsz, flags, index, start, count; BOOL data follows
REGION_ACCESS = Struct("<QII")  # offset, region, count; data follows
WRITE_MULTI_HEAD = Struct("<Q")  # wr_cnt
WRITE_MULTI_ENTRY = Struct("<QII8s")  # offset, region, count, data
DMA_RW = Struct("<QQ")  # address, count; data follows (spec layout, §3.8)
DEVICE_FEATURE = Struct("<II")  # argsz, flags; data follows
MIG_DATA = Struct("<II")  # argsz, size; data follows
EVENTFD_VALUE = Struct("<Q")

# -- linux/vfio.h values used on the wire ----------------------------------------------
DEVICE_FLAGS_RESET = 0x1
DEVICE_FLAGS_PCI = 0x2

REGION_FLAG_READ = 0x1
REGION_FLAG_WRITE = 0x2
REGION_FLAG_MMAP = 0x4
REGION_FLAG_CAPS = 0x8

REGION_CAP_SPARSE_MMAP = 1
REGION_CAP_TYPE = 2
REGION_CAP_MSIX_MAPPABLE = 3

IRQ_INFO_EVENTFD = 0x1
IRQ_INFO_MASKABLE = 0x2
IRQ_INFO_AUTOMASKED = 0x4
IRQ_INFO_NORESIZE = 0x8

IRQ_SET_DATA_NONE = 0x01
IRQ_SET_DATA_BOOL = 0x02
IRQ_SET_DATA_EVENTFD = 0x04
IRQ_SET_DATA_MASK = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD
IRQ_SET_ACTION_MASK = 0x08
IRQ_SET_ACTION_UNMASK = 0x10
IRQ_SET_ACTION_TRIGGER = 0x20
IRQ_SET_ACTIONS = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER

DMA_FLAG_READ = 0x1
DMA_FLAG_WRITE = 0x2
DMA_FLAG_MMAP = 0x4  # libvfio-user extension, never sent by QEMU
DMA_FLAG_FILE_IO = 0x8  # libvfio-user extension, never sent by QEMU
DMA_MAP_FLAGS_KNOWN = DMA_FLAG_READ | DMA_FLAG_WRITE | DMA_FLAG_MMAP | DMA_FLAG_FILE_IO

DMA_UNMAP_GET_DIRTY_BITMAP = 0x1
DMA_UNMAP_ALL = 0x2

DEVICE_FEATURE_MASK = 0xFFFF
DEVICE_FEATURE_GET = 1 << 16
DEVICE_FEATURE_SET = 1 << 17
DEVICE_FEATURE_PROBE = 1 << 18

PCI_BAR0_REGION_INDEX = 0
PCI_ROM_REGION_INDEX = 6
PCI_CONFIG_REGION_INDEX = 7
PCI_VGA_REGION_INDEX = 8
PCI_NUM_REGIONS = 9

PCI_INTX_IRQ_INDEX = 0
PCI_MSI_IRQ_INDEX = 1
PCI_MSIX_IRQ_INDEX = 2
PCI_ERR_IRQ_INDEX = 3
PCI_REQ_IRQ_INDEX = 4
PCI_NUM_IRQS = 5


# -- errors ------------------------------------------------------------------------
class ProtocolError(Exception):
    """Base of every vfio-user protocol error; ``errno`` is the positive errno to report."""

    def __init__(self, errno: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = errno
        self.reason = reason


class MessageError(ProtocolError):
    """One message is invalid; the stream is still in sync (an error reply is possible)."""

    def __init__(self, reason: str, errno: int = _errno.EINVAL) -> None:
        super().__init__(errno, reason)


class FatalProtocolError(ProtocolError):
    """The byte stream cannot be trusted any more: drop the peer."""

    def __init__(self, reason: str) -> None:
        super().__init__(_errno.EPROTO, reason)


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids (a bug on our side)."""

    def __init__(self, reason: str) -> None:
        super().__init__(_errno.EINVAL, reason)
