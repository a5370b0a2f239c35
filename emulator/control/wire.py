"""Framing of the control socket, declared once for server and client.

One JSON-RPC 2.0 object per line (UTF-8, ``\\n`` terminated, no newline inside).
File descriptors travel as SCM_RIGHTS with the first byte of the line they
belong to, and the object says how many with the member ``"nfds"`` (an
extension to JSON-RPC 2.0; absent means 0).  The receiver keeps the fds of a
connection in arrival order and gives each message the next ``nfds`` of them.
"""
from __future__ import annotations

import json
from typing import Any

MAX_LINE = 1 << 20  # a longer line is a protocol error (the connection is closed)
MAX_FDS = 253  # fds per message (Linux SCM_MAX_FD)

# JSON-RPC 2.0 §5.1 error codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server errors (-32000..-32099)
METHOD_FAILED = -32000  # the method ran and refused (the message says why)


def encode(obj: dict[str, Any], nfds: int = 0) -> bytes:
    if nfds:
        obj = {**obj, "nfds": nfds}
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def request(method: str, params: dict[str, Any], msg_id: int, nfds: int = 0) -> bytes:
    return encode({"jsonrpc": "2.0", "method": method, "params": params, "id": msg_id}, nfds)


def result(msg_id: Any, value: Any, nfds: int = 0) -> bytes:
    return encode({"jsonrpc": "2.0", "result": value, "id": msg_id}, nfds)


def error(msg_id: Any, code: int, message: str) -> bytes:
    return encode({"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": msg_id})
