"""DEVICE_FEATURE / MIG_DATA on the vfio-user layer, with a fake device migration.

Every arc of the kernel's migration state machine (include/uapi/linux/vfio.h,
VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, with PRE_COPY and without P2P): the
steps a combination arc walks, invalid arcs refused with EINVAL and the state
unchanged; PROBE answers; ENOTTY for what the device lacks; the connection
survives every refusal."""
from __future__ import annotations

import errno
import itertools
from typing import Iterator

import pytest

from conftest import FakeBackend, connect
from emulator.vfio_user import messages as m
from emulator.vfio_user import protocol as p
from emulator.vfio_user.client import VfioUserClient, VfioUserError
from emulator.vfio_user.migration import (
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_MIG_DEVICE_STATE,
    FEATURE_MIGRATION, LOGGING_HEAD, LOGGING_RANGE, LOGGING_REPORT, MIG_STATE_DATA, MIGRATION_DATA,
    MigrationFeatures, MigState, arc_path,
)
from emulator.vfio_user.testing import ServerThread

S = MigState
GET, SET, PROBE = p.DEVICE_FEATURE_GET, p.DEVICE_FEATURE_SET, p.DEVICE_FEATURE_PROBE

# The kernel's vfio_mig_get_next_state() walked to the end, for a device with
# STOP_COPY | PRE_COPY (P2P states skipped): the states passed, in order.
KERNEL_PATHS: dict[tuple[MigState, MigState], list[MigState] | None] = {
    (S.RUNNING, S.STOP): [S.STOP],
    (S.RUNNING, S.STOP_COPY): [S.STOP, S.STOP_COPY],
    (S.RUNNING, S.RESUMING): [S.STOP, S.RESUMING],
    (S.RUNNING, S.PRE_COPY): [S.PRE_COPY],
    (S.STOP, S.RUNNING): [S.RUNNING],
    (S.STOP, S.STOP_COPY): [S.STOP_COPY],
    (S.STOP, S.RESUMING): [S.RESUMING],
    (S.STOP, S.PRE_COPY): [S.RUNNING, S.PRE_COPY],
    (S.STOP_COPY, S.STOP): [S.STOP],
    (S.STOP_COPY, S.RUNNING): [S.STOP, S.RUNNING],
    (S.STOP_COPY, S.RESUMING): [S.STOP, S.RESUMING],
    (S.STOP_COPY, S.PRE_COPY): None,  # refused by the uAPI
    (S.RESUMING, S.STOP): [S.STOP],
    (S.RESUMING, S.RUNNING): [S.STOP, S.RUNNING],
    (S.RESUMING, S.STOP_COPY): [S.STOP, S.STOP_COPY],
    (S.RESUMING, S.PRE_COPY): [S.STOP, S.RUNNING, S.PRE_COPY],
    (S.PRE_COPY, S.RUNNING): [S.RUNNING],
    (S.PRE_COPY, S.STOP_COPY): [S.STOP_COPY],
    (S.PRE_COPY, S.STOP): [S.RUNNING, S.STOP],
    (S.PRE_COPY, S.RESUMING): [S.RUNNING, S.STOP, S.RESUMING],
}
USABLE = [S.RUNNING, S.STOP, S.STOP_COPY, S.RESUMING, S.PRE_COPY]


class FakeMigration:
    def __init__(self) -> None:
        self.steps: list[tuple[MigState, MigState]] = []
        self.fail_into: MigState | None = None
        self.stream = b"device-state"
        self.received = bytearray()
        self.logging: list[tuple[int, list[tuple[int, int]]]] = []

    def step(self, cur: MigState, new: MigState) -> None:
        if new == self.fail_into:
            raise ValueError(f"cannot go to {new.name}")
        self.steps.append((cur, new))

    def read(self, size: int) -> bytes:
        out, self.stream = self.stream[:size], self.stream[size:]
        return out

    def write(self, data: bytes) -> None:
        self.received += data

    def reset(self) -> None:
        self.steps.append((S.ERROR, S.RUNNING))

    def logging_start(self, page_size: int, ranges: list[tuple[int, int]]) -> int:
        self.logging.append((page_size, ranges))
        return max(page_size, 4096)

    def logging_stop(self) -> None:
        self.logging.append((0, []))

    def logging_report(self, iova: int, length: int, page_size: int) -> bytes:
        return b"\x05"  # pages 0 and 2


class MigratingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.fake = FakeMigration()
        self.mig_features = MigrationFeatures(self.fake)


@pytest.fixture
def mig() -> Iterator[tuple[MigratingBackend, VfioUserClient]]:
    b = MigratingBackend()
    with ServerThread(b) as srv:
        with connect(srv) as c:
            yield b, c
        assert srv.errors == []
    b.close()


def state(c: VfioUserClient) -> MigState:
    return S(MIG_STATE_DATA.unpack_from(c.device_feature(GET | FEATURE_MIG_DEVICE_STATE, argsz=16).data)[0])


def set_state(c: VfioUserClient, new: int) -> None:
    c.device_feature(SET | FEATURE_MIG_DEVICE_STATE, MIG_STATE_DATA.pack(new, 0))


def errno_of(fn: object) -> int:
    with pytest.raises(VfioUserError) as e:
        fn()  # type: ignore[operator]
    return e.value.errno


def test_arc_table_matches_the_kernel() -> None:
    for cur, new in itertools.product(range(9), range(9)):
        want = [] if cur == new and cur in USABLE else KERNEL_PATHS.get((cur, new))  # type: ignore[call-overload]
        assert arc_path(cur, new) == want, (cur, new)


def _go(b: MigratingBackend, c: VfioUserClient, target: MigState) -> None:
    """Reach ``target`` from wherever the device is (through RUNNING: reset)."""
    c.reset()
    if target == S.RUNNING:
        return
    set_state(c, target)


@pytest.mark.parametrize("cur,new", [(a, n) for a in USABLE for n in [*USABLE, S.ERROR, S.RUNNING_P2P,
                                                                     S.PRE_COPY_P2P, 8, 0xFFFF]])
def test_every_arc(mig: tuple[MigratingBackend, VfioUserClient], cur: MigState, new: int) -> None:
    b, c = mig
    _go(b, c, cur)
    assert state(c) == cur
    b.fake.steps.clear()
    want = [] if cur == new else KERNEL_PATHS.get((cur, new))  # type: ignore[arg-type]
    if want is None:
        assert errno_of(lambda: set_state(c, new)) == errno.EINVAL
        assert state(c) == cur and b.fake.steps == []  # refused: unchanged, nothing done
        return
    set_state(c, new)
    assert state(c) == new
    assert b.fake.steps == list(zip([cur, *want], want))


def test_failed_step_leaves_error_until_reset(mig: tuple[MigratingBackend, VfioUserClient]) -> None:
    b, c = mig
    set_state(c, S.RESUMING)
    b.fake.fail_into = S.STOP
    assert errno_of(lambda: set_state(c, S.STOP)) == errno.EINVAL
    assert state(c) == S.ERROR
    assert errno_of(lambda: set_state(c, S.RUNNING)) == errno.EINVAL  # ERROR is left by reset only
    b.fake.fail_into = None
    c.reset()
    assert state(c) == S.RUNNING


def test_probe_get_set_and_enotty(mig: tuple[MigratingBackend, VfioUserClient]) -> None:
    b, c = mig
    # PROBE: 0 when the operations asked for are supported, the payload echoed
    for flags in (PROBE | FEATURE_MIGRATION, PROBE | GET | FEATURE_MIGRATION,
                  PROBE | GET | SET | FEATURE_MIG_DEVICE_STATE, PROBE | SET | FEATURE_DMA_LOGGING_START,
                  PROBE | SET | FEATURE_DMA_LOGGING_STOP, PROBE | GET | FEATURE_DMA_LOGGING_REPORT):
        assert c.device_feature(flags).flags == flags
    for flags in (PROBE | SET | FEATURE_MIGRATION, PROBE | GET | FEATURE_DMA_LOGGING_START,
                  PROBE | SET | FEATURE_DMA_LOGGING_REPORT):
        assert errno_of(lambda: c.device_feature(flags)) == errno.EINVAL
    # unsupported features: ENOTTY, probed or not
    for index in (0, 3, 4, 5, 9, 10, 0xFFFF):
        assert errno_of(lambda: c.device_feature(PROBE | GET | index)) == errno.ENOTTY
        assert errno_of(lambda: c.device_feature(GET | index, argsz=64)) == errno.ENOTTY
    # GET and SET together without PROBE, none of them, unknown flag bits: EINVAL (kernel uAPI)
    assert errno_of(lambda: c.device_feature(GET | SET | FEATURE_MIG_DEVICE_STATE, MIG_STATE_DATA.pack(1, 0))) \
        == errno.EINVAL
    assert errno_of(lambda: c.device_feature(GET | SET | 3)) == errno.EINVAL
    assert errno_of(lambda: c.device_feature(FEATURE_MIGRATION)) == errno.EINVAL
    assert errno_of(lambda: c.device_feature((1 << 19) | GET | FEATURE_MIGRATION)) == errno.EINVAL
    # MIGRATION: STOP_COPY | PRE_COPY; a reply that does not fit argsz: EINVAL
    reply = c.device_feature(GET | FEATURE_MIGRATION, argsz=16)
    assert reply.argsz == 16 and MIGRATION_DATA.unpack(reply.data) == (0b101,)
    assert errno_of(lambda: c.device_feature(GET | FEATURE_MIGRATION, argsz=8)) == errno.EINVAL
    # the connection is still fine
    assert state(c) == S.RUNNING


def test_feature_without_migration_is_enotty(client: VfioUserClient) -> None:
    for flags in (GET | FEATURE_MIGRATION, PROBE | GET | FEATURE_MIGRATION, GET | FEATURE_MIG_DEVICE_STATE):
        assert errno_of(lambda: client.device_feature(flags, argsz=16)) == errno.ENOTTY
    assert errno_of(lambda: client.device_feature(GET | SET | FEATURE_MIGRATION)) == errno.EINVAL
    assert client.device_info().num_regions == p.PCI_NUM_REGIONS


def test_mig_data_only_in_its_states(mig: tuple[MigratingBackend, VfioUserClient]) -> None:
    b, c = mig
    assert errno_of(lambda: c.call(m.MigDataReadRequest(64))) == errno.EINVAL
    assert errno_of(lambda: c.call(m.MigDataWriteRequest(b"x"))) == errno.EINVAL
    set_state(c, S.STOP_COPY)
    assert c.call(m.MigDataReadRequest(8)).data == b"device-s"
    assert c.call(m.MigDataReadRequest(64)).data == b"tate"  # short: the end
    assert errno_of(lambda: c.call(m.MigDataWriteRequest(b"x"))) == errno.EINVAL
    set_state(c, S.RESUMING)
    c.call(m.MigDataWriteRequest(b"abc"))
    assert bytes(b.fake.received) == b"abc"
    assert errno_of(lambda: c.call(m.MigDataReadRequest(64))) == errno.EINVAL


def test_dma_logging(mig: tuple[MigratingBackend, VfioUserClient]) -> None:
    b, c = mig
    report = LOGGING_REPORT.pack(0x10000, 0x4000, 4096)
    assert errno_of(lambda: c.device_feature(GET | FEATURE_DMA_LOGGING_REPORT, report, argsz=64)) == errno.EINVAL
    start = LOGGING_HEAD.pack(512, 1, 0) + LOGGING_RANGE.pack(0x10000, 0x4000)
    reply = c.device_feature(SET | FEATURE_DMA_LOGGING_START, start)
    assert LOGGING_HEAD.unpack_from(reply.data)[0] == 4096  # the page size chosen, reported back
    assert b.fake.logging == [(512, [(0x10000, 0x4000)])]
    assert errno_of(lambda: c.device_feature(SET | FEATURE_DMA_LOGGING_START, start)) == errno.EBUSY
    assert errno_of(lambda: c.device_feature(SET | FEATURE_DMA_LOGGING_START, LOGGING_HEAD.pack(3000, 0, 0))) \
        == errno.EINVAL
    reply = c.device_feature(GET | FEATURE_DMA_LOGGING_REPORT, report, argsz=8 + 24 + 8)
    assert reply.data == report + b"\x05" + bytes(7)
    assert errno_of(lambda: c.device_feature(GET | FEATURE_DMA_LOGGING_REPORT, report, argsz=8 + 24)) \
        == errno.EINVAL  # no room for the bitmap
    huge = LOGGING_REPORT.pack(0, 1 << 62, 4096)  # a bitmap no reply can hold: refused, no allocation
    assert errno_of(lambda: c.device_feature(GET | FEATURE_DMA_LOGGING_REPORT, huge, argsz=0xFFFFFFFF)) \
        == errno.EINVAL
    c.device_feature(SET | FEATURE_DMA_LOGGING_STOP, LOGGING_HEAD.pack(0, 0, 0))
    assert errno_of(lambda: c.device_feature(SET | FEATURE_DMA_LOGGING_STOP, LOGGING_HEAD.pack(0, 0, 0))) \
        == errno.EINVAL


def test_version_reply_is_a_subset_of_the_proposal(server: ServerThread) -> None:
    for proposal in ({}, {"max_msg_fds": 4}, {"pgsizes": 4096, "write_multiple": False},
                     {"max_dma_maps": 10, "max_data_xfer_size": 4096, "write_multiple": True}):
        with connect(server, negotiate=False) as c:
            caps = c.negotiate(proposal)
            assert set(caps) <= set(proposal), (proposal, caps)
            if proposal.get("write_multiple") is not True:
                assert "write_multiple" not in caps


def test_random_feature_requests_never_drop_the_connection(mig: tuple[MigratingBackend, VfioUserClient]) -> None:
    """Random flags (any feature, any op bits) and random data: a reply or an error reply
    every time, the session alive after each, and the state always one the uAPI allows."""
    import random
    b, c = mig
    rng = random.Random(15)
    for _ in range(400):
        index = rng.choice([0, 1, 2, 3, 6, 7, 8, 9, rng.randrange(1 << 16)])
        flags = index | (rng.randrange(16) << 16)
        data = bytes(rng.randrange(256) for _ in range(rng.choice([0, 4, 8, 16, 24, 40, 100])))
        try:
            c.device_feature(flags, data, argsz=rng.choice([0, 8, 16, 64, 4096]))
        except VfioUserError as e:
            assert e.errno in (errno.EINVAL, errno.ENOTTY, errno.EBUSY), (hex(flags), e)
        if state(c) == S.ERROR:
            c.reset()
    assert state(c) in USABLE
