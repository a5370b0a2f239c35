"""nvme_guest's command runner without booting: /init body, names, and which phase hung."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from emulator.guest.commands import PhaseFailed, PhaseTimeout, body, normalize, run_commands
from emulator.guest.qemu import GuestFailed, GuestResult, GuestTimeout, _Parser


def test_commands_get_names_and_are_quoted_for_sh_c() -> None:
    assert normalize("nvme list") == [("cmd1", "nvme list")]
    assert normalize(["a", "b 'c'"]) == [("cmd1", "a"), ("cmd2", "b 'c'")]
    assert normalize({"smart": "nvme smart-log /dev/nvme0"}) == [("smart", "nvme smart-log /dev/nvme0")]
    with pytest.raises(ValueError):
        normalize({"two words": "true"})
    text = body(normalize(["echo 'a b' | wc -w"]), controllers=2, namespaces=1)
    assert "_want_c=2; _want_n=1" in text
    line = [x for x in text.splitlines() if x.startswith("capture cmd1 ")][0]
    assert shlex.split(line)[1:] == ["cmd1", "sh", "-c", "echo 'a b' | wc -w"]


class FakeGuest:
    """Prints the markers of each phase on request; hangs (or exits) at ``stop``."""

    def __init__(self, stop: tuple[str, str] | None, exits: bool = False) -> None:
        self.result = GuestResult(console_log=Path("/dev/null"))
        self._parser = _Parser(self.result)
        self.stop = stop
        self.exits = exits

    def wait_for(self, kind: str, name: str, timeout: float) -> GuestResult:
        if (kind, name) == self.stop:
            raise (GuestFailed if self.exits else GuestTimeout)("stuck", "console tail")
        lines = {"init_uptime_s": ["@@RESULT init_uptime_s=1.5"], "probe": ["@@RESULT probe=ok"]}.get(
            name, [f"@@BEGIN {name}", "output of " + name, f"@@END {name} rc=3"])
        for line in lines:
            self._parser.line(line)
        return self.result

    def wait(self, timeout: float, check: bool) -> GuestResult:
        self._parser.line("@@DONE")
        self.result.returncode = 0
        return self.result

    def error(self, cls: Any, message: str) -> Any:
        return cls(message)


PAIRS = normalize(["nvme list", "sleep 600", "true"])


@pytest.mark.parametrize("stop, phase", [
    (("RESULT", "init_uptime_s"), "boot"),
    (("RESULT", "probe"), "probe"),
    (("END", "cmd1"), "command 1 (nvme list)"),
    (("END", "cmd2"), "command 2 (sleep 600)"),
])
def test_a_timeout_names_the_phase_that_hung(stop: tuple[str, str], phase: str) -> None:
    with pytest.raises(PhaseTimeout) as ei:
        run_commands(FakeGuest(stop), PAIRS, command_timeout=7)  # type: ignore[arg-type]
    assert ei.value.phase.startswith(phase)
    assert f"guest phase {phase} did not finish within" in str(ei.value)
    assert "console tail" in str(ei.value)


def test_qemu_exiting_early_names_the_phase() -> None:
    with pytest.raises(PhaseFailed) as ei:
        run_commands(FakeGuest(("END", "cmd1"), exits=True), PAIRS)  # type: ignore[arg-type]
    assert ei.value.phase == "command 1 (nvme list)"


def test_every_command_gets_its_rc_and_output() -> None:
    run = run_commands(FakeGuest(None), PAIRS)  # type: ignore[arg-type]
    assert [c.rc for c in run] == [3, 3, 3] and run[1].output == "output of cmd2"
    assert run["cmd3"].command == "true" and run.probe == "ok" and not run.ok


def _fake_env(tmp_path: Path) -> Any:
    from emulator.guest.env import GuestEnv
    return GuestEnv(cache_dir=tmp_path, root=tmp_path, qemu_argv=["qemu-system-x86_64"], qemu_img_argv=[],
                    qemu_env={}, qemu_data_dirs=[], kernel=tmp_path / "toolbox-vmlinuz",
                    loader=tmp_path / "ld.so", library_dirs=[], tools={})


def test_nvme_guest_on_chosen_controllers_with_my_kernel_and_initramfs(nvme_emu, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from emulator.guest.initramfs import build_initramfs
    from emulator.guest.qemu import qemu_command
    from emulator.pytest_plugin import GuestBooter, _Registry
    emu = nvme_emu({"namespaces": [{"nsid": 1, "size": "8MiB"}, {"nsid": 2, "size": "8MiB"}],
                    "controllers": [{"cntlid": 1, "namespaces": [1]}, {"cntlid": 2, "namespaces": [1, 2]},
                                    {"cntlid": 3, "type": "mmc"}]})
    booter = GuestBooter(_fake_env(tmp_path), tmp_path, _Registry())
    spec, pairs, emus = booter.spec_for({"ls": "ls /dev"}, on=[emu.select(1, 3)],
                                        kernel=tmp_path / "my-bzImage", initramfs=tmp_path / "my.cpio")
    assert [Path(d.socket).name for d in spec.vfio_user] == ["ctrl1.sock", "ctrl3.sock"]
    assert "_want_c=2; _want_n=1" in spec.init and pairs == [("ls", "ls /dev")] and emus == [emu]
    spec_all, _, _ = booter.spec_for("true", on=emu)
    assert len(spec_all.vfio_user) == 3 and "_want_c=3; _want_n=2" in spec_all.init
    argv = qemu_command(_fake_env(tmp_path), spec, tmp_path / "initrd")
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "my-bzImage")
    (tmp_path / "my.cpio").write_bytes(b"USER-ARCHIVE")
    out = build_initramfs(_fake_env(tmp_path), "#!/bin/busybox sh\n", tmp_path / "initrd", base=spec.initramfs)
    assert out.read_bytes().startswith(b"USER-ARCHIVE")   # the run's /init is appended to it
