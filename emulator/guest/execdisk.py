"""An ext4 disk of programs for the page-cache churn test (issue 16, stale TCG code).

Several different dynamically linked programs from the tool-box root, their
loader and libraries go on an ext4 file system made with ``mke2fs -d`` (no
mount).  The guest runs them through the loader *on the disk*, so the code of
program, loader and libraries all comes from pages the device filled.  Each
command's expected output is taken by running the same binaries on the host
(through the same loader and libraries).

:func:`churn_script` is the guest side: drop caches, run every program several
times in a rotating order (the page cache then gives a freed page of one
program to the next), fill memory, and again; a run whose output differs is a
failure (stale translated code runs the old program's instructions).
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from emulator.guest.env import GuestEnv
from emulator.guest.initramfs import LIB_DIRS, elf_deps

# (program, arguments): deterministic output, different code paths in each binary
COMMANDS: list[tuple[str, list[str]]] = [
    ("expr", ["6", "*", "7"]),
    ("seq", ["-s", ",", "1", "25"]),
    ("factor", ["1001", "65537", "600851475143"]),
    ("md5sum", ["abc"]),
    ("sha256sum", ["abc"]),
    ("sha1sum", ["abc"]),
    ("base64", ["abc"]),
    ("cksum", ["abc"]),
    ("sort", ["-r", "words"]),
    ("tr", ["--version"]),
    ("od", ["-A", "x", "-t", "x1z", "abc"]),
    ("date", ["-u", "-d", "@1000000000", "+%Y-%m-%dT%H:%M:%S"]),
]
DATA = {"abc": b"abc\n", "words": b"delta\nalpha\ncharlie\nbravo\n"}
LOADER = "/lib64/ld-linux-x86-64.so.2"


def _find_lib(root: Path, name: str) -> Path:
    for d in LIB_DIRS:
        p = root / d.lstrip("/") / name
        if p.exists():
            return p
    raise FileNotFoundError(f"{name} not in the tool-box root")


def build_tree(env: GuestEnv, out: Path) -> dict[str, str]:
    """Fill ``out`` with bin/, lib/, the loader and data/; return command line -> expected output."""
    root = env.root
    (out / "bin").mkdir(parents=True)
    (out / "lib").mkdir()
    (out / "data").mkdir()
    libs: set[str] = set()
    for prog, _ in COMMANDS:
        src = root / "usr/bin" / prog
        shutil.copy2(src, out / "bin" / prog)
        deps = elf_deps(src)
        libs.update(deps.needed if deps else [])
    todo = sorted(libs)
    while todo:  # libraries of libraries
        name = todo.pop()
        deps = elf_deps(_find_lib(root, name))
        for more in (deps.needed if deps else []):
            if more not in libs:
                libs.add(more)
                todo.append(more)
    for name in libs:
        shutil.copy2(_find_lib(root, name), out / "lib" / name)
    shutil.copy2(env.loader, out / "lib" / "ld.so")
    for name, data in DATA.items():
        (out / "data" / name).write_bytes(data)
    expected: dict[str, str] = {}
    for prog, args in COMMANDS:
        argv = [str(out / "lib/ld.so"), "--library-path", str(out / "lib"), str(out / "bin" / prog), *args]
        r = subprocess.run(argv, cwd=out / "data", capture_output=True, env={"LC_ALL": "C", "TZ": "UTC"},
                           check=True)
        expected[shlex.join([prog, *args])] = r.stdout.decode()
    return expected


def churn_script(mount: str, expected: dict[str, str], rounds: int, runs: int, fill_mb: int) -> str:
    """Guest /init body: runs, failures and elapsed seconds as @@RESULT lines."""
    lines = [f"M={mount}", "export LC_ALL=C TZ=UTC",
             'run() { (cd $M/data && $M/lib/ld.so --library-path $M/lib $M/bin/"$@"); }',
             "runs=0; bad=0; t0=$(cut -d' ' -f1 /proc/uptime)"]
    cmds = list(expected.items())
    for i, (cmd, out) in enumerate(cmds):
        lines.append(f"exp{i}={shlex.quote(out.rstrip(chr(10)))}")
    lines.append("r=0")
    lines.append(f"while [ $r -lt {rounds} ]; do")
    lines.append("  sync; echo 3 > /proc/sys/vm/drop_caches")
    lines.append(f"  i=$r; n=0; while [ $n -lt {len(cmds)} ]; do")
    lines.append(f"    i=$(( (i + 1) % {len(cmds)} ))")
    lines.append("    case $i in")
    for i, (cmd, _) in enumerate(cmds):
        lines.append(f"      {i}) c={shlex.quote(cmd)}; e=$exp{i} ;;")
    lines.append("    esac")
    lines.append(f"    k=0; while [ $k -lt {runs} ]; do")
    lines.append('      out=$(eval run $c 2>&1); rc=$?; runs=$((runs + 1))')
    lines.append('      if [ $rc -ne 0 ] || [ "$out" != "$e" ]; then bad=$((bad + 1));'
                 ' echo "@@RESULT bad_${r}_${i}_${k}=rc=$rc $(echo "$out" | head -c 200 | tr "\\n" " ")"; fi')
    lines.append("      k=$((k + 1))")
    lines.append("    done")
    lines.append("    n=$((n + 1))")
    lines.append("  done")
    lines.append(f"  dd if=/dev/zero of=/tmp/fill bs=1M count={fill_mb} 2>/dev/null; rm -f /tmp/fill")
    lines.append("  r=$((r + 1))")
    lines.append("done")
    lines.append('result runs $runs; result bad $bad')
    lines.append("result seconds $(awk -v a=$t0 -v b=$(cut -d' ' -f1 /proc/uptime) 'BEGIN {print b - a}')")
    return "\n".join(lines) + "\n"
