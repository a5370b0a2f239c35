"""The namespace registry: which namespaces exist, in which format, attached where.

The YAML describes the initial namespaces and attachments.  Once Namespace
Management, Namespace Attachment or Format NVM changed them, the subsystem's
state directory holds ``namespaces.json`` (written atomically after each
change), and it is what the next start uses: created namespaces, their
format and their attachments survive a restart.  Remove the file to start
from the YAML again (the backing files stay).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emulator.nvme.config import NamespaceConfig
from emulator.nvme.persist import atomic_write_json, read_json, reserve_spare

if TYPE_CHECKING:
    from emulator.subsystem.subsystem import Subsystem

log = logging.getLogger("nvme-emu.nsstore")
REGISTRY = "namespaces.json"
VERSION = 1


def registry_path(state_dir: Path) -> Path:
    return Path(state_dir) / REGISTRY


def save(sub: "Subsystem") -> None:
    if sub.state_dir is None:
        return
    doc: dict[str, Any] = {
        "version": VERSION,
        "namespaces": [{"nsid": ns.nsid, "file": str(ns.config.file), "size": ns.config.size,
                        "lba_size": ns.config.lba_size, "tlbaag": ns.config.tlbaag,
                        "shared": ns.config.shared}
                       for ns in sorted(sub.namespaces.values(), key=lambda n: n.nsid)],
        "attachments": {str(c): sorted(n for n in nsids if n in sub.namespaces)
                        for c, nsids in sorted(sub.attachments.items())},
    }
    atomic_write_json(registry_path(sub.state_dir), doc)


def load(state_dir: Path) -> tuple[list[NamespaceConfig], dict[int, list[int]]] | None:
    """The saved namespaces and attachments, or None when there is no (valid) registry."""
    path = registry_path(state_dir)
    doc = read_json(path)
    if doc is None:
        return None
    reserve_spare(path, path.stat().st_size)  # room for the next change even on a full file system
    try:
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r}")
        nss = [NamespaceConfig(int(d["nsid"]), Path(d["file"]), int(d["size"]), int(d["lba_size"]),
                               int(d["tlbaag"]), bool(d.get("shared", True)))
               for d in doc["namespaces"]]
        att = {int(c): [int(n) for n in v] for c, v in doc["attachments"].items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        log.error("%s unreadable (%s): starting from the configuration", path, e)
        return None
    return nss, att
