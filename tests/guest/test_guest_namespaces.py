"""nvme-cli inside a Linux guest manages namespaces and uses the NVM commands (issue 11).

One boot: two namespaces from the YAML (both used by fio, with the kernel told to use SGLs),
then create-ns / attach-ns (the block device appears without a reboot), list-ns --all,
list-ctrl, sanitize (Overwrite) with sanitize-log, format to 4 KiB LBAs, write-uncor (the read
fails, a write heals), get-lba-status --action=0x11, lba-status-log, compare, verify, copy
(inside the namespace and from another one), detach-ns, delete-ns.  Then, while the guest
waits, a host driver on a second controller of the subsystem creates a namespace and attaches
it to the guest's controller: only the Namespace Attribute Notice tells the guest's driver, and
its block device appears.  After the guest powers off the emulator restarts and a host driver finds
the created namespaces, their data, the uncorrectable mark and the new format still there."""
from __future__ import annotations

import re
import struct

import pytest

from emulator.host.driver import NvmeHost
from emulator.host.memory import HostMemory
from emulator.host.transport import VfioUserTransport
from emulator.nvme.spec import SCT, MediaError
from emulator.vfio_user.client import VfioUserClient

pytestmark = pytest.mark.guest

CONFIG = {
    "subsystem": {"serial": "EMUNSMGMT01", "model": "nvme-emu namespaces",
                  "capacity": "256MiB", "max_namespaces": 8},
    "namespaces": [{"nsid": 1, "size": "64MiB"}, {"nsid": 2, "size": "32MiB"}],
    "controllers": [{"cntlid": 1, "type": "io", "max_io_queues": 2, "namespaces": [1, 2]},
                    {"cntlid": 2, "type": "io", "namespaces": [1]}],
}
PATTERN = 0x5A5AA5A5

BODY = r"""
# Block device names follow probe order, not NSIDs: find a namespace's disk by its sysfs nsid.
dev_of() { for d in /sys/block/nvme0n*; do [ "$(cat $d/nsid 2>/dev/null)" = "$1" ] && echo /dev/${d##*/} && return 0; done; return 1; }
wait_ns() { _i=0; while ! dev_of $1 >/dev/null; do [ $_i -ge $(( $2 * 10 )) ] && return 1; sleep 0.1; _i=$((_i + 1)); done; }
gone_ns() { _i=0; while dev_of $1 >/dev/null; do [ $_i -ge $(( $2 * 10 )) ] && return 1; sleep 0.1; _i=$((_i + 1)); done; }
wait_ns 1 30 && pass ns1_bound || fail ns1_bound "no disk for namespace 1"
wait_ns 2 30 && pass ns2_bound || fail ns2_bound "no disk for namespace 2"
NS1=$(dev_of 1); NS2=$(dev_of 2); export NS1 NS2
echo 1 > /sys/module/nvme/parameters/sgl_threshold && pass sgl_on || fail sgl_on "sgl_threshold"
check fio_ns1 fio --name=a --filename=$NS1 --rw=randwrite --bs=64k --iodepth=8 \
    --ioengine=libaio --direct=1 --size=16m --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output-format=terse
check fio_ns2 fio --name=b --filename=$NS2 --rw=randwrite --bs=4k --iodepth=16 \
    --ioengine=libaio --direct=1 --size=4m --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --output-format=terse
capture list_ctrl nvme list-ctrl /dev/nvme0
capture create nvme create-ns /dev/nvme0 --nsze=16384 --ncap=16384 --flbas=0 --dps=0 --nmic=1
check attach nvme attach-ns /dev/nvme0 --namespace-id=3 --controllers=1
wait_ns 3 30 && pass ns3_appeared || fail ns3_appeared "no disk for namespace 3"
NS3=$(dev_of 3); export NS3
capture list_ns_all nvme list-ns /dev/nvme0 --all
capture list_ctrl_ns3 nvme list-ctrl /dev/nvme0 --namespace-id=3
check sanitize nvme sanitize /dev/nvme0 --sanact=3 --owpass=1 --ovrpat=0x5a5aa5a5
capture sanitize_log sh -c 'nvme sanitize-log /dev/nvme0 -o binary | od -An -v -tx1'
result pattern "$(dd if=$NS3 bs=512 count=1 iflag=direct 2>/dev/null | od -An -tx1 | head -1)"
check format nvme format $NS2 --namespace-id=2 --lbaf=1 --ses=1 --force
capture id_ns2 nvme id-ns /dev/nvme0 --namespace-id=2
i=0
while [ "$(cat /sys/block/${NS2#/dev/}/queue/logical_block_size)" != 4096 ] && [ $i -lt 100 ]; do
    sleep 0.1; i=$((i + 1))
done
dd if=/dev/urandom of=/tmp/b bs=4096 count=2 2>/dev/null
result b_md5 "$(md5sum < /tmp/b | cut -d' ' -f1)"
check ns2_4k_write nvme io-passthru $NS2 --opcode=0x01 --namespace-id=2 --data-len=8192 \
    --cdw10=6 --cdw12=1 --write --input-file=/tmp/b
result ns2_4k_md5 "$(nvme io-passthru $NS2 --opcode=0x02 --namespace-id=2 --data-len=8192 \
    --cdw10=6 --cdw12=1 --read --raw-binary | md5sum | cut -d' ' -f1)"
result ns2_lbs "$(cat /sys/block/${NS2#/dev/}/queue/logical_block_size)"
dd if=/dev/urandom of=/tmp/a bs=4096 count=8 2>/dev/null
result a_md5 "$(md5sum < /tmp/a | cut -d' ' -f1)"
check write_ns3 dd if=/tmp/a of=$NS3 bs=4096 count=8 oflag=direct
check write_ns1 dd if=/tmp/a of=$NS1 bs=4096 count=8 seek=1 oflag=direct
check wuc nvme write-uncor $NS3 --namespace-id=3 --start-block=8 --block-count=3
check read_fails sh -c '! dd if=$NS3 of=/dev/null bs=512 skip=9 count=1 iflag=direct'
check verify_fails sh -c '! nvme verify $NS3 --namespace-id=3 --start-block=0 --block-count=15'
capture gls_11 sh -c 'nvme get-lba-status $NS3 --namespace-id=3 --action=0x11 --max-dw=1023 \
    -o binary | od -An -v -tx1'
capture gls_text nvme get-lba-status $NS3 --namespace-id=3 --action=0x11 --max-dw=1023
capture lba_status_log sh -c 'nvme lba-status-log /dev/nvme0 -o binary | od -An -v -tx1'
check heal dd if=/tmp/a of=$NS3 bs=512 count=4 seek=8 skip=8 oflag=direct
check read_heals dd if=$NS3 of=/dev/null bs=512 skip=8 count=4 iflag=direct
check wuc_kept nvme write-uncor $NS3 --namespace-id=3 --start-block=200 --block-count=1
head -c 4096 /tmp/a > /tmp/a4k
head -c 4096 /dev/zero > /tmp/z4k
check compare nvme compare $NS3 --namespace-id=3 --start-block=0 --block-count=7 \
    --data-size=4096 --data=/tmp/a4k
check compare_differs sh -c '! nvme compare $NS3 --namespace-id=3 --start-block=0 \
    --block-count=7 --data-size=4096 --data=/tmp/z4k'
check verify nvme verify $NS3 --namespace-id=3 --start-block=0 --block-count=63
check copy nvme copy $NS3 --namespace-id=3 --sdlba=1000 --slbs=0,16 --blocks=7,7
check copy_xns nvme copy $NS3 --namespace-id=3 --sdlba=2000 --slbs=8 --blocks=63 \
    --snsids=1 --format=2
result copy_md5 "$(dd if=$NS3 bs=512 skip=1000 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
result copy_want "$( (head -c 4096 /tmp/a; dd if=/tmp/a bs=4096 skip=2 count=1 2>/dev/null) | md5sum | cut -d' ' -f1)"
result copy_xns_md5 "$(dd if=$NS3 bs=512 skip=2000 count=64 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
capture create4 nvme create-ns /dev/nvme0 --nsze=2048 --ncap=2048 --flbas=1 --dps=0 --nmic=0
check attach4 nvme attach-ns /dev/nvme0 --namespace-id=4 --controllers=1
wait_ns 4 30 && pass ns4_appeared || fail ns4_appeared "no disk for namespace 4"
check detach4 nvme detach-ns /dev/nvme0 --namespace-id=4 --controllers=1
gone_ns 4 30 && pass ns4_gone || fail ns4_gone "the disk of namespace 4 is still there"
check delete4 nvme delete-ns /dev/nvme0 --namespace-id=4
capture list_ns_all_end nvme list-ns /dev/nvme0 --all
result ns3_md5 "$(dd if=$NS3 bs=4096 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
result ready_for_aen 1
wait_ns 4 120 && pass aen_ns4_appeared || fail aen_ns4_appeared "no disk for namespace 4 after the notice"
"""


def raw(dump: str) -> bytes:
    return bytes(int(x, 16) for x in dump.split())


def listed(text: str) -> list[int]:
    return [int(x, 16) for x in re.findall(r"\[\s*\d+\]:\s*0x([0-9a-fA-F]+)", text)]


def host_on(socket: str) -> NvmeHost:
    h = NvmeHost(VfioUserTransport(VfioUserClient(socket), HostMemory(16 << 20)))
    h.init()
    return h


def test_guest_nvme_cli_namespace_management(boot_guest, emulator, guest_workdir):
    emu = emulator(CONFIG, name="emu")
    sock1, sock2 = (str(s) for s in emu.sockets)
    assert sock1.endswith("ctrl1.sock") and sock2.endswith("ctrl2.sock")
    g = boot_guest(BODY, vfio_user=[sock1], wait=False, name="guest")
    g.wait_for("RESULT", "ready_for_aen", timeout=600)
    h2 = host_on(sock2)  # another host, on another controller of the subsystem
    try:
        c = h2.ns_create(2048)
        assert c.ok and c.dw0 == 4, c
        assert h2.ns_attach(4, [1]).ok  # the guest's controller gets the notice
    finally:
        h2.close()
    res = g.wait(timeout=300)
    print(res.summary())
    assert res.ok, res.summary()
    for step in ("ns1_bound", "ns2_bound", "sgl_on", "fio_ns1", "fio_ns2", "attach", "ns3_appeared",
                 "sanitize", "format", "ns2_4k_write", "write_ns3", "write_ns1", "wuc", "read_fails", "verify_fails",
                 "heal", "read_heals", "wuc_kept", "compare", "compare_differs", "verify", "copy",
                 "copy_xns", "attach4", "ns4_appeared", "detach4", "ns4_gone", "delete4",
                 "aen_ns4_appeared"):
        assert step in res.passed, (step, res.summary())
    out, rc = res.outputs, res.output_rc
    assert rc["list_ctrl"] == 0 and listed(out["list_ctrl"]) == [1, 2], out["list_ctrl"]
    assert "nsid:3" in out["create"].replace(" ", ""), out["create"]
    assert listed(out["list_ns_all"]) == [1, 2, 3], out["list_ns_all"]
    assert listed(out["list_ctrl_ns3"]) == [1], out["list_ctrl_ns3"]
    sprog, sstat, scdw10 = struct.unpack_from("<HHI", raw(out["sanitize_log"]))
    assert (sprog, sstat & 0x7, (sstat >> 3) & 0x1F, scdw10 & 0x7) == (0xFFFF, 1, 1, 3)
    assert raw(res.results["pattern"])[:4] == struct.pack("<I", PATTERN)
    assert re.search(r"flbas\s*:\s*0x1\b", out["id_ns2"]), out["id_ns2"]  # the emulator's side
    assert re.search(r"lbaf\s+1\s*:.*lbads:12.*in use", out["id_ns2"]), out["id_ns2"]
    # two 4 KiB LBAs (NLB 1) hold exactly the 8 KiB written: the new format, end to end
    assert res.results["ns2_4k_md5"] == res.results["b_md5"]
    assert res.results["ns2_lbs"] == "4096"  # the kernel rescanned the formatted namespace
    gls = raw(out["gls_11"])
    nlsd, cmpc = struct.unpack_from("<IB", gls)
    assert (nlsd, cmpc, struct.unpack_from("<QI", gls, 8)) == (1, 2, (8, 3)), out["gls_text"]
    log = raw(out["lba_status_log"])
    assert struct.unpack_from("<III", log) == (48, 1, 4)  # LSLPLEN, NLSLNE, ESTULB
    assert struct.unpack_from("<IIB", log, 16) == (3, 1, 0x11)
    assert struct.unpack_from("<QI", log, 32) == (8, 4)
    assert res.results["copy_md5"] == res.results["copy_want"]
    assert res.results["copy_xns_md5"] == res.results["a_md5"]
    assert res.results["ns3_md5"] == res.results["a_md5"]
    assert listed(out["list_ns_all_end"]) == [1, 2, 3], out["list_ns_all_end"]
    assert emu.stop() == 0
    log_text = emu.log_path.read_text()
    assert "the host uses SGLs" in log_text
    state = guest_workdir / "emu"
    assert (state / "namespaces.json").exists()
    # The emulator restarts: the created namespace, its data, its mark, the new format.
    emu2 = emulator(CONFIG, name="emu")
    h = host_on(str(emu2.sockets[0]))
    try:
        assert struct.unpack_from("<4I", h.identify(cns=0x10)) == (1, 2, 3, 4)
        assert h.identify(cns=0, nsid=2)[26] == 1  # FLBAS: 4 KiB
        ns3 = h.identify(cns=0, nsid=3)
        assert struct.unpack_from("<Q", ns3)[0] == 16384
        import hashlib
        assert hashlib.md5(h.read(3, 0, 64).data).hexdigest() == res.results["a_md5"]
        c = h.read(3, 200, 1)
        assert (c.sct, c.sc) == (SCT.MEDIA, MediaError.UNRECOVERED_READ_ERROR)
        assert h.read(3, 199, 1).ok
    finally:
        h.close()
