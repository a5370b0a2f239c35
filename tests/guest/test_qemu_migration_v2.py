"""What QEMU 11.1's vfio-user client does with a server that offers migration v2
(docs/vfio-user-migration.md, "QEMU 11.1").

nvme-emu's VERSION reply carries ``migration`` (QEMU proposes it) and the device
answers DEVICE_FEATURE MIGRATION with STOP_COPY | PRE_COPY.  One short boot: the
guest binds the disk and writes, then QMP ``migrate`` to a file.  Pinned: QEMU
never sends DEVICE_FEATURE (nor MIG_DATA_*), neither while attaching nor when asked
to migrate, and the migration *completes*: no blocker, the device's state (queues,
in-flight commands, the pages it dirtied) silently left behind."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from emulator.guest.qmp import Qmp

pytestmark = pytest.mark.guest

BODY = r"""
wait_dev /dev/nvme0n1 60 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
check dd_write dd if=/dev/urandom of=/dev/nvme0n1 bs=4096 count=64 oflag=direct
pass wrote
sleep 600
"""


def test_qemu_11_1_never_sends_device_feature(boot_guest, emulator, guest_workdir: Path) -> None:  # type: ignore[no-untyped-def]
    e = emulator({"namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512}],
                  "controllers": [{"cntlid": 1, "socket": "ctrl1.sock", "type": "io"}]}, name="emu")
    g = boot_guest(BODY, vfio_user=[e.sockets[0]], wait=False, qmp=True, name="guest")
    g.wait_for("PASS", "wrote", timeout=300)
    outcome: dict[str, Any] = {}
    with Qmp(g.qmp_socket, timeout=60) as q:
        try:
            q.execute("migrate", {"uri": f"file:{guest_workdir / 'vm.mig'}"})
        except Exception as ex:  # a migration blocker answers the command with an error
            outcome["error"] = str(ex)
        deadline = time.monotonic() + 300
        while "error" not in outcome and time.monotonic() < deadline:
            info = q.execute("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                outcome.update(status=info["status"], detail=info.get("error-desc"))
                break
            time.sleep(0.5)
    g.kill()
    log = e.log_path.read_text()
    print("QEMU 11.1 migrate outcome:", outcome)
    print("device feature lines:", [ln for ln in log.splitlines() if "DEVICE_FEATURE" in ln])
    assert "DEVICE_FEATURE" not in log and "MIG_DATA" not in log
    assert outcome == {"status": "completed", "detail": None}, outcome
