"""The pytest plugin seen from the outside: pytester runs test files that use it.

Each inner run is a separate ``pytest`` process with the plugin loaded by
``-p emulator.pytest_plugin`` (the same name as its pytest11 entry point, so an
installed package does not load it twice)."""
from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from emulator.guest.env import cache_dir

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "emulator.pytest_plugin"

pytestmark = pytest.mark.slow


def test_the_plugin_is_registered_through_the_pytest11_entry_point() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    eps = project["project"]["entry-points"]["pytest11"]
    assert eps == {PLUGIN: PLUGIN}
    import emulator.pytest_plugin as mod
    for hook in ("pytest_addoption", "nvme_emu", "nvme_guest", "nvme_emu_env"):
        assert hasattr(mod, hook), hook
    # an installed copy of this version declares the same entry point
    installed = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.value == PLUGIN]
    assert all(ep.name == PLUGIN for ep in installed)


EMU_ALONE = '''
import json

CONFIG = {"namespaces": [{"nsid": 1, "size": "8MiB", "lba_size": 512}],
          "controllers": [{"cntlid": 1, "type": "io"}, {"cntlid": 2, "type": "io"}]}


def test_host_driver_reads_back_what_it_wrote(nvme_emu):
    emu = nvme_emu(CONFIG)
    assert [s.name for s in emu.sockets] == ["ctrl1.sock", "ctrl2.sock"]
    assert all(s.exists() for s in emu.sockets) and emu.state_dir.is_dir()
    host = emu.host(2)
    assert host.write(1, 8, b"\\x5a" * 1024).ok
    assert host.read(1, 8, 2).data == b"\\x5a" * 1024
    with emu.control() as c:
        status = c.call("status")
    assert [x["enabled"] for x in status["controllers"]] == [False, True]
    assert status["capacity"]["allocated"] == 4096


def test_a_failure_shows_the_emulator_log(nvme_emu):
    nvme_emu(name="failing")
    assert False, "on purpose"
'''


@pytest.fixture(autouse=True)
def real_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """pytester gives the inner run its own HOME: keep the real nvme-emu cache (C builds)."""
    monkeypatch.setenv("NVME_EMU_CACHE", str(cache_dir()))


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", PLUGIN, "-p", "no:cacheprovider", "-rsfE", *args,
                                         timeout=600)


def test_nvme_emu_alone_with_the_host_driver(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_emu_alone=EMU_ALONE)
    result = _run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    # the failing test's report carries the emulator's log tail and the kept work dir
    assert "nvme-emu log tail: failing" in out and "listening on" in out
    assert "nvme-emu work dir (kept)" in out


def test_keep_option_keeps_work_dirs_of_passing_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_keep='''
def test_one(nvme_emu):
    emu = nvme_emu()
    (emu.state_dir / "marker").write_text("here")
''')
    result = _run(pytester, "--nvme-emu-keep")
    result.assert_outcomes(passed=1)
    lines = result.stdout.lines
    i = next(n for n, line in enumerate(lines) if "nvme-emu work directories kept" in line)
    kept = Path(lines[i + 1].strip())
    try:
        assert (kept / "emu" / "marker").read_text() == "here"
        assert (kept / "emu.log").is_file()
    finally:
        import shutil
        shutil.rmtree(kept, ignore_errors=True)


GUEST_FILE = '''
def test_needs_a_guest(nvme_emu, nvme_guest):
    emu = nvme_emu()
    nvme_guest(["nvme list"], on=[emu])
'''


@pytest.mark.parametrize("ci", ["", "true"])
def test_a_missing_tool_box_skips_outside_ci_and_fails_under_ci(pytester: pytest.Pytester,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path, ci: str) -> None:
    monkeypatch.setenv("NVME_EMU_CACHE", str(tmp_path / "empty-cache"))
    if ci:
        monkeypatch.setenv("CI", ci)
    else:
        monkeypatch.delenv("CI", raising=False)
    pytester.makepyfile(test_guest_needed=GUEST_FILE)
    result = _run(pytester)
    out = result.stdout.str()
    if ci:
        result.assert_outcomes(errors=1)
        assert "CI=true and the nvme-emu guest tool box is missing" in out
    else:
        result.assert_outcomes(skipped=1)
        assert "run `bash scripts/guest-env`" in out
