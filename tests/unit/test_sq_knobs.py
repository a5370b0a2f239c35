"""The poll turns' environment knobs (emulator/nvme/sqwait.py, NVME_EMU_SQ_*): pure Python,
so they run on both paths."""
from __future__ import annotations

import pytest

from emulator.nvme import sqwait


@pytest.mark.parametrize("raw", ["-5", "abc", "inf", "nan", ""])
def test_poll_knob_that_is_no_usable_time_falls_back_to_its_default(
        raw: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A negative, infinite or non-numeric NVME_EMU_SQ_* value gives the default (the C waits
    take unsigned times: a negative one made the hub's setup raise), with a warning."""
    monkeypatch.setenv("NVME_EMU_SQ_TEST_US", raw)
    with caplog.at_level("WARNING", logger="nvme.sqwait"):
        assert sqwait._env_us("NVME_EMU_SQ_TEST_US", 50) == 50_000
    assert "NVME_EMU_SQ_TEST_US" in caplog.text


def test_poll_knob_scales_by_its_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NVME_EMU_SQ_TEST_KIB", "0")
    assert sqwait._env_us("NVME_EMU_SQ_TEST_KIB", 64, 1024) == 0
    monkeypatch.setenv("NVME_EMU_SQ_TEST_KIB", "2.5")
    assert sqwait._env_us("NVME_EMU_SQ_TEST_KIB", 64, 1024) == 2560
    monkeypatch.delenv("NVME_EMU_SQ_TEST_KIB")
    assert sqwait._env_us("NVME_EMU_SQ_TEST_KIB", 64, 1024) == 65536
