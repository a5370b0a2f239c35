"""A real Linux guest uses the emulator as its NVMe disk (issue 2)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.guest

CONFIG = {
    "subsystem": {"serial": "EMUDISK0001", "model": "nvme-emu guest disk"},
    "namespaces": [{"nsid": 1, "size": "1GiB", "lba_size": 512}],
    "controllers": [{"cntlid": 1, "type": "io", "max_io_queues": 4}],
}

FIRST_BOOT = r"""
wait_dev /dev/nvme0n1 30 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
capture nvme_list nvme list
capture id_ctrl nvme id-ctrl /dev/nvme0
capture id_ns nvme id-ns /dev/nvme0n1
capture get_feature nvme get-feature /dev/nvme0
capture smart_log nvme smart-log /dev/nvme0
capture error_log nvme error-log /dev/nvme0
capture fw_log nvme fw-log /dev/nvme0
capture effects_log nvme effects-log /dev/nvme0 --csi=0
capture nq nvme get-feature /dev/nvme0 -f 7 -H
capture wc nvme get-feature /dev/nvme0 -f 6 -H
check fio_4k_qd32 fio --name=r4k --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --iodepth=32 \
    --ioengine=libaio --direct=1 --offset=512m --size=16m --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --output-format=terse
check fio_128k_qd4 fio --name=r128k --filename=/dev/nvme0n1 --rw=randwrite --bs=128k --iodepth=4 \
    --ioengine=libaio --direct=1 --offset=768m --size=64m --verify=crc32c --do_verify=1 \
    --verify_fatal=1 --output-format=terse
check mkfs mkfs.ext4 -q -F -E nodiscard /dev/nvme0n1 256M
mkdir -p /mnt
check mount mount -t ext4 /dev/nvme0n1 /mnt
i=0
while [ $i -lt 20 ]; do
    dd if=/dev/urandom of=/mnt/file$i bs=64k count=$((i + 1)) 2>/dev/null
    i=$((i + 1))
done
mkdir -p /mnt/dir/sub && echo hello > /mnt/dir/sub/greeting
(cd /mnt && md5sum file* dir/sub/greeting > /mnt/MANIFEST)
result manifest "$(md5sum /mnt/MANIFEST | cut -d' ' -f1)"
check sync sync
check umount umount /mnt
check fsck e2fsck -f -n /dev/nvme0n1
result raw_md5 "$(dd if=/dev/nvme0n1 bs=1M skip=512 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
"""

SECOND_BOOT = r"""
wait_dev /dev/nvme0n1 30 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
check fsck e2fsck -f -n /dev/nvme0n1
mkdir -p /mnt
check mount mount -t ext4 -o ro /dev/nvme0n1 /mnt
check manifest_verify sh -c 'cd /mnt && md5sum -c MANIFEST'
result manifest "$(md5sum /mnt/MANIFEST | cut -d' ' -f1)"
umount /mnt
result raw_md5 "$(dd if=/dev/nvme0n1 bs=1M skip=512 count=16 2>/dev/null | md5sum | cut -d' ' -f1)"
"""


def test_guest_disk_end_to_end(nvme_guest, nvme_emu):
    emu = nvme_emu(CONFIG, name="emu")
    sock = emu.sockets[0]
    first = nvme_guest.boot(FIRST_BOOT, vfio_user=[sock], timeout=400, name="boot1")
    assert first.ok, first.summary()
    assert "EMUDISK0001" in first.outputs["nvme_list"]
    assert "nvme-emu guest disk" in first.outputs["id_ctrl"]
    assert "nsze" in first.outputs["id_ns"]
    for log in ("smart_log", "error_log", "fw_log", "effects_log", "nq", "wc"):
        assert first.output_rc[log] == 0, (log, first.outputs[log])
    assert "Number of IO Completion Queues Allocated" in first.outputs["nq"]
    assert "Volatile Write Cache Enable" in first.outputs["wc"]
    assert "Number of Queues" in first.outputs["get_feature"]
    for step in ("fio_4k_qd32", "fio_128k_qd4", "mkfs", "mount", "sync", "umount", "fsck"):
        assert step in first.passed, step
    # The guest powered off: the kernel shut the controller down (CC.SHN).
    emu.stop()
    assert "shutdown complete" in emu.log_path.read_text()
    # Emulator and guest restart: the data reads back identical.
    emu2 = nvme_emu(CONFIG, name="emu")
    second = nvme_guest.boot(SECOND_BOOT, vfio_user=[emu2.sockets[0]], timeout=300, name="boot2")
    assert second.ok, second.summary()
    assert second.results["manifest"] == first.results["manifest"]
    assert second.results["raw_md5"] == first.results["raw_md5"]
