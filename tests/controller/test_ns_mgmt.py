"""Identify lists, Namespace Management and Namespace Attachment through the host driver (issue 11)."""
from __future__ import annotations

import os
import struct

from emulator.nvme.spec import AdminOpcode, CommandSpecific, Generic, LID

MIB = 1 << 20
CFG = {
    "subsystem": {"capacity": "128MiB", "max_namespaces": 4},
    "namespaces": [{"nsid": 1, "size": "32MiB"}],
    "controllers": [{"cntlid": 1, "type": "io"}, {"cntlid": 2, "type": "io"}],
}
AEC = 0x0B  # Asynchronous Event Configuration


def ids(buf: bytes) -> list[int]:
    out = []
    for (n,) in struct.iter_unpack("<I", buf):
        if not n:
            break
        out.append(n)
    return out


def ctrl_list(buf: bytes) -> list[int]:
    n = struct.unpack_from("<H", buf)[0]
    return list(struct.unpack_from(f"<{n}H", buf, 2))


def cap(idc: bytes) -> tuple[int, int]:
    return int.from_bytes(idc[280:296], "little"), int.from_bytes(idc[296:312], "little")


def test_identify_advertises_management(emu):
    h = emu(CFG).host()
    idc = h.identify(cns=1)
    oacs, = struct.unpack_from("<H", idc, 256)
    assert oacs & 0x2 and oacs & 0x8  # Format NVM, Namespace Management
    oncs, = struct.unpack_from("<H", idc, 520)
    assert oncs & 0x1 and oncs & 0x2 and oncs & 0x80 and oncs & 0x100  # Compare, WU, Verify, Copy
    assert struct.unpack_from("<I", idc, 516)[0] == 4  # NN
    assert struct.unpack_from("<I", idc, 540)[0] == 4  # MNAN
    assert idc[524] == 0  # FNA: per namespace, NSID FFFFFFFFh supported
    assert struct.unpack_from("<H", idc, 534)[0] == 0xF  # OCFS
    assert cap(idc) == (128 * MIB, 96 * MIB)
    assert ctrl_list(h.identify(cns=0x13)) == [1, 2]
    assert ctrl_list(h.identify(cns=0x13, cntid=2)) == [2]
    assert ctrl_list(h.identify(cns=0x12, nsid=1)) == [1, 2]
    assert ids(h.identify(cns=0x10)) == [1]
    ind = h.identify(cns=0x08, nsid=1)
    assert ind[1] == 1 and ind[14] == 1  # NMIC shared, NSTAT ready
    assert struct.unpack_from("<Q", h.identify(cns=0x1C), 0)[0] == 1  # NVM Command Set
    effects = h.get_log_page(LID.COMMANDS_SUPPORTED_EFFECTS, 4096).data
    for opc in (AdminOpcode.NS_MANAGEMENT, AdminOpcode.NS_ATTACHMENT, AdminOpcode.FORMAT_NVM):
        assert struct.unpack_from("<I", effects, 4 * opc)[0] & 0x1, hex(opc)
    for opc in (0x04, 0x05, 0x0C, 0x19):
        assert struct.unpack_from("<I", effects, 1024 + 4 * opc)[0] & 0x1, hex(opc)
    c = h.admin(AdminOpcode.IDENTIFY, nsid=5, read_len=4096, cdw10=0x11)
    assert c.sc == Generic.INVALID_NAMESPACE  # beyond NN


def test_create_attach_io_detach_delete(emu):
    e = emu(CFG)
    h = e.host()
    h2 = e.host(cntlid=2)
    h2.set_features(AEC, 0x100)  # Namespace Attribute Notices
    aer_cid = h2.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST)
    c = h.ns_create(4096, flbas=1)  # 16 MiB of 4 KiB LBAs
    assert c.ok, c
    nsid = c.dw0
    assert nsid == 2
    assert cap(h.identify(cns=1)) == (128 * MIB, 80 * MIB)
    assert ids(h.identify(cns=0x10)) == [1, 2]
    assert ids(h.identify(cns=2)) == [1]  # not attached yet
    assert h.identify(cns=0, nsid=2) == bytes(4096)
    alloc = h.identify(cns=0x11, nsid=2)
    assert struct.unpack_from("<Q", alloc)[0] == 4096 and alloc[26] == 1
    assert (h.write(2, 0, bytes(4096), lba_size=4096)).sc == Generic.INVALID_NAMESPACE
    assert h.ns_attach(2, [1, 2]).ok
    assert ctrl_list(h.identify(cns=0x12, nsid=2)) == [1, 2]
    ev = h2.wait(0, aer_cid)
    assert ev.dw0 & 0x7 == 2 and (ev.dw0 >> 16) & 0xFF == LID.CHANGED_NAMESPACES
    log = h2.get_log_page(LID.CHANGED_NAMESPACES, 4096).data
    assert ids(log) == [2]
    assert ids(h2.get_log_page(LID.CHANGED_NAMESPACES, 4096).data) == []  # cleared by the read
    data = os.urandom(8192)
    assert h.write(2, 10, data, lba_size=4096).ok
    assert h2.read(2, 10, 2, lba_size=4096).data == data
    assert h.ns_attach(2, [2], detach=True).ok
    assert h2.read(2, 10, 2, lba_size=4096).sc == Generic.INVALID_NAMESPACE
    assert h.ns_delete(2).ok
    assert ids(h.identify(cns=0x10)) == [1]
    assert cap(h.identify(cns=1)) == (128 * MIB, 96 * MIB)
    assert not (e.config.state_dir / "ns2.img").exists()


def test_management_errors(emu):
    h = emu(CFG).host()
    err = lambda c: (c.sct, c.sc)  # noqa: E731
    assert err(h.ns_create(200 * MIB // 512)) == (1, CommandSpecific.NS_INSUFFICIENT_CAPACITY)
    assert err(h.ns_create(2048, flbas=5)) == (1, CommandSpecific.INVALID_FORMAT)
    assert err(h.ns_create(2048, ncap=1024)) == (0, Generic.INVALID_FIELD)
    assert err(h.ns_create(0)) == (0, Generic.INVALID_FIELD)
    assert err(h.ns_create(2048, csi=2)) == (0, Generic.INVALID_FIELD)
    assert err(h.admin(AdminOpcode.NS_MANAGEMENT, cdw10=5)) == (0, Generic.INVALID_FIELD)
    made = [h.ns_create(2048).dw0 for _ in range(3)]
    assert made == [2, 3, 4]
    assert err(h.ns_create(2048)) == (1, CommandSpecific.NS_IDENTIFIER_UNAVAILABLE)
    assert err(h.ns_delete(9)) == (0, Generic.INVALID_NAMESPACE)
    assert err(h.ns_attach(1, [1])) == (1, CommandSpecific.NS_ALREADY_ATTACHED)
    assert err(h.ns_attach(2, [1, 9])) == (1, CommandSpecific.CONTROLLER_LIST_INVALID)
    assert err(h.ns_attach(2, [])) == (1, CommandSpecific.CONTROLLER_LIST_INVALID)
    assert err(h.ns_attach(2, [1], detach=True)) == (1, CommandSpecific.NS_NOT_ATTACHED)
    assert err(h.ns_attach(7, [1])) == (0, Generic.INVALID_NAMESPACE)
    assert err(h.ns_attach(0xFFFFFFFF, [1])) == (0, Generic.INVALID_NAMESPACE)
    assert h.ns_delete(0xFFFFFFFF).ok  # every namespace, the YAML one too
    assert ids(h.identify(cns=0x10)) == []
    c = h.ns_create(2048, nmic=0)  # private
    assert c.ok and c.dw0 == 1
    assert err(h.ns_attach(1, [1, 2])) == (1, CommandSpecific.NS_IS_PRIVATE)
    assert h.ns_attach(1, [2]).ok
    assert err(h.ns_attach(1, [1])) == (1, CommandSpecific.NS_IS_PRIVATE)


def test_created_namespaces_persist_across_restart(emu):
    e = emu(CFG)
    h = e.host()
    nsid = h.ns_create(8192).dw0
    assert h.ns_attach(nsid, [1]).ok
    assert h.ns_attach(1, [2], detach=True).ok
    data = os.urandom(4096)
    assert h.write(nsid, 100, data).ok
    e.restart()
    h = e.host()
    assert ids(h.identify(cns=0x10)) == [1, 2]
    assert h.read(nsid, 100, 8).data == data
    assert ctrl_list(h.identify(cns=0x12, nsid=1)) == [1]
    assert cap(h.identify(cns=1)) == (128 * MIB, 92 * MIB)


def test_delete_detach_format_refused_under_migration(emu):
    """A namespace attached to a suspended or logged controller keeps its data (TP4159)."""
    from emulator.host.lm import MigrationHost
    e = emu({"subsystem": {"capacity": "64MiB"},
             "namespaces": [{"nsid": 1, "size": "16MiB"}],
             "controllers": [{"cntlid": 1, "type": "io"}, {"cntlid": 2, "type": "mmc"}]})
    g = e.host(1)
    m = MigrationHost(e.host(2))
    q = m.udmq(1)
    assert m.log_start(q.cdqid).ok
    sequence = (0, Generic.COMMAND_SEQUENCE_ERROR)
    assert (m.h.ns_delete(1).sct, m.h.ns_delete(1).sc) == sequence
    c = m.h.ns_attach(1, [1], detach=True)
    assert (c.sct, c.sc) == sequence
    c = g.format_nvm(1)
    assert (c.sct, c.sc) == sequence
    assert m.log_stop(q.cdqid).ok
    assert m.suspend(1).ok
    c = m.h.ns_delete(1)
    assert (c.sct, c.sc) == (1, CommandSpecific.CONTROLLER_SUSPENDED)
    assert m.resume(1).ok
    assert m.h.ns_delete(1).ok


def test_create_beyond_what_the_file_system_holds(emu):
    """A capacity larger than the file system allows: the create fails cleanly (EFBIG)."""
    e = emu({"subsystem": {"capacity": "64TiB", "max_namespaces": 4},
             "namespaces": [{"nsid": 1, "size": "1MiB"}], "controllers": [{"cntlid": 1, "type": "io"}]})
    h = e.host()
    c = h.ns_create((48 << 40) // 512)  # 48 TiB: beyond ext4's 16 TiB file size limit
    if c.ok:  # a file system that holds it (xfs, tmpfs): the namespace exists and works
        assert h.ns_delete(c.dw0).ok
        return
    assert (c.sct, c.sc) == (1, CommandSpecific.NS_INSUFFICIENT_CAPACITY)
    assert not (e.config.state_dir / "ns2.img").exists()
    assert h.ns_create(2048).dw0 == 2  # and the NSID is still free
