"""Write Uncorrectable marks (issue 11): merged ranges, healing, persistence, against a set model."""
from __future__ import annotations

from pathlib import Path

from hypothesis import given, strategies as st

from emulator.nvme.uncorrectable import UncorrectableMarks
from emulator.subsystem import nsstore

NSZE = 256
ops = st.lists(st.tuples(st.booleans(), st.integers(0, NSZE - 1), st.integers(1, 40)), max_size=30)


@given(ops)
def test_marks_match_a_set(steps: list[tuple[bool, int, int]]) -> None:
    marks = UncorrectableMarks(None, NSZE)
    model: set[int] = set()
    for mark, slba, nlb in steps:
        nlb = min(nlb, NSZE - slba)
        lbas = set(range(slba, slba + nlb))
        if mark:
            marks.mark(slba, nlb)
            model |= lbas
        else:
            marks.clear(slba, nlb)
            model -= lbas
        got = {lba for s, e in marks.ranges() for lba in range(s, e)}
        assert got == model
        assert marks.count() == len(model)
        ranges = marks.ranges()
        assert all(e1 < s2 for (_, e1), (s2, _) in zip(ranges, ranges[1:]))  # disjoint, not touching
        for probe in (0, 17, 100, NSZE - 3):
            assert marks.overlaps(probe, 3) == bool(model & {probe, probe + 1, probe + 2})


def test_marks_persist_and_ignore_another_size(tmp_path: Path) -> None:
    path = tmp_path / "ns1.img.uncor"
    m = UncorrectableMarks(path, NSZE)
    m.mark(10, 5)
    m.mark(100, 1)
    m.clear(12, 1)
    assert UncorrectableMarks(path, NSZE).ranges() == [(10, 12), (13, 15), (100, 101)]
    assert UncorrectableMarks(path, NSZE * 2).ranges() == []  # reformatted: not these marks
    path.write_text("{not json")  # damaged from outside: logged, no marks, no crash
    assert UncorrectableMarks(path, NSZE).ranges() == []


def test_registry_unreadable_falls_back(tmp_path: Path) -> None:
    (tmp_path / nsstore.REGISTRY).write_text('{"version": 1, "namespaces": [{"nsid": 1}]}')
    assert nsstore.load(tmp_path) is None
    assert nsstore.load(tmp_path / "missing") is None
    (tmp_path / nsstore.REGISTRY).write_text("[1, 2")
    assert nsstore.load(tmp_path) is None
