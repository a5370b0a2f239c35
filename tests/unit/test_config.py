"""The YAML subsystem configuration loader."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from emulator.nvme.config import ControllerConfig, NamespaceConfig, SubsystemInfo
from emulator.subsystem.config import (ConfigError, SubsystemConfig, default_config, default_state_dir,
                                       load_config, parse_config, parse_size)

FULL = """\
state_dir: ./state
subsystem: {nqn: "nqn.2026-11.io.nvme-emu:subsys0", serial: NVMEEMU0001, model: nvme-emu, firmware: "0.1"}
namespaces:
  - nsid: 1
    file: ns1.img
    size: 1GiB
    lba_size: 512
    tlbaag: 8
  - nsid: 2
    file: /abs/ns2.img
    size: 64MiB
    lba_size: 4096
controllers:
  - cntlid: 1
    socket: ctrl1.sock
    type: io
    namespaces: [1]
    max_io_queues: 16
    mqes: 1023
    mdts: 5
    msix_vectors: 64
  - cntlid: 2
    type: io
  - cntlid: 0xFFEF
    socket: mmc.sock
    type: mmc
"""


def base() -> dict[str, Any]:
    return {
        "state_dir": "state",
        "namespaces": [{"nsid": 1, "size": "1MiB"}],
        "controllers": [{"cntlid": 1}],
    }


def error_of(data: Any, base_dir: Path = Path("/cfg")) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, base_dir)
    return str(exc.value)


# -- good configs -------------------------------------------------------------------
def test_full_file(tmp_path: Path) -> None:
    path = tmp_path / "subsys.yaml"
    path.write_text(FULL)
    cfg = load_config(path)
    state = tmp_path / "state"
    assert cfg.state_dir == state
    assert cfg.subsystem.nqn == "nqn.2026-11.io.nvme-emu:subsys0"
    assert (cfg.subsystem.serial, cfg.subsystem.model, cfg.subsystem.firmware) == ("NVMEEMU0001", "nvme-emu", "0.1")
    ns1, ns2 = cfg.namespaces
    assert (ns1.nsid, ns1.file, ns1.size, ns1.lba_size, ns1.tlbaag) == (1, state / "ns1.img", 1 << 30, 512, 8)
    assert ns1.nlbas == (1 << 30) // 512
    assert (ns2.file, ns2.size, ns2.lba_size, ns2.tlbaag) == (Path("/abs/ns2.img"), 64 << 20, 4096, 1)
    c1, c2, mmc = cfg.controllers
    assert (c1.cntlid, c1.socket, c1.type, c1.namespaces) == (1, state / "ctrl1.sock", "io", (1,))
    assert (c1.max_io_queues, c1.mqes, c1.mdts, c1.msix_vectors) == (16, 1023, 5, 64)
    assert (c2.socket, c2.namespaces) == (state / "ctrl2.sock", (1, 2))  # io default: all
    assert (mmc.cntlid, mmc.is_mmc, mmc.namespaces) == (0xFFEF, True, ())  # mmc default: none
    assert cfg.controller(2) is c2 and cfg.namespace(2) is ns2
    with pytest.raises(KeyError):
        cfg.namespace(3)
    with pytest.raises(KeyError):
        cfg.controller(3)


def test_frozen_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "subsys.yaml"
    path.write_text(FULL)
    cfg = load_config(path)
    with pytest.raises(AttributeError):
        cfg.controllers[0].cntlid = 5  # type: ignore[misc]
    printed = yaml.safe_dump(cfg.to_dict())
    assert parse_config(yaml.safe_load(printed), Path("/elsewhere")) == cfg


def test_state_dir_paths(tmp_path: Path) -> None:
    data = base()
    data["state_dir"] = "/var/lib/nvme-emu"
    data["namespaces"][0]["file"] = "disks/a.img"
    cfg = parse_config(data, tmp_path)
    assert cfg.state_dir == Path("/var/lib/nvme-emu")
    assert cfg.namespaces[0].file == Path("/var/lib/nvme-emu/disks/a.img")
    data["state_dir"] = "../s"
    assert parse_config(data, Path("/a/b")).state_dir == Path("/a/s")


def test_state_dir_absent_uses_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NVME_EMU_STATE_DIR", str(tmp_path / "st"))
    data = base()
    del data["state_dir"]
    assert parse_config(data, Path("/cfg")).state_dir == tmp_path / "st"


def test_minimal_defaults() -> None:
    cfg = parse_config(base(), Path("/cfg"))
    ns, = cfg.namespaces
    ctrl, = cfg.controllers
    assert (ns.file, ns.lba_size, ns.tlbaag) == (Path("/cfg/state/ns1.img"), 512, 8)
    assert (ctrl.socket, ctrl.type, ctrl.namespaces) == (Path("/cfg/state/ctrl1.sock"), "io", (1,))
    assert cfg.subsystem.firmware == "0.1"


def test_parsed_defaults_are_the_models_defaults() -> None:
    """One model: what the loader fills in for absent keys is what the classes
    the controller and the namespace take state as their defaults."""
    cfg = parse_config(base(), Path("/cfg"))
    ns, = cfg.namespaces
    ctrl, = cfg.controllers
    assert ns == NamespaceConfig(1, ns.file, ns.size)
    assert ctrl == ControllerConfig(1, namespaces=(1,), socket=ctrl.socket)
    assert cfg.subsystem == SubsystemInfo()


def test_doorbell_buffer_round_trip() -> None:
    data = base()
    data["controllers"][0]["doorbell_buffer"] = False
    cfg = parse_config(data, Path("/cfg"))
    assert cfg.controllers[0].doorbell_buffer is False
    assert parse_config(cfg.to_dict(), Path("/x")) == cfg
    assert parse_config(base(), Path("/cfg")).controllers[0].doorbell_buffer is None  # the default


def test_sq_poll_idle_us_round_trip() -> None:
    data = base()
    data["controllers"][0]["sq_poll_idle_us"] = 1500
    cfg = parse_config(data, Path("/cfg"))
    assert cfg.controllers[0].sq_poll_idle_us == 1500
    assert parse_config(cfg.to_dict(), Path("/x")) == cfg
    assert parse_config(base(), Path("/cfg")).controllers[0].sq_poll_idle_us is None  # auto (sqpoll.idle_us)


def test_mmc_only_subsystem() -> None:
    cfg = parse_config({"state_dir": "/s", "controllers": [{"cntlid": 1, "type": "mmc"}]}, Path("/"))
    assert cfg.namespaces == () and cfg.controllers[0].namespaces == ()


def test_empty_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    with pytest.raises(ConfigError, match=r"^controllers: required key missing"):
        load_config(path)


# -- the default -------------------------------------------------------------------
def test_default_config_explicit_dir(tmp_path: Path) -> None:
    cfg = default_config(tmp_path)
    assert isinstance(cfg, SubsystemConfig)
    assert cfg.state_dir == tmp_path
    ns, = cfg.namespaces
    assert (ns.nsid, ns.size, ns.lba_size, ns.file) == (1, 1 << 30, 512, tmp_path / "ns1.img")
    ctrl, = cfg.controllers
    assert (ctrl.cntlid, ctrl.type, ctrl.socket, ctrl.namespaces) == (1, "io", tmp_path / "ctrl1.sock", (1,))


def test_default_state_dir_sources(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NVME_EMU_STATE_DIR", str(tmp_path / "env"))
    assert default_config().state_dir == tmp_path / "env"
    monkeypatch.delenv("NVME_EMU_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_dir() == tmp_path / "xdg" / "nvme-emu"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir() == tmp_path / "home" / ".local" / "state" / "nvme-emu"


# -- sizes --------------------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    (4096, 4096), ("4096", 4096), ("1GiB", 1 << 30), ("1G", 1 << 30), ("1 gib", 1 << 30),
    ("512MiB", 512 << 20), ("2T", 2 << 40), ("1.5GiB", 3 << 29), ("1GB", 10 ** 9), ("8KiB", 8192),
    ("100B", 100),
])
def test_parse_size(text: Any, expected: int) -> None:
    assert parse_size(text, "x") == expected


@pytest.mark.parametrize("text,reason", [
    ("1 GiBs", "is not a size"), ("lots", "is not a size"), ("0.3B", "whole number"),
    (1.5, "got a number"), (True, "got a boolean"), (-1, "negative"),
])
def test_parse_size_errors(text: Any, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_size(text, "namespaces[0].size")


# -- errors: each names the key path and the reason ---------------------------------------
def mutate(path: str, value: Any) -> dict[str, Any]:
    """base() with one key set; path like 'namespaces.0.size'; value DELETE removes it."""
    data = copy.deepcopy(base())
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return data


DELETE = object()


@pytest.mark.parametrize("path,value,message", [
    ("namespaces.0.size", "1000", "namespaces[0].size: must be a multiple of lba_size (512)"),
    ("namespaces.0.size", 0, "namespaces[0].size: must be greater than 0"),
    ("namespaces.0.size", DELETE, "namespaces[0].size: required key missing"),
    ("namespaces.0.nsid", 0, "namespaces[0].nsid: must be in 1..1024, not 0"),
    ("namespaces.0.nsid", 1025, "namespaces[0].nsid: must be in 1..1024, not 1025"),
    ("namespaces.0.nsid", "1", "namespaces[0].nsid: expected an integer, got a string ('1')"),
    ("namespaces.0.nsid", True, "namespaces[0].nsid: expected an integer, got a boolean (True)"),
    ("namespaces.0.lba_size", 1024, "namespaces[0].lba_size: must be one of 512, 4096, not 1024"),
    ("namespaces.0.tlbaag", 6, "namespaces[0].tlbaag: must be a power of two, not 6"),
    ("namespaces.0.tlbaag", 0, "namespaces[0].tlbaag: must be in 1..2147483648, not 0"),
    ("namespaces.0.file", "", "namespaces[0].file: must not be empty"),
    ("namespaces.0.file", 5, "namespaces[0].file: expected a string, got an integer (5) (quote it)"),
    ("namespaces.0.blocks", 5, "namespaces[0].blocks: unknown key"),
    ("namespaces.0.lba_sise", 512, "namespaces[0].lba_sise: unknown key (did you mean lba_size?)"),
    ("namespaces.0", "ns1", "namespaces[0]: expected a mapping, got a string ('ns1')"),
    ("namespaces", {"nsid": 1}, "namespaces: expected a list, got a mapping"),
    ("controllers.0.cntlid", 0, "controllers[0].cntlid: must be in 1..65519, not 0"),
    ("controllers.0.cntlid", 0xFFF0, "controllers[0].cntlid: must be in 1..65519, not 65520"),
    ("controllers.0.cntlid", DELETE, "controllers[0].cntlid: required key missing"),
    ("controllers.0.type", "admin", "controllers[0].type: must be io or mmc, not 'admin'"),
    ("controllers.0.namespaces", [7], "controllers[0].namespaces: unknown nsid 7"),
    ("controllers.0.namespaces", [1, 1], "controllers[0].namespaces[1]: duplicate value 1"),
    ("controllers.0.namespaces", [], "controllers[0].namespaces: an io controller needs at least one namespace"),
    ("controllers.0.namespaces", 1, "controllers[0].namespaces: expected a list, got an integer (1)"),
    ("controllers.0.max_io_queues", 256, "controllers[0].max_io_queues: must be in 1..255, not 256"),
    ("controllers.0.max_io_queues", 0, "controllers[0].max_io_queues: must be in 1..255, not 0"),
    ("controllers.0.mqes", 0, "controllers[0].mqes: must be in 1..65535, not 0"),
    ("controllers.0.mqes", 65536, "controllers[0].mqes: must be in 1..65535, not 65536"),
    ("controllers.0.mdts", 0, "controllers[0].mdts: must be in 1..10, not 0"),
    ("controllers.0.mdts", 11, "controllers[0].mdts: must be in 1..10, not 11"),
    ("controllers.0.msix_vectors", 2049, "controllers[0].msix_vectors: must be in 1..2048, not 2049"),
    ("controllers.0.doorbell_buffer", "yes", "controllers[0].doorbell_buffer: must be true or false, not 'yes'"),
    ("controllers.0.sq_poll_idle_us", -1, "controllers[0].sq_poll_idle_us: must be in 0..1000000, not -1"),
    ("controllers.0.sq_poll_idle_us", "1ms", "controllers[0].sq_poll_idle_us: expected an integer, got a string"),
    ("controllers.0.msix_vector", 8, "controllers[0].msix_vector: unknown key (did you mean msix_vectors?)"),
    ("controllers.0.socket", "x" * 120, "controllers[0].socket: /cfg/state/" + "x" * 120 + " is too long"),
    ("controllers", [], "controllers: must list at least one controller"),
    ("controllers", DELETE, "controllers: required key missing"),
    ("subsystem.nqn", "subsys0", "subsystem.nqn: 'subsys0' is not an NQN"),
    ("subsystem.nqn", "nqn.2026-11.io.x:" + "y" * 220, "subsystem.nqn: longer than 223 bytes"),
    ("subsystem.serial", "S" * 21, "subsystem.serial: must be 1..20 printable ASCII characters"),
    ("subsystem.model", "m\u00fcnchen", "subsystem.model: must be 1..40 printable ASCII characters"),
    ("subsystem.firmware", 0.1, "subsystem.firmware: expected a string, got a number (0.1) (quote it)"),
    ("subsystem.firmware", "123456789", "subsystem.firmware: must be 1..8 printable ASCII characters"),
    ("subsystem.vendor", "x", "subsystem.vendor: unknown key"),
    ("subsystem.capacity", "512KiB", "subsystem.capacity: 524288 is less than the namespaces' total size"),
    ("subsystem.capacity", "lots", "subsystem.capacity: 'lots' is not a size"),
    ("subsystem.max_namespaces", 1025, "subsystem.max_namespaces: must be in 0..1024, not 1025"),
    ("subsystem", ["x"], "subsystem: expected a mapping, got a list"),
    ("state_dir", 3, "state_dir: expected a string, got an integer (3) (quote it)"),
    ("statedir", "x", "statedir: unknown key (did you mean state_dir?)"),
])
def test_errors(path: str, value: Any, message: str) -> None:
    assert error_of(mutate(path, value)).startswith(message)


def test_duplicates() -> None:
    data = base()
    data["namespaces"].append({"nsid": 1, "size": 4096, "file": "other.img"})
    assert error_of(data) == "namespaces[1].nsid: duplicate value 1"
    data["namespaces"][1] = {"nsid": 2, "size": 4096, "file": "ns1.img"}
    assert error_of(data) == "namespaces[1].file: duplicate value /cfg/state/ns1.img"
    data = base()
    data["controllers"].append({"cntlid": 1, "socket": "b.sock"})
    assert error_of(data) == "controllers[1].cntlid: duplicate value 1"
    data["controllers"][1] = {"cntlid": 2, "socket": "ctrl1.sock"}
    assert error_of(data) == "controllers[1].socket: duplicate value /cfg/state/ctrl1.sock"


def test_top_level_not_a_mapping() -> None:
    assert error_of(["a"]) == "(top level): expected a mapping, got a list"


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read"):
        load_config(missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("controllers: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("controllers:\n  - cntlid: 1\n    mdts: 3\n    mdts: 4\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 4, column 5: duplicate key .mdts.$"):
        load_config(dup)


def test_error_is_value_error_with_parts() -> None:
    with pytest.raises(ValueError) as exc:
        parse_config(mutate("controllers.0.mdts", 0), Path("/"))
    err = exc.value
    assert isinstance(err, ConfigError)
    assert (err.path, err.reason) == ("controllers[0].mdts", "must be in 1..10, not 0")


def test_capacity_and_max_namespaces() -> None:
    data = base()
    data["subsystem"] = {"capacity": "1GiB", "max_namespaces": 8}
    data["namespaces"].append({"nsid": 5, "size": "1MiB"})
    cfg = parse_config(data, Path("/cfg"))
    assert (cfg.subsystem.capacity, cfg.subsystem.max_namespaces) == (1 << 30, 8)
    assert parse_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict())), Path("/x")) == cfg
    data["subsystem"]["max_namespaces"] = 4
    assert error_of(data).startswith("subsystem.max_namespaces: 4 is less than nsid 5")
