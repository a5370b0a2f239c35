"""Serialisable state of a PCI function (moved between processes on live migration).

Only function-level state lives here: the configuration space image, the MSI-X
table and pending bits and an undelivered INTx.  Which eventfds a client
assigned is connection state and is not saved; the NVMe controller behind
BAR0 saves its own state.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STATE_VERSION = 1


@dataclass
class PciFunctionState:
    config: bytes
    msix_table: bytes
    msix_pba: bytes
    intx_pending: bool = False
    version: int = STATE_VERSION

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: byte strings as lowercase hex."""
        return {
            "version": self.version,
            "config": self.config.hex(),
            "msix_table": self.msix_table.hex(),
            "msix_pba": self.msix_pba.hex(),
            "intx_pending": self.intx_pending,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PciFunctionState":
        """Inverse of :meth:`to_dict`; ValueError on a malformed dict."""
        try:
            version = int(data["version"])
            if version != STATE_VERSION:
                raise ValueError(f"unsupported PCI function state version {version}")
            return cls(
                config=bytes.fromhex(data["config"]),
                msix_table=bytes.fromhex(data["msix_table"]),
                msix_pba=bytes.fromhex(data["msix_pba"]),
                intx_pending=bool(data.get("intx_pending", False)),
                version=version,
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed PCI function state: {exc!r}") from exc
