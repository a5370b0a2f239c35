"""The I/O-path benchmark runs (it prints a figure; no timing is asserted)."""
from __future__ import annotations

from emulator.bench.iopath import io_path_us, main


def test_every_read_completes_with_its_interrupt() -> None:
    # (_rounds raises if a read did not complete in the reader callback, failed, or
    # raised no interrupt)
    assert io_path_us(batch=1, ios=50, repeat=1) > 0
    assert io_path_us(batch=4, ios=40, repeat=1, path="python") > 0


def test_main_prints_a_figure(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["--ios", "20", "--repeat", "1", "--batch", "2"]) == 0
    assert "per 4 KiB read in the server's reader callback" in capsys.readouterr().out
