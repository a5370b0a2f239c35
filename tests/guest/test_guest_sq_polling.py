"""A Linux guest on a controller that polls shadow SQ tails (emulator/nvme/sqpoll.py):
fio with verification at queue depth 1 (the guest rarely rings: nearly every command is
found by polling), 32 and 128 KiB x 4, with idle pauses in between (re-arming, then the
next submission rings)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.guest

CONFIG = {
    "subsystem": {"serial": "EMUPOLL0001", "model": "nvme-emu polling"},
    "namespaces": [{"nsid": 1, "size": "256MiB", "lba_size": 512}],
    "controllers": [{"cntlid": 1, "type": "io", "max_io_queues": 2, "sq_poll_idle_us": 2000}],
}

BODY = r"""
wait_dev /dev/nvme0n1 30 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
V="--ioengine=libaio --direct=1 --verify=crc32c --do_verify=1 --verify_fatal=1 --output-format=terse"
check fio_qd1 fio --name=qd1 --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --iodepth=1 \
    --offset=0 --size=4m $V
sleep 1
check fio_qd32 fio --name=qd32 --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --iodepth=32 \
    --offset=64m --size=8m $V
sleep 1
check fio_128k fio --name=s128k --filename=/dev/nvme0n1 --rw=write --bs=128k --iodepth=4 \
    --offset=128m --size=16m $V
"""


def test_fio_verify_with_sq_polling(nvme_guest, nvme_emu):
    emu = nvme_emu(CONFIG, name="emu")
    res = nvme_guest.boot(BODY, vfio_user=[emu.sockets[0]], timeout=400, name="poll")
    assert res.ok, res.summary()
    for step in ("fio_qd1", "fio_qd32", "fio_128k"):
        assert step in res.passed, step
    assert "polling shadow SQ tails" in emu.log_path.read_text()
