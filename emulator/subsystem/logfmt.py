"""Log output of ``nvme-emu serve``: one line per event, naming the controller.

* ``text`` (for people): ``2026-11-27T03:45:01.123Z INFO    ctrl1  vfio-user client connected``.
  The controller column is ``-`` for events of the whole process.  An exception
  is summarised on the same line (type, message, innermost frame); its full
  traceback is printed in the ``json`` format.
* ``json`` (for machines): one JSON object per line with ``ts`` (UTC, ISO 8601),
  ``level``, ``logger``, ``cntlid`` (an integer or null), ``msg`` and, when there
  is one, ``exception`` (the whole traceback).

The controller comes from, in this order: a ``cntlid`` attribute of the record
(``log.info(..., extra={"cntlid": 3})``), a logger named ``...ctrl<N>``, or a
message that starts with ``ctrl <N>:`` or ``MMC <N>:`` (that prefix is then
dropped from the text, since the column says it).
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from typing import TextIO

FORMATS = ("text", "json")
_LOGGER_CTRL = re.compile(r"\.ctrl(\d+)$")
_MSG_CTRL = re.compile(r"^(?:ctrl|MMC) (\d+): ")


def _split(record: logging.LogRecord) -> tuple[int | None, str]:
    msg = record.getMessage()
    cntlid = getattr(record, "cntlid", None)
    if isinstance(cntlid, int):
        return cntlid, msg
    m = _LOGGER_CTRL.search(record.name)
    if m:
        return int(m.group(1)), msg
    m = _MSG_CTRL.match(msg)
    if m:
        return int(m.group(1)), msg[m.end():]
    return None, msg


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        cntlid, msg = _split(record)
        line = f"{_timestamp(record)} {record.levelname:<7} {('ctrl' + str(cntlid)) if cntlid is not None else '-':<6} {msg}"
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
            line += f" [{type(exc).__name__}: {exc}{where}]"
        return line.replace("\n", " | ")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        cntlid, msg = _split(record)
        obj = {"ts": _timestamp(record), "level": record.levelname, "logger": record.name,
               "cntlid": cntlid, "msg": msg}
        if record.exc_info and record.exc_info[1] is not None:
            obj["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(obj, ensure_ascii=False)


def setup_logging(level: str | int = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record of the process to ``stream`` (stderr) in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(FORMATS)}")
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
