"""A guest runs programs from an ext4 file system on the disk while its page cache churns (issue 16).

Under TCG, QEMU drops translated code only for writes it sees.  The device fills
page-cache pages through its own mapping, so a page that held one program's
code and is refilled with another's could run stale code.  Debian's kernel zeroes
every page it allocates (init_on_alloc=1, a CPU store QEMU sees), which hides
that; with ``init_on_alloc=0`` nothing does, and only ``--visible-writes all``
(every device write as a vfio-user DMA_WRITE) keeps the runs right.  Measured
with ``init_on_alloc=0`` and ``--visible-writes off`` or ``boot``: 120 of 144 runs
died with SIGSEGV, every one after the first drop_caches (docs/boot.md).
"""
from __future__ import annotations

import sys

import pytest

from emulator.guest.diskimage import ext4_image
from emulator.guest.execdisk import build_tree, churn_script
from emulator.guest.qemu import GuestSpec, VfioUserDevice

pytestmark = pytest.mark.guest

ROUNDS, RUNS, FILL_MB = 6, 2, 256
BODY = r"""
wait_dev /dev/nvme0n1 30 && pass nvme_bound || fail nvme_bound "no /dev/nvme0n1"
mkdir -p /mnt && check mount mount -t ext4 -o ro /dev/nvme0n1 /mnt
"""


@pytest.mark.parametrize("mode,append", [("boot", ""), ("all", "init_on_alloc=0")],
                         ids=["default-kernel", "init_on_alloc=0-visible-writes-all"])
def test_programs_from_the_disk_under_page_cache_churn(boot_guest, emulator, boot_disk_env, guest_workdir,
                                                       mode, append):
    state = guest_workdir / "emu"
    state.mkdir()
    expected = build_tree(boot_disk_env, guest_workdir / "tree")
    ext4_image(boot_disk_env, state / "progs.img", guest_workdir / "tree", 64 << 20)
    emu = emulator({"state_dir": str(state),
                    "namespaces": [{"nsid": 1, "file": "progs.img", "size": 64 << 20}],
                    "controllers": [{"cntlid": 1, "type": "io", "max_io_queues": 2}]},
                   command=[sys.executable, "-m", "emulator", "serve", "--visible-writes", mode])
    spec = GuestSpec(init=BODY + churn_script("/mnt", expected, ROUNDS, RUNS, FILL_MB), append=append,
                     vfio_user=[VfioUserDevice(emu.sockets[0])])
    result = boot_guest(spec, timeout=900, name="churn")
    bad = {k: v for k, v in result.results.items() if k.startswith("bad_")}
    print(f"mode={mode} append={append!r}: {result.results.get('runs')} runs, {result.results.get('bad')} bad, "
          f"{result.results.get('seconds')} s")
    assert result.results.get("runs") == str(ROUNDS * RUNS * len(expected)), result.summary()
    assert result.results.get("bad") == "0", bad
