"""NVM subsystem configuration: YAML -> frozen dataclasses.

Schema (every key but ``nsid``, ``size`` and ``cntlid`` has a default)::

    state_dir: ./state        # relative to the YAML file's directory
    control_socket: control.sock  # JSON-RPC control socket, relative to state_dir (mode 0600)
    subsystem: {nqn: ..., serial: ..., model: ..., firmware: "0.1",
                capacity: 4GiB,       # TNVMCAP; default: the namespaces' total size
                max_namespaces: 16}   # NN and MNAN; default: the largest nsid
    namespaces:
      - nsid: 1               # 1..1024, unique
        file: ns1.img         # relative to state_dir (no escaping it with ..) or absolute;
                              # default ns<nsid>.img; not a symlink; never shrunk
        size: 1GiB            # bytes, or a string with a unit (see parse_size); at most
                              # 2^63-1 and 2^33 TLBAAG granules (a 1 GiB bitmap)
        lba_size: 512         # 512 or 4096
        tlbaag: 8             # power of two; default 4 KiB / lba_size
        shared_storage: false # true: the file is shared with the migration peer (no user data
                              # in a vfio-user migration stream)
    controllers:
      - cntlid: 1             # 1..0xFFEF, unique
        socket: ctrl1.sock    # relative to state_dir; default ctrl<cntlid>.sock
        type: io              # io (migratable) | mmc (Migration Management Controller)
        namespaces: [1]       # default: all for io, none for mmc
        max_io_queues: 16     # 1..255
        mqes: 1023            # CAP.MQES, 0's based, 1..65535
        mdts: 5               # 2^mdts * 4 KiB, 1..10
        msix_vectors: 64      # 1..2048
        doorbell_buffer: true # Doorbell Buffer Config; default: off on io controllers
                              # of a subsystem with an mmc, on otherwise
        sq_poll_idle_us: 1000 # with shadow doorbells: poll busy SQs' shadow tails until
                              # this long without a new command; 0: off; default: 1000
                              # where the poll turns run in C, else 0 (docs/doorbells.md)

Defaults chosen here: ``state_dir`` absent -> the default state directory
(``$NVME_EMU_STATE_DIR``, else ``$XDG_STATE_HOME/nvme-emu``, else
``~/.local/state/nvme-emu``); ``tlbaag`` absent -> ``max(1, 4096 // lba_size)``
so that one tracked granule is 4 KiB, the TP4165 recommendation (TLBAAG x LBA
size >= 4 KiB).  Unknown keys, YAML duplicate keys and wrong types are errors:
a typo must not pass silently.  Every error is a :class:`ConfigError` whose
message starts with the key path, e.g. ``controllers[1].cntlid: duplicate
value 1``.
"""
from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from emulator.nvme.config import (
    CONTROLLER_TYPES, ControllerConfig, NamespaceConfig, SubsystemInfo, default, default_tlbaag,
)

# Identify Controller SN / MN / FR are ASCII fields of 20 / 40 / 8 bytes
# (NVMe Base, Identify Controller data structure); an NQN is at most 223
# bytes of UTF-8 (NVMe Base §4.7 "NVMe Qualified Names").
SERIAL_MAX, MODEL_MAX, FIRMWARE_MAX, NQN_MAX = 20, 40, 8, 223
NSID_MAX = 1024
CNTLID_MAX = 0xFFEF  # FFF0h-FFFFh are reserved controller IDs
LBA_SIZES = (512, 4096)
UNIX_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
OFF_MAX = (1 << 63) - 1  # the largest file offset (off_t) the backing file can reach
BITMAP_MAX = 1 << 30  # bytes of TLBAAG allocation bitmap one namespace may need (kept in memory)

_NQN_RE = re.compile(r"nqn\.\d{4}-\d{2}\.[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*(:.+)?")
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")
_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _p in enumerate("kmgt", start=1):
    # K/KiB binary, KB decimal (IEC 80000-13).
    _SIZE_UNITS[_p] = _SIZE_UNITS[_p + "ib"] = 1024 ** _i
    _SIZE_UNITS[_p + "b"] = 1000 ** _i


class ConfigError(ValueError):
    """A configuration problem; ``str()`` is ``"<key path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# -- result types (SubsystemInfo, NamespaceConfig, ControllerConfig: emulator/nvme/config.py)
@dataclass(frozen=True)
class SubsystemConfig:
    state_dir: Path
    subsystem: SubsystemInfo
    namespaces: tuple[NamespaceConfig, ...]
    controllers: tuple[ControllerConfig, ...]
    control_socket: Path | None = None  # None: <state_dir>/control.sock

    @property
    def control_path(self) -> Path:
        return self.control_socket or self.state_dir / "control.sock"

    def namespace(self, nsid: int) -> NamespaceConfig:
        for ns in self.namespaces:
            if ns.nsid == nsid:
                return ns
        raise KeyError(nsid)

    def controller(self, cntlid: int) -> ControllerConfig:
        for ctrl in self.controllers:
            if ctrl.cntlid == cntlid:
                return ctrl
        raise KeyError(cntlid)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (absolute paths, sizes in bytes); ``parse_config`` reads it back."""
        return {
            "state_dir": str(self.state_dir),
            "control_socket": str(self.control_path),
            "subsystem": {"nqn": self.subsystem.nqn, "serial": self.subsystem.serial,
                          "model": self.subsystem.model, "firmware": self.subsystem.firmware,
                          **({"capacity": self.subsystem.capacity} if self.subsystem.capacity else {}),
                          **({"max_namespaces": self.subsystem.max_namespaces}
                             if self.subsystem.max_namespaces else {})},
            "namespaces": [{"nsid": ns.nsid, "file": str(ns.file), "size": ns.size,
                            "lba_size": ns.lba_size, "tlbaag": ns.tlbaag, "shared_storage": ns.shared_storage}
                           for ns in self.namespaces],
            "controllers": [{"cntlid": c.cntlid, "socket": str(c.socket), "type": c.type,
                             "namespaces": list(c.namespaces), "max_io_queues": c.max_io_queues,
                             "mqes": c.mqes, "mdts": c.mdts, "msix_vectors": c.msix_vectors,
                             **({} if c.sq_poll_idle_us is None
                                else {"sq_poll_idle_us": c.sq_poll_idle_us}),
                             **({} if c.doorbell_buffer is None
                                else {"doorbell_buffer": c.doorbell_buffer})}
                            for c in self.controllers],
        }


# -- entry points ------------------------------------------------------------------
def default_state_dir() -> Path:
    env = os.environ.get("NVME_EMU_STATE_DIR")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return (base / "nvme-emu").absolute()


def default_config(state_dir: Path | None = None) -> SubsystemConfig:
    """The embedded default: one 1 GiB namespace behind one io controller."""
    state = Path(state_dir).expanduser().absolute() if state_dir is not None else default_state_dir()
    data = {
        "state_dir": str(state),
        "namespaces": [{"nsid": 1, "file": "ns1.img", "size": "1GiB"}],
        "controllers": [{"cntlid": 1, "socket": "ctrl1.sock", "type": "io"}],
    }
    return parse_config(data, state)


def load_config(path: str | os.PathLike[str]) -> SubsystemConfig:
    """Read and validate a YAML file; relative ``state_dir`` is taken from its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), f"cannot read: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), f"invalid YAML{where}: {problem}") from exc
    return parse_config({} if data is None else data, path.absolute().parent)


def parse_config(data: Any, base_dir: str | os.PathLike[str]) -> SubsystemConfig:
    """Validate already-parsed YAML; ``base_dir`` anchors a relative ``state_dir``."""
    top = _mapping(data, "(top level)")
    _check_keys(top, "", ("state_dir", "control_socket", "subsystem", "namespaces", "controllers"))
    if "state_dir" in top:
        state_dir = _path(top["state_dir"], "state_dir", Path(base_dir).absolute(), contained=False)
    else:
        state_dir = default_state_dir()
    subsystem = _subsystem(top.get("subsystem", {}), "subsystem")

    namespaces: list[NamespaceConfig] = []
    for i, item in enumerate(_list(top.get("namespaces", []), "namespaces")):
        ns = _namespace(item, f"namespaces[{i}]", state_dir)
        _unique(ns.nsid, [n.nsid for n in namespaces], f"namespaces[{i}].nsid")
        _unique(ns.file, [n.file for n in namespaces], f"namespaces[{i}].file")
        namespaces.append(ns)

    if "controllers" not in top:
        raise ConfigError("controllers", "required key missing")
    items = _list(top["controllers"], "controllers")
    if not items:
        raise ConfigError("controllers", "must list at least one controller")
    nsids = tuple(ns.nsid for ns in namespaces)
    controllers: list[ControllerConfig] = []
    for i, item in enumerate(items):
        ctrl = _controller(item, f"controllers[{i}]", state_dir, nsids)
        _unique(ctrl.cntlid, [c.cntlid for c in controllers], f"controllers[{i}].cntlid")
        _unique(ctrl.socket, [c.socket for c in controllers], f"controllers[{i}].socket")
        controllers.append(ctrl)
    total = sum(ns.size for ns in namespaces)
    if subsystem.capacity and subsystem.capacity < total:
        raise ConfigError("subsystem.capacity", f"{subsystem.capacity} is less than the namespaces' "
                          f"total size {total}")
    top_nsid = max((ns.nsid for ns in namespaces), default=0)
    if subsystem.max_namespaces and subsystem.max_namespaces < top_nsid:
        raise ConfigError("subsystem.max_namespaces", f"{subsystem.max_namespaces} is less than "
                          f"nsid {top_nsid}")
    control = _path(top.get("control_socket", "control.sock"), "control_socket", state_dir)
    if len(os.fsencode(control)) > UNIX_PATH_MAX:
        raise ConfigError("control_socket", f"{control} is too long for a unix socket")
    _unique(control, [c.socket for c in controllers], "control_socket")
    return SubsystemConfig(state_dir, subsystem, tuple(namespaces), tuple(controllers), control)


# -- sections ---------------------------------------------------------------------
def _subsystem(value: Any, path: str) -> SubsystemInfo:
    m = _mapping(value, path)
    _check_keys(m, path, ("nqn", "serial", "model", "firmware", "capacity", "max_namespaces"))
    nqn = _str(m.get("nqn", default(SubsystemInfo, "nqn")), f"{path}.nqn")
    if len(nqn.encode()) > NQN_MAX:
        raise ConfigError(f"{path}.nqn", f"longer than {NQN_MAX} bytes")
    if not _NQN_RE.fullmatch(nqn):
        raise ConfigError(f"{path}.nqn", f"{nqn!r} is not an NQN (nqn.yyyy-mm.reverse.domain:name)")
    return SubsystemInfo(
        nqn=nqn,
        serial=_ascii(m.get("serial", default(SubsystemInfo, "serial")), f"{path}.serial", SERIAL_MAX),
        model=_ascii(m.get("model", default(SubsystemInfo, "model")), f"{path}.model", MODEL_MAX),
        firmware=_ascii(m.get("firmware", default(SubsystemInfo, "firmware")), f"{path}.firmware",
                        FIRMWARE_MAX),
        capacity=parse_size(m.get("capacity", default(SubsystemInfo, "capacity")), f"{path}.capacity"),
        max_namespaces=_int(m.get("max_namespaces", default(SubsystemInfo, "max_namespaces")),
                            f"{path}.max_namespaces", 0, NSID_MAX),
    )


def _namespace(value: Any, path: str, state_dir: Path) -> NamespaceConfig:
    m = _mapping(value, path)
    _check_keys(m, path, ("nsid", "file", "size", "lba_size", "tlbaag", "shared_storage"))
    nsid = _int(_required(m, "nsid", path), f"{path}.nsid", 1, NSID_MAX)
    file = _path(m.get("file", f"ns{nsid}.img"), f"{path}.file", state_dir)
    lba_size = _int(m.get("lba_size", default(NamespaceConfig, "lba_size")), f"{path}.lba_size",
                    1, 1 << 32)
    if lba_size not in LBA_SIZES:
        raise ConfigError(f"{path}.lba_size", f"must be one of {', '.join(map(str, LBA_SIZES))}, not {lba_size}")
    size = parse_size(_required(m, "size", path), f"{path}.size")
    if size == 0:
        raise ConfigError(f"{path}.size", "must be greater than 0")
    if size % lba_size:
        raise ConfigError(f"{path}.size", f"must be a multiple of lba_size ({lba_size})")
    if size > OFF_MAX:
        raise ConfigError(f"{path}.size", f"{size} bytes is past the largest file size ({OFF_MAX})")
    tlbaag = _int(m.get("tlbaag", default_tlbaag(lba_size)), f"{path}.tlbaag", 1, 1 << 31)
    if tlbaag & (tlbaag - 1):
        raise ConfigError(f"{path}.tlbaag", f"must be a power of two, not {tlbaag}")
    granules = -(-(size // lba_size) // tlbaag)
    if (granules + 63) // 64 * 8 > BITMAP_MAX:
        raise ConfigError(f"{path}.size", f"{size} bytes at tlbaag {tlbaag} needs {granules} allocation granules, "
                          f"more than {BITMAP_MAX * 8} (a {BITMAP_MAX >> 20} MiB bitmap): raise tlbaag")
    shared = m.get("shared_storage", default(NamespaceConfig, "shared_storage"))
    if not isinstance(shared, bool):
        raise ConfigError(f"{path}.shared_storage", f"must be true or false, not {shared!r}")
    return NamespaceConfig(nsid, file, size, lba_size, tlbaag, shared_storage=shared)


def _controller(value: Any, path: str, state_dir: Path, nsids: tuple[int, ...]) -> ControllerConfig:
    m = _mapping(value, path)
    _check_keys(m, path, ("cntlid", "socket", "type", "namespaces", "max_io_queues", "mqes", "mdts",
                          "msix_vectors", "doorbell_buffer", "sq_poll_idle_us"))
    cntlid = _int(_required(m, "cntlid", path), f"{path}.cntlid", 1, CNTLID_MAX)
    socket = _path(m.get("socket", f"ctrl{cntlid}.sock"), f"{path}.socket", state_dir)
    if len(os.fsencode(socket)) > UNIX_PATH_MAX:
        raise ConfigError(f"{path}.socket", f"{socket} is too long for a unix socket "
                          f"({len(os.fsencode(socket))} > {UNIX_PATH_MAX} bytes)")
    ctype = _str(m.get("type", default(ControllerConfig, "type")), f"{path}.type")
    if ctype not in CONTROLLER_TYPES:
        raise ConfigError(f"{path}.type", f"must be io or mmc, not {ctype!r}")
    attached: list[int] = []
    if "namespaces" in m:
        for j, item in enumerate(_list(m["namespaces"], f"{path}.namespaces")):
            nsid = _int(item, f"{path}.namespaces[{j}]", 1, NSID_MAX)
            if nsid not in nsids:
                raise ConfigError(f"{path}.namespaces", f"unknown nsid {nsid}")
            _unique(nsid, attached, f"{path}.namespaces[{j}]")
            attached.append(nsid)
    elif ctype == "io":
        attached = list(nsids)
    if ctype == "io" and not attached:
        raise ConfigError(f"{path}.namespaces", "an io controller needs at least one namespace")
    return ControllerConfig(
        cntlid=cntlid, socket=socket, type=ctype, namespaces=tuple(attached),
        # 255 I/O queue pairs + admin fill BAR0's 4 KiB doorbell page (DSTRD 0).
        max_io_queues=_int(_get(m, "max_io_queues"), f"{path}.max_io_queues", 1, 255),
        mqes=_int(_get(m, "mqes"), f"{path}.mqes", 1, 0xFFFF),
        mdts=_int(_get(m, "mdts"), f"{path}.mdts", 1, 10),
        msix_vectors=_int(_get(m, "msix_vectors"), f"{path}.msix_vectors", 1, 2048),
        doorbell_buffer=_opt_bool(_get(m, "doorbell_buffer"), f"{path}.doorbell_buffer"),
        sq_poll_idle_us=_opt_int(_get(m, "sq_poll_idle_us"), f"{path}.sq_poll_idle_us", 0, 1_000_000),
    )


# -- value checks -----------------------------------------------------------------
def parse_size(value: Any, path: str) -> int:
    """Bytes from an int or a string such as ``"1GiB"``, ``"512 M"``, ``"1.5GiB"``, ``"4096"``.

    Units are case-insensitive: B; K, M, G, T and KiB..TiB are powers of 1024;
    KB..TB powers of 1000.  The result must be a whole number of bytes.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(path, "must not be negative")
        return value
    if not isinstance(value, str):
        raise ConfigError(path, f"expected bytes or a string like '1GiB', got {_kind(value)}")
    m = _SIZE_RE.fullmatch(value.strip())
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _SIZE_UNITS:
        raise ConfigError(path, f"{value!r} is not a size (use e.g. 1GiB, 512MiB, 4096)")
    size = Fraction(m.group(1)) * _SIZE_UNITS[unit]
    if size.denominator != 1:
        raise ConfigError(path, f"{value!r} is not a whole number of bytes")
    return int(size)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a mapping"}
    name = names.get(type(value), type(value).__name__)
    if isinstance(value, (bool, int, float, str)):
        text = repr(value)
        name += f" ({text if len(text) <= 40 else text[:37] + '...'})"
    return name


def _mapping(value: Any, path: str) -> dict[Any, Any]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"expected a mapping, got {_kind(value)}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(path, f"expected a list, got {_kind(value)}")
    return value


def _check_keys(m: dict[Any, Any], path: str, allowed: tuple[str, ...]) -> None:
    for key in m:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f" (known: {', '.join(allowed)})"
            raise ConfigError(where, "unknown key" + hint)


def _get(m: dict[Any, Any], key: str) -> Any:
    """A controller key's value, or ControllerConfig's default for it."""
    return m.get(key, default(ControllerConfig, key))


def _required(m: dict[Any, Any], key: str, path: str) -> Any:
    if key not in m:
        raise ConfigError(f"{path}.{key}", "required key missing")
    return m[key]


def _int(value: Any, path: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(path, f"expected an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise ConfigError(path, f"must be in {lo}..{hi}, not {value}")
    return value


def _opt_int(value: Any, path: str, lo: int, hi: int) -> int | None:
    return None if value is None else _int(value, path, lo, hi)


def _opt_bool(value: Any, path: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ConfigError(path, f"must be true or false, not {value!r}")


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        hint = " (quote it)" if isinstance(value, (int, float)) else ""
        raise ConfigError(path, f"expected a string, got {_kind(value)}{hint}")
    return value


def _ascii(value: Any, path: str, max_len: int) -> str:
    text = _str(value, path)
    if not text or len(text) > max_len or not all(" " <= ch <= "~" for ch in text):
        raise ConfigError(path, f"must be 1..{max_len} printable ASCII characters")
    return text


def _path(value: Any, path: str, base: Path, contained: bool = True) -> Path:
    """An absolute path as given, or one relative to ``base``; with ``contained``, ``..`` may not
    leave ``base`` (a namespace file or socket stays in the state directory unless given absolute)."""
    text = _str(value, path)
    if not text:
        raise ConfigError(path, "must not be empty")
    if "\0" in text:
        raise ConfigError(path, "must not contain a NUL character")
    p = Path(text).expanduser()
    if p.is_absolute():
        return Path(os.path.normpath(p))
    full = Path(os.path.normpath(base / p))
    if contained and os.path.commonpath([full, os.path.normpath(base)]) != os.path.normpath(base):
        raise ConfigError(path, f"{text!r} leaves {base} (use an absolute path to put it elsewhere)")
    return full


def _unique(value: Any, seen: list[Any], path: str) -> None:
    if value in seen:
        raise ConfigError(path, f"duplicate value {value}")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                continue  # complex keys: left to SafeLoader (and _check_keys)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)
