"""Get LBA Status from the host side: build the command, parse the list, walk with continuation,
and the expected answer from a plain set of written LBAs (issue 4)."""
from __future__ import annotations

import struct
from typing import Iterable

from emulator.host.driver import Completion, NvmeHost
from emulator.nvme.spec import AdminOpcode

HEADER = struct.Struct("<IB3x")  # NLSD, CMPC
DESCRIPTOR = struct.Struct("<QIxB2x")  # DSLBA, NLB (0's based), STAS
CMPC_INCOMPLETE, CMPC_COMPLETE = 1, 2
LBARS_ALLOCATED = 0b010


def mndw_for(descriptors: int) -> int:
    """MNDW (0's based dwords) for a buffer of exactly ``descriptors`` entries."""
    return (HEADER.size + DESCRIPTOR.size * descriptors) // 4 - 1


def get_lba_status(h: NvmeHost, nsid: int, slba: int = 0, mndw: int = 1023, rl: int = 0,
                   atype: int = 2, cdw13_extra: int = 0) -> Completion:
    return h.admin(AdminOpcode.GET_LBA_STATUS, nsid=nsid, read_len=(mndw + 1) * 4,
                   cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=mndw,
                   cdw13=(atype << 24) | (rl & 0xFFFF) | cdw13_extra)


def parse(data: bytes) -> tuple[int, int, list[tuple[int, int]]]:
    """(NLSD, CMPC, [(DSLBA, number of LBAs)]); every descriptor must say 'allocated'."""
    nlsd, cmpc = HEADER.unpack_from(data)
    out = []
    for k in range(nlsd):
        dslba, nlb, stas = DESCRIPTOR.unpack_from(data, HEADER.size + k * DESCRIPTOR.size)
        assert stas & 0x7 == LBARS_ALLOCATED, stas
        out.append((dslba, nlb + 1))
    return nlsd, cmpc, out


def scan(h: NvmeHost, nsid: int, slba: int = 0, rl: int = 0, mndw: int = 1023,
         max_commands: int = 100000) -> tuple[list[tuple[int, int]], int]:
    """Every allocated range in [slba, slba+rl) (rl 0 = to the end), following CMPC=1h.

    Returns the descriptors and the number of commands it took.
    """
    end = None if rl == 0 else slba + rl
    out: list[tuple[int, int]] = []
    for n in range(1, max_commands + 1):
        c = get_lba_status(h, nsid, slba, mndw, 0 if end is None else end - slba)
        assert c.ok, c
        nlsd, cmpc, descs = parse(c.data)
        if out and descs:
            assert descs[0][0] >= out[-1][0] + out[-1][1]  # each DSLBA beyond the previous
        out += descs
        if cmpc == CMPC_COMPLETE:
            return out, n
        assert cmpc == CMPC_INCOMPLETE and descs, (cmpc, descs)
        slba = descs[-1][0] + descs[-1][1]
        if end is not None and slba >= end:
            raise AssertionError("CMPC=1h but the range is exhausted")
    raise AssertionError("scan did not complete")


def expected(written: Iterable[tuple[int, int]], tlbaag: int, nsze: int,
             slba: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Coalesced, clipped ranges of the granules touched by (slba, nlb) writes."""
    end = nsze if end is None else min(end, nsze)
    granules = set()
    for s, n in written:
        granules.update(range(s // tlbaag, (s + n - 1) // tlbaag + 1))
    out: list[tuple[int, int]] = []
    for g in sorted(granules):
        lo, hi = max(g * tlbaag, slba), min((g + 1) * tlbaag, end)
        if lo >= hi:
            continue
        if out and out[-1][0] + out[-1][1] == lo:
            out[-1] = (out[-1][0], out[-1][1] + hi - lo)
        else:
            out.append((lo, hi - lo))
    return out
