"""The pytest plugin's ``nvme_guest`` seen from the outside: pytester runs the README's
example test file (it boots one guest on the emulator and checks `nvme smart-log`)."""
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
