"""Lazy cffi API-mode builds: compile a small C module at first import, cache it.

``load(name, cdef, source)`` returns ``(ffi, lib)`` of a compiled module, or
``None`` with the reason in ``why``.  It never raises: every caller has a
pure-Python fallback, and an import must not fail because of a C build.

- The module name carries a hash of the C source, the cdef, cffi's version
  and the interpreter tag, so editing the C source rebuilds it and stale
  builds are never loaded.
- Built modules live in ``$NVME_EMU_CACHE/cbind`` (default
  ``~/.cache/nvme-emu/cbind``, the cache ``scripts/setup`` uses), outside the
  tree.
- The compile runs in a child Python (cffi + setuptools/distutils + the
  machine's C compiler), under an exclusive file lock, into a scratch
  directory; the finished ``.so`` is renamed into place.  Parallel test
  processes thus wait for one build and never see a partial file.
- No compiler: the fallback is used, with no attempt.  A failed compile
  leaves ``<module>.failed`` (the compiler's output) and is not retried for
  the same source; remove that file to retry.
- ``NVME_EMU_NO_CBIND=1`` skips the build: the pure-Python fallbacks run.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

DISABLE_ENV = "NVME_EMU_NO_CBIND"

# The reason each name fell back to Python ("" when its C module loaded).
why: dict[str, str] = {}

_CHILD = r"""
import json, sys
import cffi
a = json.load(sys.stdin)
ffi = cffi.FFI()
ffi.cdef(a["cdef"])
ffi.set_source(a["module"], a["source"])
print(ffi.compile(tmpdir=a["tmpdir"], verbose=False))
"""


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def cache_dir() -> Path:
    base = os.environ.get("NVME_EMU_CACHE") or str(Path.home() / ".cache" / "nvme-emu")
    return Path(base) / "cbind"


def compiler() -> str | None:
    """The C compiler distutils would run ($CC, else Python's build CC), if on PATH."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    argv = cc.split()
    return shutil.which(argv[0]) if argv else None


def module_name(name: str, cdef: str, source: str) -> str:
    import cffi  # type: ignore[import-untyped]

    h = hashlib.sha256()
    for part in (cdef, source, cffi.__version__, sys.implementation.cache_tag or "", sys.platform):
        h.update(part.encode() + b"\0")
    return f"_{name}_{h.hexdigest()[:16]}"


def _import(module: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(module, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _compile(module: str, cdef: str, source: str, directory: Path, target: Path) -> None:
    """Build in a scratch directory with a child Python; rename the .so to ``target``."""
    with tempfile.TemporaryDirectory(prefix=module + ".", dir=directory) as tmp:
        args = {"module": module, "cdef": cdef, "source": source, "tmpdir": tmp}
        p = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(args), text=True,
                           capture_output=True, timeout=300, cwd=tmp)
        built = Path(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 and p.stdout.strip() else None
        if built is None or not built.is_file():
            log = f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
            (directory / f"{module}.failed").write_text(log)
            raise RuntimeError(f"compile failed (log in {directory / (module + '.failed')}): "
                               f"{p.stderr.strip().splitlines()[-1:] or p.returncode}")
        os.replace(built, target)


def load(name: str, cdef: str, source: str) -> tuple[Any, Any] | None:
    """``(ffi, lib)`` of the compiled module ``name``, or None (reason in ``why[name]``)."""
    try:
        if disabled():
            raise RuntimeError(f"{DISABLE_ENV} is set")
        module = module_name(name, cdef, source)
        directory = cache_dir()
        target = directory / (module + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
        if not target.is_file():
            failed = directory / f"{module}.failed"
            if failed.is_file():
                raise RuntimeError(f"an earlier compile failed (see {failed}; remove it to retry)")
            if compiler() is None:
                raise RuntimeError("no C compiler on PATH")
            directory.mkdir(parents=True, exist_ok=True)
            with open(directory / f"{module}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                if failed.is_file():
                    raise RuntimeError(f"compile failed in another process (see {failed})")
                if not target.is_file():
                    _compile(module, cdef, source, directory, target)
        mod = _import(module, target)
        why[name] = ""
        return mod.ffi, mod.lib
    except Exception as e:  # any failure means: use the Python fallback
        why[name] = f"{type(e).__name__}: {e}"
        return None
