"""LBA Status Information Attributes (Feature 15h) and the LBA Status Information Alert
(NVM CS 1.2 §4.1.3.5, Figure 99), on a controller driven directly with a fake clock: the
alert waits for LSIRI, changes within it are coalesced, and a read of log 0Eh with RAE=0
restarts it.  No sleeps: the test moves the clock."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from emulator.nvme import features, lba_status_log as lsl
from emulator.nvme.config import ControllerConfig, NamespaceConfig
from emulator.nvme.dispatch import new_controller
from emulator.nvme.namespace import Namespace
from emulator.nvme.spec import FID, AdminOpcode, Command, pack_sqe
from emulator.subsystem.subsystem import Subsystem

FID_15H = lsl.FID_LBA_STATUS_INFO_ATTRIBUTES
ALERT_DW0 = 0x2 | (lsl.AEI_LBA_STATUS_ALERT << 8) | (0x0E << 16)  # Notice, LBA Status Information Alert


class FakeClock:
    """The Scheduler the controller sees: time() and call_later(), moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.timers: list[list[Any]] = []  # [due, callback, args, cancelled]

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> "FakeClock.Handle":
        timer = [self.now + delay, callback, args, False]
        self.timers.append(timer)
        return FakeClock.Handle(timer)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        callback(*args)

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for timer in sorted(self.timers, key=lambda t: t[0]):
            if timer[0] <= self.now and not timer[3]:
                self.timers.remove(timer)
                timer[1](*timer[2])

    class Handle:
        def __init__(self, timer: list[Any]) -> None:
            self.timer = timer

        def cancel(self) -> None:
            self.timer[3] = True


@pytest.fixture
def rig(tmp_path: Path):
    sub = Subsystem()
    ns = Namespace(NamespaceConfig(1, tmp_path / "ns1.img", 1 << 20), sub.nqn)
    sub.namespaces[1] = ns
    clock = FakeClock()
    ctrl = new_controller(ControllerConfig(1), sub, scheduler=clock)
    sub.controllers[1] = ctrl
    sub.attached(1).add(1)
    ctrl.state.features[FID.ASYNC_EVENT_CONFIG] = features.AEC_LBA_STATUS_NOTICES
    yield ctrl, ns, clock
    sub.close()


def admin(ctrl, opc: int, cdw10: int = 0, cdw11: int = 0) -> Command:
    return Command(pack_sqe(opc, 1, cdw10=cdw10, cdw11=cdw11))


def alerts(ctrl) -> int:
    return sum(1 for dw0, _ in ctrl.state.aer.pending if dw0 == ALERT_DW0)


def mark(ctrl, ns, slba: int) -> None:
    ns.uncorrectable.mark(slba, 1)
    lsl.lba_status_changed(ctrl)


def read_log(ctrl, rae: bool) -> None:
    lsl.lba_status_information(ctrl, admin(ctrl, AdminOpcode.GET_LOG_PAGE, 0x0E | (int(rae) << 15)))
    ctrl.state.aer.pending.clear()  # as if the alert had been delivered and read


def test_feature_15h_lsipi_fixed_lsiri_settable(rig):
    ctrl, _, _ = rig
    get = features.get_features
    assert get(ctrl, admin(ctrl, AdminOpcode.GET_FEATURES, FID_15H))[0] == (lsl.LSIPI << 16) | lsl.LSIPI
    dw0, _ = features.set_features(ctrl, admin(ctrl, AdminOpcode.SET_FEATURES, FID_15H, 0xABCD0032))
    assert dw0 == (lsl.LSIPI << 16) | 0x32  # LSIPI is not changeable by the host
    assert get(ctrl, admin(ctrl, AdminOpcode.GET_FEATURES, FID_15H))[0] == dw0
    assert get(ctrl, admin(ctrl, AdminOpcode.GET_FEATURES, FID_15H | (1 << 8)))[0] == 0x10001  # default


def test_alert_waits_for_the_report_interval_and_coalesces(rig):
    ctrl, ns, clock = rig
    features.set_features(ctrl, admin(ctrl, AdminOpcode.SET_FEATURES, FID_15H, 50))  # LSIRI 5 s
    mark(ctrl, ns, 10)
    assert alerts(ctrl) == 0  # the interval starts now
    clock.advance(4.9)
    mark(ctrl, ns, 20)  # within the interval: the same alert
    assert alerts(ctrl) == 0
    clock.advance(0.1)
    assert alerts(ctrl) == 1
    clock.advance(60)
    assert alerts(ctrl) == 1  # one alert for both changes

    read_log(ctrl, rae=True)  # RAE=1 does not restart the interval
    mark(ctrl, ns, 30)
    assert alerts(ctrl) == 1  # ... which has run out since the first change: at once

    read_log(ctrl, rae=False)  # restarts it
    clock.advance(2)
    mark(ctrl, ns, 40)
    assert alerts(ctrl) == 0
    clock.advance(2.9)
    assert alerts(ctrl) == 0
    clock.advance(0.1)
    assert alerts(ctrl) == 1


def test_no_alert_without_a_change_or_with_notices_off(rig):
    ctrl, ns, clock = rig
    mark(ctrl, ns, 1)
    clock.advance(lsl.LSIPI * lsl.INTERVAL_UNIT)  # the default LSIRI is LSIPI
    assert alerts(ctrl) == 1
    read_log(ctrl, rae=False)
    clock.advance(10)
    lsl.lba_status_changed(ctrl)  # LSGC did not move: nothing to report
    assert alerts(ctrl) == 0
    ctrl.state.features[FID.ASYNC_EVENT_CONFIG] = 0
    mark(ctrl, ns, 2)
    clock.advance(10)
    assert alerts(ctrl) == 0 and not clock.timers  # notices off: the host polls
