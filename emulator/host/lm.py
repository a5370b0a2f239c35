"""The Migration Management Host side of TP4159, over an NvmeHost driving an MMC.

Builds the commands exactly as libnvme encodes them (CDW fields per Base 2.1
§5.1.4, §5.1.16, §5.1.17, §5.1.26, §5.1.27) with the layouts of
``emulator.nvme.migration.wire``, and reads the LBA Migration Queue from host
memory with the phase tag, like a driver.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from emulator.host.driver import Completion, NvmeCommandError, NvmeHost
from emulator.nvme.migration import wire
from emulator.nvme.spec import FID, AdminOpcode

# Get LBA Status (NVM CS 1.2 §4.2.1, Figures 47-48): list header and descriptor.
LBA_STATUS_HEADER = struct.Struct("<IB3x")  # NLSD, CMPC
LBA_STATUS_DESCRIPTOR = struct.Struct("<QIxB2x")  # DSLBA, NLB (0's based), STAS
ATYPE_ALLOCATED = 0x02  # TP4165: tracked allocated LBAs
CMPC_COMPLETE = 2


@dataclass(frozen=True)
class NamespaceFormat:
    """What must match between source and destination (Identify Namespace, NVM CS Figure 114)."""
    nsid: int
    nsze: int  # LBAs
    lba_size: int
    ms: int  # metadata bytes per LBA

    @classmethod
    def parse(cls, nsid: int, data: bytes) -> "NamespaceFormat":
        nsze = int.from_bytes(data[0:8], "little")
        flbas = data[26]
        fmt = (flbas & 0xF) | ((flbas >> 5) & 0x3) << 4
        lbaf = int.from_bytes(data[128 + 4 * fmt:132 + 4 * fmt], "little")
        return cls(nsid, nsze, 1 << ((lbaf >> 16) & 0xFF), lbaf & 0xFFFF)


@dataclass(frozen=True)
class LmqEntry:
    """One LBA Migration Queue Entry Type 0 (NVM CS 1.2 Figure 177)."""
    nsid: int
    nlb: int  # 1's based here (the entry holds NLB 0's based)
    slba: int
    esa: int
    dlba: bool
    lbacir: int

    @property
    def is_range(self) -> bool:
        return self.lbacir == wire.Lbacir.RANGE


@dataclass
class HostCdq:
    """A CDQ as the host sees it: memory, slots, its own head and expected phase."""
    cdqid: int
    iova: int
    slots: int
    entry_size: int = wire.CDQ_ENTRY_SIZE_T0
    head: int = 0
    phase: int = 1
    seen: list[LmqEntry] = field(default_factory=list)

    @property
    def size_dw(self) -> int:
        return self.slots * self.entry_size // 4


def check(c: Completion) -> Completion:
    if not c.ok:
        raise NvmeCommandError(c)
    return c


class MigrationHost:
    """Drive one MMC (``host`` must be initialised on it)."""

    def __init__(self, host: NvmeHost) -> None:
        self.h = host

    # -- Controller Data Queue (45h) and Feature 21h --------------------------------
    def cdq_create(self, cntlid: int, slots: int, pc: bool = True, qt: int = wire.QT_UDMQ,
                   size_dw: int | None = None, prp1: int | None = None) -> tuple[Completion, HostCdq]:
        """Create a CDQ in zeroed host memory (CDQP bits 0 before create, §8.1.6)."""
        q = HostCdq(0, self.h.mem.alloc(slots * wire.CDQ_ENTRY_SIZE_T0), slots)
        c = self.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, prp1=q.iova if prp1 is None else prp1,
                         cdw10=wire.CdqSel.CREATE | (qt << 16),
                         cdw11=(cntlid << 16) | int(pc),
                         cdw12=q.size_dw if size_dw is None else size_dw)
        q.cdqid = c.dw0 & 0xFFFF
        return c, q

    def udmq(self, cntlid: int, slots: int = 64) -> HostCdq:
        c, q = self.cdq_create(cntlid, slots)
        check(c)
        return q

    def cdq_delete(self, cdqid: int) -> Completion:
        return self.h.admin(AdminOpcode.CONTROLLER_DATA_QUEUE, cdw10=wire.CdqSel.DELETE,
                            cdw11=cdqid)

    def cdq_set(self, cdqid: int, hp: int, tpt: int | None = None) -> Completion:
        etpt = wire.CDQ_FEATURE_ETPT if tpt is not None else 0
        return self.h.admin(AdminOpcode.SET_FEATURES, cdw10=FID.CONTROLLER_DATA_QUEUE,
                            cdw11=cdqid | etpt, cdw12=hp, cdw13=tpt or 0)

    def cdq_get(self, cdqid: int) -> Completion:
        return self.h.admin(AdminOpcode.GET_FEATURES, cdw10=FID.CONTROLLER_DATA_QUEUE,
                            cdw11=cdqid, read_len=wire.CDQ_FEATURE_DATA.size)

    def drain(self, q: HostCdq, consume: bool = True) -> list[LmqEntry]:
        """New entries (phase tag), then tell the controller the new head."""
        got: list[LmqEntry] = []
        while True:
            raw = self.h.mem.read(q.iova + q.head * q.entry_size, q.entry_size)
            nsid, nlb0, slba, attrs = wire.LMQ_ENTRY.unpack(raw)
            if attrs & 1 != q.phase:
                break
            got.append(LmqEntry(nsid, nlb0 + 1, slba, (attrs >> 1) & 0x7, bool(attrs & 0x20),
                                attrs >> 6))
            q.head += 1
            if q.head == q.slots:
                q.head, q.phase = 0, q.phase ^ 1
        q.seen += got
        if got and consume:
            check(self.cdq_set(q.cdqid, q.head))
        return got

    # -- namespaces ----------------------------------------------------------------------
    def active_nsids(self) -> list[int]:
        """Identify CNS 02h: the namespaces attached to this (MMC) controller."""
        data = self.h.identify(cns=0x02)
        ids = struct.unpack("<1024I", data)
        return [n for n in ids if n]

    def namespace_format(self, nsid: int) -> NamespaceFormat:
        return NamespaceFormat.parse(nsid, self.h.identify(cns=0x00, nsid=nsid))

    def allocated(self, nsid: int, slba: int = 0, mndw: int = 1023) -> list[tuple[int, int]]:
        """Every allocated range (SLBA, NLB) of ``nsid`` from ``slba`` on: Get LBA Status
        ATYPE 02h, following CMPC 1h (incomplete) until 2h (complete)."""
        out: list[tuple[int, int]] = []
        while True:
            c = check(self.h.admin(AdminOpcode.GET_LBA_STATUS, nsid=nsid, read_len=(mndw + 1) * 4,
                                   cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=mndw,
                                   cdw13=ATYPE_ALLOCATED << 24))
            nlsd, cmpc = LBA_STATUS_HEADER.unpack_from(c.data)
            for k in range(nlsd):
                dslba, nlb0, _ = LBA_STATUS_DESCRIPTOR.unpack_from(
                    c.data, LBA_STATUS_HEADER.size + k * LBA_STATUS_DESCRIPTOR.size)
                out.append((dslba, nlb0 + 1))
            if cmpc == CMPC_COMPLETE or not nlsd:
                return out
            slba = out[-1][0] + out[-1][1]

    # -- Track Send (3Dh) / Track Receive (3Eh) -------------------------------------------
    def log_start(self, cdqid: int) -> Completion:
        return self.h.admin(AdminOpcode.TRACK_SEND, cdw10=wire.TRACK_SEL_LUDC | (wire.LACT_START << 16),
                            cdw11=cdqid)

    def log_stop(self, cdqid: int) -> Completion:
        """Stop logging.  Controller Suspended (39h) while the logged controller is
        suspended (Base 2.3 §5.2.28.1.1): then end logging by deleting the queue
        (``cdq_delete``, or ``suspend(dudmq=True)``)."""
        return self.h.admin(AdminOpcode.TRACK_SEND, cdw10=wire.TRACK_SEL_LUDC | (wire.LACT_STOP << 16),
                            cdw11=cdqid)

    def track_memory(self, cntlid: int, ranges: list[tuple[int, int]], rmrtg: int = 0,
                     ver: int = 0) -> Completion:
        """Track Send TMC start: ranges are (SADDR, LEN in 2^rmrtg x 4 KiB units)."""
        data = wire.TMC_HEADER.pack(ver, rmrtg, len(ranges)) + b"".join(
            wire.TMC_DESCRIPTOR.pack(a, n) for a, n in ranges)
        return self.h.admin(AdminOpcode.TRACK_SEND, data=data,
                            cdw10=wire.TRACK_SEL_TMC | (wire.TACT_START << 16), cdw11=cntlid)

    def track_memory_stop(self, cntlid: int) -> Completion:
        return self.h.admin(AdminOpcode.TRACK_SEND, cdw10=wire.TRACK_SEL_TMC, cdw11=cntlid)

    def track_receive(self, cntlid: int, numdl: int = 1023) -> Completion:
        return self.h.admin(AdminOpcode.TRACK_RECEIVE, read_len=(numdl + 1) * 4,
                            cdw10=wire.TRACK_RECEIVE_SEL_TMC, cdw11=cntlid, cdw12=numdl)

    @staticmethod
    def parse_tracked(data: bytes) -> tuple[int, int, int, list[tuple[int, int]]]:
        """(ATTRB, CNTLID, RPMPG, [(SADDR, bytes)]) of a Tracked Memory Changes structure."""
        ver, attrb, cntlid, ntmcd, rpmpg = wire.TRACKED_HEADER.unpack_from(data)
        unit = 1 << (wire.GRANULE_BASE_SHIFT + rpmpg)
        out = []
        for k in range(ntmcd):
            saddr, n = wire.TRACKED_DESCRIPTOR.unpack_from(
                data, wire.TRACKED_HEADER.size + k * wire.TRACKED_DESCRIPTOR.size)
            out.append((saddr, n * unit))
        return attrb, cntlid, rpmpg, out

    def dirty_ranges(self, cntlid: int) -> tuple[list[tuple[int, int]], bool]:
        """All dirty ranges (following MTR); and whether SUSP was set."""
        out: list[tuple[int, int]] = []
        while True:
            c = check(self.track_receive(cntlid, numdl=(16 + 4 * 16) // 4 - 1))
            attrb, _, _, ranges = self.parse_tracked(c.data)
            out += ranges
            if not attrb & wire.ATTRB_MTR:
                return out, bool(attrb & wire.ATTRB_SUSP)

    # -- Migration Send (41h) / Receive (42h) ---------------------------------------------
    def suspend(self, cntlid: int, stype: int = wire.STYPE_SUSPEND, dudmq: bool = False) -> Completion:
        return self.h.admin(AdminOpcode.MIGRATION_SEND, cdw10=wire.MIGRATION_SEND_SUSPEND,
                            cdw11=cntlid | (stype << 16) | (wire.SUSPEND_DUDMQ if dudmq else 0))

    def resume(self, cntlid: int) -> Completion:
        return self.h.admin(AdminOpcode.MIGRATION_SEND, cdw10=wire.MIGRATION_SEND_RESUME,
                            cdw11=cntlid)

    def set_state_piece(self, cntlid: int, data: bytes, seqind: int, offset: int = 0,
                        csvi: int = 1, csuuidi: int = 1, numd: int | None = None) -> Completion:
        return self.h.admin(AdminOpcode.MIGRATION_SEND, data=data or None,
                            cdw10=wire.MIGRATION_SEND_SET_STATE | (seqind << 16),
                            cdw11=cntlid | (csvi << 16) | (csuuidi << 24),
                            cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32,
                            cdw15=len(data) // 4 if numd is None else numd)

    def set_state(self, cntlid: int, state: bytes, csvi: int = 1, csuuidi: int = 1,
                  piece: int = 0) -> Completion:
        """Set Controller State in one command (SEQIND 11b) or in pieces of ``piece`` bytes."""
        if not piece or piece >= len(state):
            return self.set_state_piece(cntlid, state, wire.Seqind.ONLY, 0, csvi, csuuidi)
        chunks = [state[i:i + piece] for i in range(0, len(state), piece)]
        for i, chunk in enumerate(chunks):
            seq = (wire.Seqind.FIRST if i == 0 else
                   wire.Seqind.LAST if i == len(chunks) - 1 else wire.Seqind.MIDDLE)
            c = self.set_state_piece(cntlid, chunk, seq, i * piece, csvi, csuuidi)
            if not c.ok:
                return c
        return c

    def get_state_piece(self, cntlid: int, offset: int, numdl: int, csvi: int = 1,
                        csuuidi: int = 1) -> Completion:
        return self.h.admin(AdminOpcode.MIGRATION_RECEIVE, read_len=(numdl + 1) * 4,
                            cdw10=wire.MIGRATION_RECEIVE_GET_STATE | (csvi << 16),
                            cdw11=cntlid | (csuuidi << 16), cdw12=offset & 0xFFFFFFFF,
                            cdw13=offset >> 32, cdw15=numdl)

    def get_state(self, cntlid: int, csvi: int = 1, csuuidi: int = 1,
                  piece: int = 4096) -> tuple[bytes, bool]:
        """The whole Controller State (header first, then the rest by offset); CSUP."""
        c = check(self.get_state_piece(cntlid, 0, piece // 4 - 1, csvi, csuuidi))
        _, _, css, _, vss, _ = wire.CS_HEADER.unpack_from(c.data)
        total = wire.CS_HEADER.size + 4 * (css + vss)
        data, csup = bytearray(c.data), bool(c.dw0 & wire.CSUP)
        while len(data) < total:
            c = check(self.get_state_piece(cntlid, len(data), piece // 4 - 1, csvi, csuuidi))
            data += c.data
            csup = csup and bool(c.dw0 & wire.CSUP)
        return bytes(data[:total]), csup
