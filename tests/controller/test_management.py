"""The management methods of the control socket (``status``, ``stats``): every reply
is checked against the JSON Schema documented in docs/management-socket.md, and
malformed requests get JSON-RPC errors while the emulator keeps serving."""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from emulator.control import ControlClient, ControlError

jsonschema = pytest.importorskip("jsonschema", reason="pip install -e '.[test]' (jsonschema)")

DOC = Path(__file__).resolve().parents[2] / "docs" / "management-socket.md"
CONFIG: dict[str, Any] = {
    "namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512},
                   {"nsid": 2, "size": "8MiB", "lba_size": 4096}],
    "controllers": [{"cntlid": 1, "type": "io", "namespaces": [1, 2]}, {"cntlid": 2, "type": "mmc"}],
}


def documented_schemas() -> dict[str, Any]:
    """``<!-- schema: METHOD -->`` followed by a fenced JSON block, per method."""
    text = DOC.read_text()
    found = re.findall(r"<!-- schema: (\S+) -->\s*```json\n(.*?)```", text, re.S)
    return {name: json.loads(body) for name, body in found}


SCHEMAS = documented_schemas()


def check(method: str, reply: Any) -> Any:
    jsonschema.validate(reply, SCHEMAS[method])
    return reply


def test_the_doc_has_a_schema_for_every_management_method() -> None:
    assert {"status", "stats", "rpc.methods"} <= set(SCHEMAS)
    for s in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(s)


def test_status_and_stats_follow_their_schemas(emu) -> None:  # type: ignore[no-untyped-def]
    e = emu(CONFIG)
    path = e.config.control_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with ControlClient(path) as c:
        methods = check("rpc.methods", c.call("rpc.methods"))
        assert {"status", "stats"} <= set(methods)
        idle = check("status", c.call("status"))
        assert [ctl["client"] for ctl in idle["controllers"]] == [None, None]
        assert not idle["controllers"][0]["enabled"]

        h = e.host(1, io_queues=2, qsize=16)
        h.write(1, 0, b"\xab" * 8192)
        assert h.read(1, 0, 16).ok
        bad = h.command(1, 0x7F, nsid=1)          # no such I/O opcode
        assert not bad.ok
        bad = h.read(1, (16 << 20) // 512, 1)     # past the end
        assert not bad.ok
        assert h.flush(1).ok                      # completed by a worker thread (offloaded)

        st = check("status", c.call("status"))
        c1, c2 = st["controllers"]
        assert (c1["cntlid"], c1["type"], c2["type"]) == (1, "io", "mmc")
        assert c1["enabled"] and c1["ready"] and not c1["suspended"]
        assert c1["client"]["pid"] == os.getpid() and not c1["client"]["paused"]
        assert [q["qid"] for q in c1["queues"]["sq"]] == [0, 1, 2]
        assert c1["namespaces"] == [1, 2] and c2["namespaces"] == []
        ns1 = st["namespaces"][0]
        assert ns1["size"] == 16 << 20 and ns1["allocated"] == 8192
        assert st["capacity"] == {"size": 24 << 20, "allocated": 8192}

        s = check("stats", c.call("stats"))
        io = s["controllers"][0]["io"]
        by_name = {o["name"]: o for o in io["opcodes"]}
        assert by_name["write"] == {"opcode": 1, "name": "write", "commands": 1, "bytes": 8192}
        assert by_name["read"]["commands"] == 2 and by_name["read"]["bytes"] == 8192
        assert by_name["opcode_7fh"]["commands"] == 1
        assert by_name["flush"] == {"opcode": 0, "name": "flush", "commands": 1, "bytes": 0}
        assert sum(b["count"] for b in io["latency"]) == io["commands"] == 5
        errors = {x["name"]: x["count"] for x in s["controllers"][0]["errors"]}
        assert errors == {"invalid_opcode": 1, "lba_out_of_range": 1}
        admin = {o["name"] for o in s["controllers"][0]["admin"]["opcodes"]}
        assert {"identify", "create_io_cq", "create_io_sq", "set_features"} <= admin

        one = check("stats", c.call("stats", {"cntlid": 1, "reset": True}))
        assert [x["cntlid"] for x in one["controllers"]] == [1]
        after = check("stats", c.call("stats", {"cntlid": 1}))
        assert after["controllers"][0]["io"]["commands"] == 0
        with pytest.raises(ControlError) as ei:
            c.call("stats", {"cntlid": 9})
        assert ei.value.code == -32000 and "no controller 9" in ei.value.message
        with pytest.raises(ControlError) as ei:
            c.call("stats", {"reset": "yes"})
        assert ei.value.code == -32602
        with pytest.raises(ControlError) as ei:
            c.call("status", {"verbose": True})
        assert ei.value.code == -32602


def _raw(sock: socket.socket, line: bytes) -> dict[str, Any]:
    sock.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "control socket closed"
        buf += chunk
    return json.loads(buf)  # type: ignore[no-any-return]


@pytest.mark.parametrize("line, code", [
    (b"not json\n", -32700),
    (b"[1, 2]\n", -32600),
    (b'{"jsonrpc":"1.0","method":"status","id":3}\n', -32600),
    (b'{"jsonrpc":"2.0","method":"status","params":[1],"id":4}\n', -32600),
    (b'{"jsonrpc":"2.0","method":"no.such","id":5}\n', -32601),
    (b'{"jsonrpc":"2.0","method":"stats","params":{"cntlid":"one"},"id":6}\n', -32000),
    (b'{"jsonrpc":"2.0","method":"stats","params":{"bogus":1},"id":7}\n', -32602),
    (b'\xff\xfe\n', -32700),
])
def test_a_malformed_request_gets_an_error_and_the_emulator_keeps_serving(emu, line: bytes,  # type: ignore[no-untyped-def]
                                                                        code: int) -> None:
    e = emu()
    h = e.host(1)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(e.config.control_path))
        reply = _raw(s, line)
        assert reply["jsonrpc"] == "2.0" and reply["error"]["code"] == code, reply
        assert isinstance(reply["error"]["message"], str)
        # the same connection still answers, and so does the controller
        ok = _raw(s, b'{"jsonrpc":"2.0","method":"status","id":99}\n')
        assert ok["id"] == 99
        check("status", ok["result"])
    h.write(1, 0, b"\x01" * 512)
    assert h.read(1, 0, 1).ok
    with ControlClient(e.config.control_path) as c:
        check("stats", c.call("stats"))


def test_migration_view_follows_its_schema_while_a_migration_runs(emu) -> None:  # type: ignore[no-untyped-def]
    from emulator.host.lm import MigrationHost
    e = emu({"namespaces": [{"nsid": 1, "size": "16MiB", "lba_size": 512}],
             "controllers": [{"cntlid": 1, "type": "io"}, {"cntlid": 2, "type": "mmc"}]})
    g = e.host(1)
    m = MigrationHost(e.host(2))
    with ControlClient(e.config.control_path) as c:
        idle = check("migration", c.call("migration"))
        assert not idle["active"] and idle["reported"] == []
        assert idle["controllers"] == [{"cntlid": 1, "suspended": False, "suspended_by": None,
                                        "released": False, "paused": False}]
        q = m.udmq(1, slots=64)
        assert m.log_start(q.cdqid).ok
        assert m.track_memory(1, [(g.mem.iova, g.mem.size >> 12)]).ok
        g.write(1, 0, b"\x22" * 4096)
        assert m.suspend(1).ok
        with ControlClient(e.config.control_path) as mmh:
            assert check("migration.progress", mmh.call("migration.progress", {
                "phase": "pre-copy", "round": 2, "bytes_copied": 4096, "eta_s": None})) is True
            busy = check("migration", c.call("migration"))
            assert busy["active"] and busy["reported"][0]["phase"] == "pre-copy"
            assert busy["reported"][0]["round"] == 2
            with pytest.raises(ControlError) as ei:
                mmh.call("migration.progress", {"round": 3})
            assert ei.value.code == -32602
        c1 = busy["controllers"][0]
        assert c1["suspended"] and c1["suspended_by"] == 2
        (mmc,) = busy["mmcs"]
        assert mmc["cntlid"] == 2 and mmc["cdqs"][0]["logging"] and mmc["cdqs"][0]["used"] >= 1
        assert mmc["tracks"][0]["cntlid"] == 1 and mmc["tracks"][0]["dirty"] >= 1
        assert check("status", c.call("status"))["controllers"][0]["suspended"]
        from emulator.subsystem.monitor_cli import format_migration   # `nvme-emu status` lines
        text = format_migration(busy)
        assert "ctrl 1: suspended by MMC 2" in text and "phase pre-copy, round 2" in text
        assert format_migration(idle) == ""
        # the MMH's report goes with its connection
        for _ in range(100):
            if not c.call("migration")["reported"]:
                break
            time.sleep(0.02)
        assert c.call("migration")["reported"] == []
        assert m.resume(1).ok
