"""Admin commands through the host driver over vfio-user (issue 2)."""
from __future__ import annotations

import struct

from emulator.nvme.spec import FID, AdminOpcode, CommandSpecific, Generic

TWO = {
    "subsystem": {"serial": "SER123", "model": "nvme-emu test"},
    "namespaces": [{"nsid": 1, "size": "64MiB"}, {"nsid": 3, "size": "16MiB", "lba_size": 4096}],
    "controllers": [{"cntlid": 7, "type": "io", "max_io_queues": 4, "mdts": 6}],
}


def test_identify_controller(emu):
    h = emu(TWO).host(cntlid=7)
    idc = h.identify(cns=1)
    assert idc[4:24].decode().strip() == "SER123"
    assert idc[24:64].decode().strip() == "nvme-emu test"
    assert idc[77] == 6
    assert struct.unpack_from("<H", idc, 78)[0] == 7  # CNTLID
    assert struct.unpack_from("<I", idc, 80)[0] == 0x20100  # VER 2.1
    assert struct.unpack_from("<I", idc, 516)[0] == 3  # NN
    assert idc[512] == 0x66 and idc[513] == 0x44
    assert idc[768:800].rstrip(b"\0").decode().startswith("nqn.")


def test_cmic_multi_controller_bit_follows_the_subsystem(emu):
    """CMIC bit 1 (Base 2.1 Figure 312): set when the NVM subsystem has two or more
    controllers, cleared for a one-controller subsystem (Linux then puts no multipath
    head disk in front of its namespaces)."""
    assert emu(TWO).host(cntlid=7).identify(cns=1)[76] == 0
    two_ctrls = dict(TWO, controllers=[{"cntlid": 7, "type": "io", "max_io_queues": 4},
                                       {"cntlid": 8, "type": "io", "max_io_queues": 4}])
    e = emu(two_ctrls)
    assert e.host(cntlid=7).identify(cns=1)[76] == 0x2
    assert e.host(cntlid=8).identify(cns=1)[76] == 0x2


def test_identify_namespaces(emu):
    h = emu(TWO).host(cntlid=7)
    ids = h.identify(cns=2)
    assert struct.unpack_from("<3I", ids) == (1, 3, 0)
    ns1 = h.identify(cns=0, nsid=1)
    assert struct.unpack_from("<Q", ns1)[0] == (64 << 20) // 512
    lbads = lambda ns: (struct.unpack_from("<I", ns, 128 + 4 * (ns[26] & 0xF))[0] >> 16) & 0xFF  # noqa: E731
    assert ns1[25] == 1 and ns1[26] == 0 and lbads(ns1) == 9  # NLBAF: 512 B and 4 KiB formats
    ns3 = h.identify(cns=0, nsid=3)
    assert ns3[26] == 1 and lbads(ns3) == 12
    inactive = h.identify(cns=0, nsid=2)
    assert inactive == bytes(4096)
    desc = h.identify(cns=3, nsid=1)
    kinds = []
    off = 0
    while desc[off]:
        kinds.append(desc[off])
        off += 4 + desc[off + 1]
    assert kinds == [1, 2, 3, 4]
    assert h.identify(cns=6, csi=0) is not None
    assert h.identify(cns=5, nsid=1, csi=0) is not None
    c = h.admin(AdminOpcode.IDENTIFY, nsid=0x10, read_len=4096, cdw10=0)
    assert c.sc == Generic.INVALID_NAMESPACE
    c = h.admin(AdminOpcode.IDENTIFY, read_len=4096, cdw10=0x55)
    assert c.sc == Generic.INVALID_FIELD


def test_queue_creation_and_deletion(emu):
    h = emu(TWO).host(cntlid=7, io_queues=2)
    assert h.write(1, 0, bytes(512), qid=2).ok
    h.delete_io_queue_pair(2)
    h.create_io_queue_pair(2, 16)
    assert h.write(1, 0, bytes(512), qid=2).ok
    h.delete_io_queue_pair(2)
    h.create_io_queue_pair(2, 8)
    assert h.read(1, 0, 1, qid=2).ok
    # Deleting a CQ with an SQ attached is refused.
    c = h.admin(AdminOpcode.DELETE_IO_CQ, cdw10=1)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_QUEUE_DELETION)


def test_bad_queue_ids_and_sizes(emu):
    h = emu(TWO).host(cntlid=7, io_queues=1)
    cq = h.mem.alloc(4096)
    # QID above the granted Number of Queues
    c = h.admin(AdminOpcode.CREATE_IO_CQ, prp1=cq, cdw10=(15 << 16) | 9, cdw11=0x1)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    c = h.admin(AdminOpcode.CREATE_IO_CQ, prp1=cq, cdw10=(15 << 16) | 1, cdw11=0x1)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_QUEUE_IDENTIFIER)  # exists
    c = h.admin(AdminOpcode.DELETE_IO_SQ, cdw10=0)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    c = h.admin(AdminOpcode.DELETE_IO_SQ, cdw10=3)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_QUEUE_IDENTIFIER)
    c = h.admin(AdminOpcode.CREATE_IO_SQ, prp1=cq, cdw10=(15 << 16) | 2, cdw11=(9 << 16) | 1)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_QUEUE_IDENTIFIER)  # qid 2 > granted
    h.delete_io_queue_pair(1)
    c = h.admin(AdminOpcode.CREATE_IO_CQ, prp1=cq, cdw10=(0xFFFF << 16) | 1, cdw11=0x1)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_QUEUE_SIZE)
    c = h.admin(AdminOpcode.CREATE_IO_CQ, prp1=cq, cdw10=(15 << 16) | 1, cdw11=(999 << 16) | 0x3)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_INTERRUPT_VECTOR)
    c = h.admin(AdminOpcode.CREATE_IO_SQ, prp1=cq, cdw10=(15 << 16) | 1, cdw11=(5 << 16) | 1)
    assert (c.sct, c.sc) == (1, CommandSpecific.COMPLETION_QUEUE_INVALID)
    c = h.admin(AdminOpcode.CREATE_IO_CQ, prp1=cq + 8, cdw10=(15 << 16) | 1, cdw11=0x1)
    assert (c.sct, c.sc) == (0, Generic.PRP_OFFSET_INVALID)


def test_features(emu):
    h = emu(TWO).host(cntlid=7, io_queues=1)
    nq = h.get_features(FID.NUMBER_OF_QUEUES)
    assert nq.dw0 == 0  # one of each granted (0's based)
    assert h.set_features(FID.INTERRUPT_COALESCING, 0x0A03).ok
    assert h.get_features(FID.INTERRUPT_COALESCING).dw0 == 0x0A03
    assert h.get_features(FID.INTERRUPT_COALESCING, sel=1).dw0 == 0
    assert h.get_features(FID.VOLATILE_WRITE_CACHE).dw0 == 1
    assert h.get_features(FID.ARBITRATION, sel=3).dw0 & 0x4
    for fid in (1, 2, 4, 5, 6, 7, 8, 0xA, 0xB, 0xC, 0xD, 0xF, 0x11, 0x80):
        assert h.get_features(fid, cdw11=0).ok, hex(fid)
    assert h.get_features(9, cdw11=1).ok
    assert h.get_features(0xE, read_len=8).ok
    assert h.get_features(0x16, read_len=512).ok
    bad = h.get_features(0x77)
    assert (bad.sct, bad.sc) == (0, Generic.INVALID_FIELD)
    c = h.admin(AdminOpcode.SET_FEATURES, cdw10=FID.ARBITRATION | (1 << 31))
    assert (c.sct, c.sc) == (1, CommandSpecific.FEATURE_NOT_SAVEABLE)
    c = h.admin(AdminOpcode.SET_FEATURES, cdw10=FID.NUMBER_OF_QUEUES, cdw11=0)
    assert (c.sct, c.sc) == (0, Generic.COMMAND_SEQUENCE_ERROR)  # I/O queues exist
    assert h.set_features(FID.TIMESTAMP, data=(1234567).to_bytes(8, "little")).ok
    ts = h.get_features(FID.TIMESTAMP, read_len=8)
    assert int.from_bytes(ts.data[:6], "little") >= 1234567


def test_log_pages(emu):
    h = emu(TWO).host(cntlid=7)
    assert h.write(1, 0, bytes(4096)).ok
    smart = h.get_log_page(2, 512)
    assert smart.ok and int.from_bytes(smart.data[80:96], "little") == 1  # host writes
    assert h.get_log_page(1, 64 * 64).ok
    fw = h.get_log_page(3, 512)
    assert fw.data[0] == 1 and fw.data[8:11] == b"0.1"
    cse = h.get_log_page(5, 4096)
    acs = struct.unpack_from("<256I", cse.data)
    iocs = struct.unpack_from("<256I", cse.data, 1024)
    assert acs[AdminOpcode.IDENTIFY] & 1 and iocs[1] == 0x3 and iocs[2] == 0x1
    assert h.get_log_page(0, 1024).ok
    assert h.get_log_page(2, 16, offset=8).data == smart.data[8:24]
    c = h.get_log_page(0x70, 512)
    assert (c.sct, c.sc) == (1, CommandSpecific.INVALID_LOG_PAGE)
    c = h.get_log_page(2, 16, offset=2)
    assert c.sc == Generic.INVALID_FIELD


def test_async_event_request_and_abort(emu):
    h = emu(TWO).host(cntlid=7)
    cids = [h.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST) for _ in range(4)]
    extra = h.submit(0, AdminOpcode.ASYNC_EVENT_REQUEST)
    c = h.wait(0, extra)
    assert (c.sct, c.sc) == (1, CommandSpecific.ASYNC_EVENT_REQUEST_LIMIT_EXCEEDED)
    assert all(h.poll(0, cid) is None for cid in cids)
    # An invalid doorbell write (queue 9 does not exist) raises an Error event.
    h.t.mmio_write(0x1000 + 9 * 8, 4, 1)
    got = None
    for cid in cids:
        got = got or h.poll(0, cid)
    if got is None:
        import time
        time.sleep(0.05)
        for cid in cids:
            got = got or h.poll(0, cid)
    assert got is not None and got.ok and got.dw0 & 0x7 == 0  # AET error
    ab = h.admin(AdminOpcode.ABORT, cdw10=(cids[1] << 16))
    assert ab.ok and ab.dw0 & 1
    assert h.admin(AdminOpcode.KEEP_ALIVE).ok


def test_controller_reset_and_reenable(emu):
    e = emu(TWO)
    h = e.host(cntlid=7, io_queues=2)
    assert h.write(1, 0, b"\xab" * 512).ok
    h.disable()
    h.init(io_queues=2)
    assert h.read(1, 0, 1, qid=2).data == b"\xab" * 512
    # Function level: DEVICE_RESET
    h.t.client.reset()
    assert h.t.mmio_read(0x14, 4) == 0  # CC back to 0
    h.init(io_queues=1)
    assert h.read(1, 0, 1).data == b"\xab" * 512
