"""Limits a host cannot get around: MDTS on every transfer, a CQ outside memory is fatal."""
from __future__ import annotations

from emulator.nvme.spec import AdminOpcode, Generic

MDTS5 = (1 << 5) * 4096  # the default mdts: 5


def get_log_page(h, lid: int, nbytes: int, prp1: int | None = None):  # type: ignore[no-untyped-def]
    numd = nbytes // 4 - 1
    return h.admin(AdminOpcode.GET_LOG_PAGE, cdw10=lid | ((numd & 0xFFFF) << 16), cdw11=numd >> 16,
                   prp1=prp1 if prp1 is not None else h.mem.alloc(4096))


def test_get_log_page_is_capped_at_mdts(emu) -> None:  # type: ignore[no-untyped-def]
    """NUMD asking for 1 GiB (or one dword past MDTS) is Invalid Field, before anything is built."""
    h = emu().host()
    buf = h.mem.alloc(MDTS5)
    for nbytes in (1 << 30, MDTS5 + 4):
        c = get_log_page(h, 0x02, nbytes, prp1=buf)
        assert (c.sct, c.sc) == (0, Generic.INVALID_FIELD), nbytes
    assert h.get_log_page(0x02, 512).ok
    assert h.read(1, 0, 1).ok
