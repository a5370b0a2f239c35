"""The guest-test library without booting anything: cpio, ELF, markers, emulator process, scenarios."""
from __future__ import annotations

import gzip
import json
import shlex
import stat
import sys
from pathlib import Path

import pytest

from emulator.guest.emuproc import EmulatorError, EmulatorProcess
from emulator.guest.env import GuestEnv, GuestEnvMissing
from emulator.guest.initramfs import CpioWriter, RootTree, elf_deps, read_cpio, run_archive, wrap_init
from emulator.guest.qemu import GuestResult, _Parser, format_command, tail
from emulator.guest.scenario import load_scenario, parse_size

REPO = Path(__file__).resolve().parents[2]


def test_cpio_newc_roundtrip() -> None:
    import io
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.add_parents("a/b/file")
    w.add_file("a/b/file", b"hello", 0o755)
    w.add_symlink("a/link", "b/file")
    w.add_chardev("dev/console", 5, 1)
    w.finish()
    data = buf.getvalue()
    assert len(data) % 512 == 0
    entries = read_cpio(data)
    assert entries["a/b/file"] == (stat.S_IFREG | 0o755, b"hello")
    assert entries["a/link"][1] == b"b/file" and stat.S_ISLNK(entries["a/link"][0])
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert stat.S_ISDIR(entries["a"][0]) and stat.S_ISDIR(entries["a/b"][0])


def test_run_archive_holds_init_and_extra_files(tmp_path: Path) -> None:
    extra = tmp_path / "tool.sh"
    extra.write_text("echo hi\n")
    extra.chmod(0o750)
    entries = read_cpio(gzip.decompress(run_archive("#!/bin/sh\n", {"/etc/x.conf": "k=v", "/opt/tool.sh": extra})))
    assert entries["init"] == (stat.S_IFREG | 0o755, b"#!/bin/sh\n")
    assert entries["etc/x.conf"][1] == b"k=v"
    assert entries["opt/tool.sh"][0] == stat.S_IFREG | 0o750


def test_wrap_init_mounts_prints_done_and_powers_off() -> None:
    init = wrap_init("check x true")
    assert init.startswith("#!/bin/busybox sh\n")
    assert "mount -t devtmpfs" in init and "check x true" in init
    assert init.rstrip().endswith("finish")
    assert 'echo "@@DONE"' in init and "poweroff -f" in init
    # a bare newline comes before the first marker (the firmware may leave its last line open)
    assert init.index("\n/bin/busybox echo\n") < init.index("result init_uptime_s")


def test_elf_deps_of_the_host_python() -> None:
    deps = elf_deps(Path(sys.executable).resolve())
    assert deps is not None
    assert deps.interp and deps.interp.endswith("ld-linux-x86-64.so.2")
    assert elf_deps(Path(__file__)) is None


def test_root_tree_reproduces_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/bin/tool").write_text("x")
    (root / "usr/bin/alias").symlink_to("tool")
    tree = RootTree(root)
    assert tree.add("/bin/alias") == "/usr/bin/tool"
    assert tree.entries["/bin"] == ("symlink", "usr/bin")
    assert tree.entries["/usr/bin/alias"] == ("symlink", "tool")
    assert tree.entries["/usr/bin/tool"][0] == "file"


def test_marker_parser() -> None:
    r = GuestResult(console_log=Path("/dev/null"))
    p = _Parser(r)
    for line in ["[    1.0] kernel noise", "@@RESULT iops=5123", "@@PASS boot", "@@FAIL io short read at 42",
                 "@@BEGIN list", "line one", "@@RESULT inside=1", "line two", "@@END list rc=3",
                 "  @@PASS indented", "echo @@PASS not-a-marker", "@@DONE"]:
        p.line(line)
    assert r.results == {"iops": "5123", "inside": "1"}
    assert r.passed == ["boot", "indented"]
    assert r.failed == {"io": "short read at 42"}
    assert r.outputs["list"] == "line one\nline two" and r.output_rc["list"] == 3
    assert r.done and not r.ok


def test_format_command_is_shell_equivalent() -> None:
    argv = ["/x/ld.so", "--library-path", "/a:/b", "/x/qemu", "-m", "512M",
            "-device", '{"driver":"vfio-user-pci","socket":{"path":"/s p","type":"unix"}}', "-no-reboot"]
    text = format_command(argv, {"QEMU_MODULE_DIR": "/m"})
    assert text.startswith("QEMU_MODULE_DIR=/m ")
    assert shlex.split(text.replace("\\\n", " "))[1:] == argv


def test_tail(tmp_path: Path) -> None:
    f = tmp_path / "log"
    f.write_bytes(b"".join(b"line %d\r\n" % i for i in range(100)))
    assert tail(f, 3) == "line 97\nline 98\nline 99"
    assert tail(tmp_path / "missing") == ""


def test_guest_env_missing_says_what_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVME_EMU_CACHE", str(tmp_path))
    with pytest.raises(GuestEnvMissing, match="run scripts/guest-env"):
        GuestEnv.load()
    (tmp_path / "guest-env.json").write_text(json.dumps({"cache_dir": str(tmp_path)}))
    with pytest.raises(GuestEnvMissing, match="run scripts/guest-env"):
        GuestEnv.load()


def _fake_config(tmp_path: Path, n: int) -> Path:
    cfg = tmp_path / "emu.yaml"
    cfg.write_text(json.dumps({"state_dir": "state", "controllers": [
        {"cntlid": i + 1, "socket": f"c{i + 1}.sock", "type": "io"} for i in range(n)]}))
    return cfg


def test_emulator_process_contract(tmp_path: Path, fake_emulator_cmd: list[str]) -> None:
    p = EmulatorProcess(_fake_config(tmp_path, 2), tmp_path / "emu.log", command=fake_emulator_cmd)
    assert p.expect == 2
    socks = p.start(timeout=30)
    assert socks == [tmp_path / "state/c1.sock", tmp_path / "state/c2.sock"]
    assert all(s.exists() for s in socks) and p.running
    assert p.stop() == 0
    log = p.log_path.read_text()
    assert "listening on" in log and "fake emulator: stopped" in log


def test_emulator_process_that_exits_early(tmp_path: Path, fake_emulator_cmd: list[str]) -> None:
    p = EmulatorProcess(_fake_config(tmp_path, 1), tmp_path / "emu.log", command=fake_emulator_cmd,
                        env={"FAKE_EMU_EXIT": "3"})
    with pytest.raises(EmulatorError, match="exited with status 3") as ei:
        p.start(timeout=30)
    assert "failing as asked" in str(ei.value)


def test_emulator_process_that_never_listens(tmp_path: Path, fake_emulator_cmd: list[str]) -> None:
    p = EmulatorProcess(_fake_config(tmp_path, 1), tmp_path / "emu.log", command=fake_emulator_cmd,
                        env={"FAKE_EMU_SILENT": "1"})
    with pytest.raises(EmulatorError, match="printed 0 of 1 'listening on' lines"):
        p.start(timeout=2)
    assert not p.running


def test_parse_size() -> None:
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("64M") == 64 << 20
    assert parse_size("512") == 512
    assert parse_size(4096) == 4096
    with pytest.raises(ValueError):
        parse_size("lots")


def test_the_three_scenarios_resolve(tmp_path: Path) -> None:
    single = load_scenario(REPO / "qemu-configs/single-disk.yaml", tmp_path / "s")
    assert [e.name for e in single.emulators] == ["disk"]
    assert single.guests[0].spec.vfio_user[0].socket == tmp_path / "s/disk/ctrl1.sock"

    mmc = load_scenario(REPO / "qemu-configs/mmc-and-migratable.yaml", tmp_path / "m")
    types = {c["type"] for c in mmc.emulators[0].config["controllers"]}
    assert types == {"io", "mmc"} and len(mmc.guests[0].spec.vfio_user) == 2

    two = load_scenario(REPO / "qemu-configs/two-instances.yaml", tmp_path / "t")
    assert [e.name for e in two.emulators] == ["source", "destination"]
    assert two.emulators[0].sockets[1] != two.emulators[1].sockets[1]
    dest = two.guests[1]
    assert dest.spec.incoming == f"unix:{tmp_path / 't'}/migration.sock" and dest.qmp
    ns_file = two.emulators[1].config["namespaces"][0]["file"]
    assert (two.emulators[1].state_dir / ns_file).resolve() == (two.emulators[0].state_dir / "ns1.img").resolve()


def test_two_namespaces_scenario_resolves(tmp_path: Path) -> None:
    from emulator.subsystem.config import parse_config
    sc = load_scenario(REPO / "qemu-configs/two-namespaces.yaml", tmp_path / "n")
    cfg = parse_config(sc.emulators[0].config, tmp_path)
    assert [ns.nsid for ns in cfg.namespaces] == [1, 2] and cfg.controllers[0].namespaces == (1, 2)
    assert (cfg.subsystem.capacity, cfg.subsystem.max_namespaces) == (1 << 30, 8)
def test_the_live_migration_scenario_resolves(tmp_path: Path) -> None:
    sc = load_scenario(REPO / "qemu-configs/live-migration.yaml", tmp_path / "l")
    assert sc.migrate == ["a", "b", "a", "b"] and [e.name for e in sc.emulators] == ["a", "b"]
    init = sc.guests[0].spec.init
    assert "fio --name=lm" in init and "--verify=crc32c" in init and "STOPFIO1" in init
    for e in sc.emulators:  # each MMC reaches namespace 1 (the MMH copies through it)
        assert [c["namespaces"] for c in e.config["controllers"] if c["type"] == "mmc"] == [[1]]
    assert sc.emulators[0].state_dir / "ns1.img" != sc.emulators[1].state_dir / "ns1.img"
