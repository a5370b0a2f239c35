from emulator.mmh.ranges import coalesce, split, total


def test_coalesce_merges_overlapping_and_adjacent() -> None:
    assert coalesce([(10, 5), (0, 4), (4, 2), (12, 10), (40, 0), (30, 1)]) == [(0, 6), (10, 12), (30, 1)]


def test_split_and_total() -> None:
    assert split([(0, 10), (100, 3)], 4) == [(0, 4), (4, 4), (8, 2), (100, 3)]
    assert total([(0, 10), (100, 3)]) == 13
