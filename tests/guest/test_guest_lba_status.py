"""A Linux guest writes known ranges; `nvme get-lba-status --action=2` reports exactly their
granules (issue 4, TP4165).  The list is checked as raw bytes (`-o binary | od`), independent of
nvme-cli's print format (early versions printed DSLBA in decimal behind a "0x")."""
from __future__ import annotations

import pytest

from emulator.nvme.config import NamespaceConfig
from emulator.nvme.namespace import Namespace
from lba_status_helpers import CMPC_COMPLETE, CMPC_INCOMPLETE, parse

pytestmark = pytest.mark.guest

NSZE = (64 << 20) // 512  # 131072 LBAs of 512 bytes; TLBAAG 8 (4 KiB granules)
CONFIG = {
    "subsystem": {"serial": "EMULBAS0001", "model": "nvme-emu lba status"},
    "namespaces": [{"nsid": 1, "size": "64MiB", "lba_size": 512, "tlbaag": 8}],
    "controllers": [{"cntlid": 1, "type": "io"}],
}
GLS = "nvme get-lba-status /dev/nvme0n1 --namespace-id=1 --action=2"

BODY = rf"""
wait_dev /dev/nvme0n1 30 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
capture nvm_id_ns nvme nvm-id-ns /dev/nvme0n1 --namespace-id=1
capture nvm_id_ctrl nvme nvm-id-ctrl /dev/nvme0
capture before sh -c '{GLS} --max-dw=1023 -o binary | od -An -v -tx1'
w() {{ dd if=/dev/urandom of=/dev/nvme0n1 bs=512 seek=$1 count=$2 oflag=direct 2>&1; }}
check w_first_lba w 0 1
check w_across_granules w 1003 10
check w_one_mib w 65536 2048
check w_next_granule w 67584 1
check w_last_lba w {NSZE - 1} 1
check write_zeroes nvme write-zeroes /dev/nvme0n1 --namespace-id=1 --start-block=40000 --block-count=15
check dsm_deallocate nvme dsm /dev/nvme0n1 --namespace-id=1 --ad --slbs=66048 --blocks=1024
check zeroes_after_dsm sh -c '[ "$(dd if=/dev/nvme0n1 bs=512 skip=66048 count=1024 iflag=direct 2>/dev/null \
    | od -An -v -tx1 | tr -d " 0\n")" = "" ]'
capture all sh -c '{GLS} --max-dw=1023 -o binary | od -An -v -tx1'
capture all_text {GLS} --max-dw=1023
capture range sh -c '{GLS} --start-lba=1003 --range-len=100 --max-dw=1023 -o binary | od -An -v -tx1'
capture small sh -c '{GLS} --max-dw=5 -o binary | od -An -v -tx1'
capture next sh -c '{GLS} --start-lba=8 --max-dw=5 -o binary | od -An -v -tx1'
capture atype_11 {GLS.replace("--action=2", "--action=0x11")} --max-dw=1023
"""

WANT = [(0, 8), (1000, 16), (40000, 16), (65536, 512), (67072, 520), (NSZE - 8, 8)]


def raw(dump: str) -> bytes:
    return bytes(int(x, 16) for x in dump.split())


def field(text: str, name: str) -> int:
    (value,) = [line.split(":", 1)[1] for line in text.splitlines() if line.split(":")[0].strip() == name]
    return int(value.strip(), 0)


def test_guest_get_lba_status_reports_exactly_the_written_granules(nvme_guest, nvme_emu):
    emu = nvme_emu(CONFIG, name="emu")
    res = nvme_guest.boot(BODY, vfio_user=[emu.sockets[0]], timeout=300, name="guest")
    print(res.summary())
    print(res.outputs.get("all_text"))
    assert res.ok, res.summary()
    for step in ("w_first_lba", "w_across_granules", "w_one_mib", "w_next_granule", "w_last_lba",
                 "write_zeroes", "dsm_deallocate", "zeroes_after_dsm"):
        assert step in res.passed, step
    assert parse(raw(res.outputs["before"])) == (0, CMPC_COMPLETE, [])
    assert parse(raw(res.outputs["all"])) == (len(WANT), CMPC_COMPLETE, WANT)
    assert parse(raw(res.outputs["range"])) == (1, CMPC_COMPLETE, [(1003, 13)])
    # a buffer with room for one descriptor: the host continues from a later SLBA
    assert parse(raw(res.outputs["small"])) == (1, CMPC_INCOMPLETE, [(0, 8)])
    assert parse(raw(res.outputs["next"])) == (1, CMPC_INCOMPLETE, [(1000, 16)])
    # ATYPE 11h (OACS.GLSS = 1, issue 11): no Write Uncorrectable marks, so no descriptors
    assert res.output_rc["atype_11"] == 0, res.outputs["atype_11"]
    # TP4165 fields as nvme-cli 2.13 prints them: "tlbaag: 0x8", "aocs   : 1"
    assert field(res.outputs["nvm_id_ns"], "tlbaag") == 8
    assert field(res.outputs["nvm_id_ctrl"], "aocs") & 0x1  # RALBAS
    # the emulator's own bitmap agrees after the guest powered off and the emulator stopped
    assert emu.stop() == 0
    ns = Namespace(NamespaceConfig(1, emu.state_dir / "ns1.img", 64 << 20, 512, 8))
    try:
        runs = ns.allocation.runs(0, ns.allocation.granules)[0] * 8
        assert [(int(a), int(b - a)) for a, b in runs] == WANT
    finally:
        ns.close()
