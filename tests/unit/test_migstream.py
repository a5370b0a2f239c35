"""The migration v2 stream format: sections verified as they complete; any single
flipped byte, any truncation and any other version are refused."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from emulator.subsystem.migstream import DATA_HEAD, Kind, StreamError, StreamParser, StreamWriter


def stream() -> bytes:
    w = StreamWriter()
    parts = [w.header(False)]
    for i in range(3):
        parts.append(w.add(Kind.DATA, DATA_HEAD.pack(1, 0, i * 8) + bytes([i]) * 4096))
    parts += [w.add(Kind.CONTROLLER, b"controller state"), w.add(Kind.PCI, b"{}"), w.end()]
    return b"".join(parts)


def parse(data: bytes, chunk: int) -> list[tuple[Kind, bytes]]:
    p = StreamParser()
    out = []
    for i in range(0, len(data), chunk):
        out += p.feed(data[i:i + chunk])
    p.finish()
    return out


@given(st.integers(1, 5000))
def test_whole_stream_in_any_chunks(chunk: int) -> None:
    kinds = [k for k, _ in parse(stream(), chunk)]
    assert kinds == [Kind.HEADER, Kind.DATA, Kind.DATA, Kind.DATA, Kind.CONTROLLER, Kind.PCI, Kind.END]


@given(st.data())
def test_any_flipped_byte_is_refused(data: st.DataObject) -> None:
    s = bytearray(stream())
    pos = data.draw(st.integers(0, len(s) - 1))
    s[pos] ^= data.draw(st.integers(1, 255))
    with pytest.raises(StreamError):
        parse(bytes(s), data.draw(st.integers(1, 9000)))


@given(st.integers(1, len(stream()) - 1))
def test_any_truncation_is_refused(cut: int) -> None:
    with pytest.raises(StreamError):
        parse(stream()[:cut], 4096)


def test_other_version_and_trailing_data_are_refused() -> None:
    s = bytearray(stream())
    s[16 + 8] = 2  # version 2, CRC fixed up: refused for the version itself
    w = StreamWriter()
    from emulator.subsystem.migstream import HEADER_BODY, MAGIC, section
    s[:16 + HEADER_BODY.size] = section(Kind.HEADER, 0, HEADER_BODY.pack(MAGIC, 2, 0))
    with pytest.raises(StreamError, match="version 2"):
        parse(bytes(s), 100)
    with pytest.raises(StreamError, match="after the END"):
        parse(stream() + w.header(False), 100000)
