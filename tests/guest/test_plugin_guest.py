"""The pytest plugin's ``nvme_guest``: pytester runs the README's example test file (it
boots one guest on the emulator and checks `nvme smart-log`), and a command that hangs
kills QEMU with an error naming its phase."""
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
