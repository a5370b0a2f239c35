"""cbind.prp: the PRP list entry loop in C against its pure-Python fallback (Base 2.1 §4.1.1).

Random PRP setups (PRP1 offsets, lengths up to 4 MiB, 4/8/64 KiB pages,
contiguous, scattered and run-structured buffers, lists starting mid-page,
chained list pages, bad offsets, lists outside memory) walked by
prp_segments with each loop: same segments, or the same error.  Valid setups
are also checked against the segments the generator meant.  Then the
fallbacks: NVME_EMU_NO_CBIND=1, no compiler, a compile that fails, and the
lazy build itself (parallel first imports, rebuild on a source change).
"""
from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, settings, strategies as st

from cbind import build
from cbind import prp as cprp
from emulator.memory import DmaError, GuestMemory
from emulator.nvme.prp import prp_segments
from emulator.nvme.spec import Generic, NvmeError

REPO = Path(__file__).resolve().parents[2]
U64 = (1 << 64) - 1


def _need_c() -> None:
    if cprp.merge_entries_c is None:
        if build.disabled() or build.compiler() is None:
            pytest.skip(f"C path not built: {build.why.get('prp')}")
        why = str(build.why.get("prp"))
        if "Python.h" in why or "setuptools" in why:  # the machine lacks headers/setuptools
            pytest.skip(f"C path not built (install python3-dev / setuptools): {why[:200]}")
        pytest.fail(f"a compiler is here but the C path did not build: {why}")


class FakeMemory:
    """Qwords the test placed; elsewhere deterministic garbage; one hole that is not mapped."""

    def __init__(self, qwords: dict[int, int], hole: tuple[int, int]) -> None:
        self.qwords, self.hole = qwords, hole

    def read(self, addr: int, length: int) -> bytes:
        lo, hi = self.hole
        if addr < hi and lo < addr + length:
            raise DmaError(addr, length, "outside mapped memory")
        return b"".join(struct.pack("<Q", self.qwords.get(a, (a * 0x9E3779B97F4A7C15) & U64))
                        for a in range(addr, addr + length, 8))


@dataclass
class Setup:
    page_size: int
    length: int
    prp1: int
    prp2: int
    memory: FakeMemory
    valid: bool                      # the generator broke nothing
    expected: list[tuple[int, int]] = field(default_factory=list)


def _merged(pages: list[int], first: tuple[int, int], length: int, page_size: int) -> list[tuple[int, int]]:
    """The segments the pages describe, merged: the model the walk must match."""
    segs = [first]
    remaining = length - first[1]
    for p in pages:
        n = min(page_size, remaining)
        a, m = segs[-1]
        if a + m == p:
            segs[-1] = (a, m + n)
        else:
            segs.append((p, n))
        remaining -= n
    return segs


@st.composite
def setups(draw: Any) -> Setup:
    ps: int = draw(st.sampled_from([4096, 8192, 65536]))
    mask = ps - 1
    length = draw(st.one_of(st.integers(1, 4 << 20),
                            st.integers(1, 1024).map(lambda k: k * 512),
                            st.integers(1, (4 << 20) // ps).map(lambda k: k * ps)))
    rng = random.Random(draw(st.integers(0, 2**32)))
    faults = draw(st.sampled_from(["none"] * 6 + ["prp1", "prp2", "entry", "chain", "hole"]))
    top = draw(st.booleans())  # data pages near the top of the 64-bit space
    last_page = U64 // ps      # the page at 2^64 - page_size; the next one wraps to 0

    broken = False  # set when a fault is really injected
    off1 = rng.randrange(0, ps, 4) if rng.random() < 0.7 else 0
    if faults == "prp1":
        off1 |= rng.choice([1, 2, 3])
        broken = True
    base_page = last_page - rng.randrange(0, 2048) if top else rng.randrange(1, 1 << 30)
    prp1 = base_page * ps + off1
    first = min(length, ps - (prp1 & mask))
    npages = -(-(length - first) // ps)

    layout = draw(st.sampled_from(["contiguous", "scattered", "runs"]))
    pages: list[int] = []
    nxt = (base_page + 1) % (last_page + 1)  # the page after the top one wraps to 0
    for _ in range(npages):
        if layout == "scattered" or (layout == "runs" and rng.random() < 0.2):
            nxt = last_page - rng.randrange(0, 4096) if top else rng.randrange(1, 1 << 30)
        pages.append(nxt * ps)
        nxt = (nxt + 1) % (last_page + 1)
    expected = _merged(pages, (prp1, first), length, ps)
    qwords: dict[int, int] = {}
    hole = (0, 0)

    if npages == 0:
        prp2 = rng.choice([0, rng.randrange(0, 1 << 40) * 8 + 3])  # not looked at
    elif npages == 1:
        # PRP2 is the second (last) page itself.
        prp2 = pages[0]
        if faults == "prp2":
            prp2 |= rng.randrange(1, ps)
            broken = True
    else:
        # PRP2 points to a PRP list: qword aligned, may start mid-page; a full
        # list page's last slot chains to the next one (which may start mid-page too).
        list_pages = rng.sample(range(1 << 20, 1 << 32), 256)

        def list_start(i: int) -> int:
            off = rng.randrange(0, ps, 8) if rng.random() < 0.5 else 0
            return list_pages[i] * ps + off

        prp2 = list_start(0)
        entries = list(pages)
        if faults == "entry":
            entries[rng.randrange(len(entries))] |= rng.randrange(1, ps)
        addr, i, lists, chains = prp2, 0, [prp2], []
        while True:
            slots = (ps - (addr & mask)) // 8
            if len(entries) - i <= slots:
                for j, e in enumerate(entries[i:]):
                    qwords[addr + 8 * j] = e
                break
            for j in range(slots - 1):
                qwords[addr + 8 * j] = entries[i + j]
            i += slots - 1
            chains.append(addr + 8 * (slots - 1))
            addr = list_start(len(lists))
            qwords[chains[-1]] = addr
            lists.append(addr)
        if faults == "prp2":
            prp2 |= 4
        elif faults == "chain" and chains:
            qwords[rng.choice(chains)] |= rng.choice([1, 2, 4, 7])
        elif faults == "hole":
            victim = rng.choice(lists)
            hole = (victim - victim % ps, victim - victim % ps + ps)
        broken = broken or faults in ("prp2", "entry", "hole") or (faults == "chain" and bool(chains))
    return Setup(ps, length, prp1, prp2, FakeMemory(qwords, hole), not broken, expected)


def outcome(s: Setup, merge: cprp.MergeFn) -> tuple[Any, ...]:
    try:
        return ("ok", prp_segments(cast(GuestMemory, s.memory), s.prp1, s.prp2, s.length, s.page_size, merge=merge))
    except NvmeError as e:
        return ("nvme", e.sct, e.sc, e.dnr, str(e))
    except DmaError as e:
        return ("dma", e.addr, e.length)


@settings(max_examples=400, deadline=None)
@given(setups())
def test_c_and_python_agree(s: Setup) -> None:
    _need_c()
    assert cprp.merge_entries_c is not None
    py = outcome(s, cprp.merge_entries_py)
    assert outcome(s, cprp.merge_entries_c) == py
    if s.valid:
        assert py == ("ok", s.expected)
    else:
        assert py[0] in ("nvme", "dma")
        if py[0] == "nvme":
            assert py[2] == Generic.PRP_OFFSET_INVALID


def _chained_case(ps: int = 4096) -> Setup:
    """1024 pages of 4 KiB: PRP1, then a list whose first page chains (511 + pointer, then 512)."""
    l0, l1 = 0x100000, 0x300000
    pages = [0x10000000 + 0x2000 * k for k in range(1023)]  # every other page: no merging
    q = {l0 + 8 * j: pages[j] for j in range(511)}
    q[l0 + 8 * 511] = l1
    q.update({l1 + 8 * j: pages[511 + j] for j in range(512)})
    expected = _merged(pages, (0x8000000, ps), 4 << 20, ps)
    return Setup(ps, 4 << 20, 0x8000000, l0, FakeMemory(q, (0, 0)), True, expected)


def test_chained_list_explicit() -> None:
    s = _chained_case()
    py = outcome(s, cprp.merge_entries_py)
    assert py == ("ok", s.expected) and len(s.expected) == 1024
    if cprp.merge_entries_c is not None:
        assert outcome(s, cprp.merge_entries_c) == py


def test_c_boundary_edges() -> None:
    """Addresses whose sum passes 2^64 never merge; values past 64 bits go to Python."""
    _need_c()
    assert cprp.merge_entries_c is not None
    ps = 4096
    top = (1 << 64) - ps
    for merge in (cprp.merge_entries_py, cprp.merge_entries_c):
        segs = [(top, ps)]
        assert merge(struct.pack("<2Q", 0, ps), 2, ps, 2 * ps, segs) == -1
        assert segs == [(top, ps), (0, 2 * ps)]
        segs = [(1 << 70, 8)]  # not a u64: the C wrapper hands it to Python
        assert merge(struct.pack("<Q", 0x2000), 1, ps, 100, segs) == -1
        assert segs == [(1 << 70, 8), (0x2000, 100)]
        segs = [(0x1000, ps)]
        assert merge(struct.pack("<3Q", 0x2000, 0x3008, 0x4000), 3, ps, 3 * ps, segs) == 1
        segs = [(0x1000, ps)]
        with pytest.raises(struct.error):  # short raw: C never reads past it
            merge(b"\0" * 15, 2, ps, 2 * ps, [(0x1000, ps)])
        raw = bytearray(struct.pack("<Q", 0x2000))  # not bytes: the C wrapper hands it to Python
        assert merge(raw, 1, ps, 10, segs) == -1  # type: ignore[arg-type]
        assert segs == [(0x1000, ps + 10)]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A child Python in the repo; NVME_EMU_NO_CBIND only when given here."""
    e = {k: v for k, v in os.environ.items() if k != build.DISABLE_ENV} | env
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=e,
                          capture_output=True, text=True, timeout=300)


CHECK_FALLBACK = """
    from cbind import build, prp
    from emulator.nvme.prp import prp_segments
    assert prp.BACKEND == "python" and prp.merge_entries is prp.merge_entries_py, prp.BACKEND
    assert prp.merge_entries_c is None
    print(build.why["prp"])
"""


def test_no_cbind_env_uses_python_end_to_end() -> None:
    """NVME_EMU_NO_CBIND=1: the Python loop runs, and the controller's PRP tests pass on it."""
    p = _run(CHECK_FALLBACK, NVME_EMU_NO_CBIND="1")
    assert p.returncode == 0, p.stderr
    assert "NVME_EMU_NO_CBIND" in p.stdout
    t = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "tests/controller/test_io.py", "tests/controller/test_errors.py"],
                       cwd=REPO, env={**os.environ, "NVME_EMU_NO_CBIND": "1"},
                       capture_output=True, text=True, timeout=600)
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-3000:]


def test_no_compiler_falls_back(tmp_path: Path) -> None:
    p = _run(CHECK_FALLBACK, NVME_EMU_CACHE=str(tmp_path), CC="/nonexistent/cc")
    assert p.returncode == 0, p.stderr
    assert "no C compiler" in p.stdout
    assert not list(tmp_path.glob("cbind/*.so"))


def test_failed_compile_falls_back_and_is_not_retried(tmp_path: Path) -> None:
    # `false` is a "compiler" that always fails.
    p = _run(CHECK_FALLBACK, NVME_EMU_CACHE=str(tmp_path), CC="false")
    assert p.returncode == 0, p.stderr
    assert "compile failed" in p.stdout
    assert len(list(tmp_path.glob("cbind/*.failed"))) == 1
    p = _run(CHECK_FALLBACK, NVME_EMU_CACHE=str(tmp_path), CC="false")
    assert p.returncode == 0 and "earlier compile failed" in p.stdout, p.stdout + p.stderr


def test_parallel_first_imports_build_once(tmp_path: Path) -> None:
    """Four processes import cbind.prp into an empty cache at once: the lock makes one build."""
    _need_c()
    code = "from cbind import prp, build; print(prp.BACKEND, build.why['prp'])"
    env = {**os.environ, "NVME_EMU_CACHE": str(tmp_path)}
    env.pop("NVME_EMU_NO_CBIND", None)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for pr in procs:
        out, err = pr.communicate(timeout=300)
        assert pr.returncode == 0 and out.split()[0] == "c", out + err
    assert len(list(tmp_path.glob("cbind/_prp_*.so"))) == 1
    assert not [d for d in (tmp_path / "cbind").iterdir() if d.is_dir()]  # scratch dirs removed


def test_source_change_rebuilds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_c()
    monkeypatch.setenv("NVME_EMU_CACHE", str(tmp_path))
    cdef = "int answer(void);"
    one = build.load("t", cdef, "int answer(void) { return 1; }")
    two = build.load("t", cdef, "int answer(void) { return 2; }")
    assert one is not None and two is not None, build.why
    assert (one[1].answer(), two[1].answer()) == (1, 2)
    assert len(list(tmp_path.glob("cbind/_t_*.so"))) == 2
    again = build.load("t", cdef, "int answer(void) { return 1; }")  # cached: no compile
    assert again is not None and again[1].answer() == 1
