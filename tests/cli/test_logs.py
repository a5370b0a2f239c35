"""`nvme-emu serve --log-format text|json`: one line per event, naming the controller."""
from __future__ import annotations

import io
import json
import logging

import pytest

from emulator.subsystem.logfmt import JsonFormatter, TextFormatter, setup_logging

CONFIG = {"namespaces": [{"nsid": 1, "size": "8MiB"}],
          "controllers": [{"cntlid": 1, "type": "io"}, {"cntlid": 2, "type": "mmc"}]}


def _events(emu) -> list[str]:  # type: ignore[no-untyped-def]
    host = emu.host(1)
    host.shutdown()
    host.close()
    assert emu.stop() == 0
    text = emu.log_path.read_text()
    skip = ("#", "listening on ", "control socket ")
    return [line for line in text.splitlines() if line and not line.startswith(skip)]


def test_json_log_lines_name_the_controller(nvme_emu) -> None:  # type: ignore[no-untyped-def]
    lines = _events(nvme_emu(CONFIG, args=["--log-format", "json"]))
    events = [json.loads(line) for line in lines]   # every line is one JSON object
    assert all(set(e) >= {"ts", "level", "logger", "cntlid", "msg"} for e in events)
    by_msg = {e["msg"]: e for e in events}
    assert by_msg["vfio-user client connected"]["cntlid"] == 1
    shut = [e for e in events if e["msg"].startswith("shutdown complete")]
    assert shut and shut[0]["cntlid"] == 1 and shut[0]["level"] == "INFO"
    assert any(e["cntlid"] is None and "stopped" in e["msg"] for e in events)


def test_text_log_lines_name_the_controller(nvme_emu) -> None:  # type: ignore[no-untyped-def]
    lines = _events(nvme_emu(CONFIG))
    connected = [line for line in lines if line.endswith("vfio-user client connected")]
    assert connected and connected[0].split()[1:3] == ["INFO", "ctrl1"]
    shut = [line for line in lines if "shutdown complete" in line]
    assert shut and shut[0].split()[2] == "ctrl1" and "ctrl 1:" not in shut[0]


def _record(msg: str, *args: object, name: str = "nvme.ctrl", exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            import sys
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


def test_an_exception_stays_on_one_text_line_and_is_whole_in_json() -> None:
    rec = _record("ctrl %d: opcode %#x failed", 3, 0x99, exc=True)
    text = TextFormatter().format(rec)
    assert "\n" not in text and " ctrl3 " in text and "opcode 0x99 failed [ValueError: bad | thing at" in text
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["cntlid"] == 3 and obj["msg"] == "opcode 0x99 failed" and "Traceback" in obj["exception"]
    assert json.loads(JsonFormatter().format(_record("MMC 2: CDQ 1 deleted")))["cntlid"] == 2
    assert json.loads(JsonFormatter().format(_record("x", name="nvme-emu.ctrl7")))["cntlid"] == 7


def test_setup_logging_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError):
        setup_logging("INFO", "xml", io.StringIO())
