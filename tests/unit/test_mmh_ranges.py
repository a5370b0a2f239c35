from emulator.mmh.ranges import coalesce, split, total


def test_coalesce_merges_overlapping_and_adjacent() -> None:
    assert coalesce([(10, 5), (0, 4), (4, 2), (12, 10), (40, 0), (30, 1)]) == [(0, 6), (10, 12), (30, 1)]


def test_split_and_total() -> None:
    assert split([(0, 10), (100, 3)], 4) == [(0, 4), (4, 4), (8, 2), (100, 3)]
    assert total([(0, 10), (100, 3)]) == 13


def test_subtract_and_change_set_order() -> None:
    from emulator.mmh.ranges import ChangeSet, subtract
    assert subtract([(0, 10), (20, 5)], [(5, 17)]) == [(0, 5), (22, 3)]
    assert subtract([(0, 10)], [(0, 10)]) == []
    c = ChangeSet()
    c.write((0, 8))
    c.deallocate((4, 8))  # the later deallocation wins over the write...
    c.write((10, 1))  # ...and a later write over the deallocation
    assert coalesce(c.written) == [(0, 4), (10, 1)] and c.deallocated == [(4, 6), (11, 1)]
