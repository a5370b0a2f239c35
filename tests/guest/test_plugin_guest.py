"""The pytest plugin's ``nvme_guest``: pytester runs the README's example test file (it
boots one guest on the emulator and checks `nvme smart-log`); a command that hangs
kills QEMU with an error naming its phase; the management socket of an emulator that
serves a QEMU guest names QEMU as its client and counts the guest's commands."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from emulator.guest.env import GuestEnv

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "emulator.pytest_plugin"

pytestmark = pytest.mark.guest


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(r"<!-- pytest-plugin-example -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README lost its pytest plugin example"
    return m.group(1)


def test_readme_example_boots_a_guest_and_checks_smart_log(pytester: pytest.Pytester,
                                                           guest_env: GuestEnv,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    example = readme_example()
    assert 10 <= len(example.strip().splitlines()) <= 20
    pytester.makepyfile(test_smart_log=example)
    # pytester gives the inner run its own HOME: point it at the provisioned tool box
    monkeypatch.setenv("NVME_EMU_CACHE", str(guest_env.cache_dir))
    result = pytester.runpytest_subprocess("-p", PLUGIN, "-p", "no:cacheprovider", "-rA", timeout=900)
    print(result.stdout.str()[-3000:])
    result.assert_outcomes(passed=1)


def test_a_hanging_command_kills_qemu_and_names_its_phase(nvme_guest) -> None:  # type: ignore[no-untyped-def]
    from emulator.guest.commands import PhaseTimeout
    with pytest.raises(PhaseTimeout) as ei:
        nvme_guest(["true", "sleep 600"], command_timeout=5)
    assert ei.value.phase == "command 2 (sleep 600) did not finish within 5 s"
    assert "@@BEGIN cmd2" in str(ei.value)          # the console tail is in the message
    (guest,) = nvme_guest.reg.guests
    assert not guest.running and guest.result.output_rc == {"cmd1": 0}


def test_status_and_stats_of_an_emulator_serving_a_qemu_guest(nvme_emu, nvme_guest) -> None:  # type: ignore[no-untyped-def]
    emu = nvme_emu({"namespaces": [{"nsid": 1, "size": "64MiB"}], "controllers": [{"cntlid": 1}]})
    guest = nvme_guest.boot(r"""
wait_dev /dev/nvme0n1 30 && pass bound || fail bound "no /dev/nvme0n1"
check write dd if=/dev/zero of=/dev/nvme0n1 bs=4k count=16 oflag=direct
result ready 1
sleep 600
""", vfio_user=emu.sockets, wait=False)
    res = guest.wait_for("RESULT", "ready", timeout=300)
    assert "write" in res.passed, res.summary()
    with emu.control() as c:
        st = c.call("status")
        stats = c.call("stats")
    (ctrl,) = st["controllers"]
    assert ctrl["enabled"] and ctrl["ready"] and ctrl["client"]["pid"] == guest.pid   # QEMU
    assert len(ctrl["queues"]["sq"]) >= 2 and st["namespaces"][0]["allocated"] >= 64 << 10
    io = {o["name"]: o for o in stats["controllers"][0]["io"]["opcodes"]}
    assert io["write"]["bytes"] >= 64 << 10 and io["read"]["commands"] > 0   # the kernel's partition scan
    guest.kill()
