"""Command tables are built per controller, explicitly; the host side loads no device code."""
from __future__ import annotations

import json
import subprocess
import sys

from emulator.nvme.config import ControllerConfig
from emulator.nvme.dispatch import command_tables
from emulator.nvme.migration import send
from emulator.nvme.spec import CNS, AdminOpcode

MMC_ONLY = (AdminOpcode.TRACK_SEND, AdminOpcode.TRACK_RECEIVE, AdminOpcode.MIGRATION_SEND,
            AdminOpcode.MIGRATION_RECEIVE, AdminOpcode.CONTROLLER_DATA_QUEUE)


def test_mmc_tables_hold_the_tp4159_commands() -> None:
    mmc = command_tables(ControllerConfig(2, type="mmc"))
    assert mmc.admin[AdminOpcode.MIGRATION_SEND] is send.migration_send  # 41h
    assert all(op in mmc.admin for op in MMC_ONLY)
    assert CNS.SUPPORTED_CTRL_STATE_FORMATS in mmc.cns


def test_io_controller_tables_leave_them_out() -> None:
    io = command_tables(ControllerConfig(1, namespaces=(1,)))
    assert not any(op in io.admin for op in MMC_ONLY)
    assert CNS.SUPPORTED_CTRL_STATE_FORMATS not in io.cns
    assert AdminOpcode.IDENTIFY in io.admin and io.io


def _modules_after_import(name: str) -> list[str]:
    code = (f"import sys, json; import {name}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('emulator.'))))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def test_host_side_imports_no_device_module() -> None:
    loaded = _modules_after_import("emulator.host.lm")
    nvme = [m for m in loaded if m.startswith("emulator.nvme")]
    # wire layouts and code points only
    assert nvme == ["emulator.nvme", "emulator.nvme.migration", "emulator.nvme.migration.wire",
                    "emulator.nvme.spec"], nvme


def test_importing_a_handler_module_registers_nothing() -> None:
    loaded = _modules_after_import("emulator.nvme.migration.send")
    assert "emulator.nvme.controller" not in loaded
    assert "emulator.nvme.dispatch" not in loaded
