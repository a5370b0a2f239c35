"""Error statuses for bad commands (issue 2)."""
from __future__ import annotations

from emulator.nvme.spec import Generic, IoOpcode


def test_bad_opcode(emu):
    h = emu().host()
    c = h.command(1, 0x7E, nsid=1)
    assert (c.sct, c.sc, c.dnr) == (0, Generic.INVALID_OPCODE, True)
    c = h.admin(0x70)
    assert (c.sct, c.sc) == (0, Generic.INVALID_OPCODE)


def test_bad_nsid(emu):
    h = emu().host()
    for nsid in (0, 2, 0xFFFFFFFF):
        c = h.read(nsid, 0, 1)
        assert (c.sct, c.sc) == (0, Generic.INVALID_NAMESPACE), nsid
    assert h.flush(5).sc == Generic.INVALID_NAMESPACE


def test_lba_out_of_range(emu):
    h = emu().host()
    nsze = (64 << 20) // 512
    assert h.read(1, nsze - 1, 1).ok
    for cmd in (lambda: h.read(1, nsze - 1, 2), lambda: h.write(1, nsze, bytes(512)),
                lambda: h.write_zeroes(1, nsze - 4, 8), lambda: h.deallocate(1, [(nsze, 1)]),
                lambda: h.read(1, 1 << 40, 1)):
        c = cmd()
        assert (c.sct, c.sc) == (0, Generic.LBA_OUT_OF_RANGE)


def test_prp_outside_mapped_memory(emu):
    h = emu().host()
    for prp1 in (0x1000, 0xDEAD0000, h.mem.iova + h.mem.size):
        c = h.command(1, IoOpcode.READ, nsid=1, prp1=prp1, cdw12=0)
        assert (c.sct, c.sc) == (0, Generic.DATA_TRANSFER_ERROR), hex(prp1)
        c = h.command(1, IoOpcode.WRITE, nsid=1, prp1=prp1, cdw12=0)
        assert (c.sct, c.sc) == (0, Generic.DATA_TRANSFER_ERROR)
    # A PRP list pointer outside memory
    buf = h.mem.alloc(4096)
    c = h.command(1, IoOpcode.READ, nsid=1, prp1=buf, prp2=0xBAD000, cdw12=31)
    assert (c.sct, c.sc) == (0, Generic.DATA_TRANSFER_ERROR)
    # Misaligned PRP entries
    c = h.command(1, IoOpcode.READ, nsid=1, prp1=buf + 2, cdw12=0)
    assert (c.sct, c.sc) == (0, Generic.PRP_OFFSET_INVALID)
    c = h.command(1, IoOpcode.READ, nsid=1, prp1=buf, prp2=buf + 4096 + 512, cdw12=15)
    assert (c.sct, c.sc) == (0, Generic.PRP_OFFSET_INVALID)
    # The controller still works afterwards.
    assert h.read(1, 0, 1).ok


def test_bad_sgl_and_fused_refused(emu):
    h = emu().host()
    buf = h.mem.alloc(4096)
    cid = h.submit(1, IoOpcode.READ, 1, buf, 0, flags=0x40)  # PSDT=01b, a 0-byte Data Block
    c = h.wait(1, cid)
    assert c.sc == 0x0F  # Data SGL Length Invalid (tests/controller/test_sgl.py has the rest)
    cid = h.submit(1, IoOpcode.READ, 1, buf, 0, flags=0x1)  # FUSE
    assert h.wait(1, cid).sc == Generic.INVALID_FIELD


def test_prp_list_chain_loop_is_refused(emu):
    """A list page holding only a chain pointer to itself must not hang the emulator."""
    import struct
    h = emu().host()
    buf = h.mem.alloc(3 * 4096)
    page = h.mem.alloc(4096)
    last = page + 4096 - 8  # the last slot: no room for entries, only a chain pointer
    h.mem.write(last, struct.pack("<Q", last))
    c = h.command(1, IoOpcode.READ, nsid=1, prp1=buf, prp2=last, cdw12=23, timeout=5)
    assert (c.sct, c.sc) == (0, Generic.PRP_OFFSET_INVALID)
    assert h.read(1, 0, 1).ok
