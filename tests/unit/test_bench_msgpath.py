"""The message-path benchmark runs (it prints a figure; no timing is asserted)."""
from __future__ import annotations

from emulator.bench.msgpath import main, per_message_us


def test_every_message_reaches_the_device() -> None:
    assert per_message_us(3, rounds=50) > 0  # (it asserts the device saw all 150 writes)


def test_main_prints_a_figure(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--per-read", "2", "--repeat", "1"]) == 0
    assert "µs CPU per posted doorbell write" in capsys.readouterr().out
