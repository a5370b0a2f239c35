"""The soak: fuzzing, SIGKILLs and disk-full cycles against one emulator, for a given time.

    python3 -m emulator.reliability.soak --minutes 30 [--seed 1] [--fs-size 24m]

(``bash scripts/soak MINUTES`` runs it.)  One ``emulator serve`` child with two
controllers, each with its own 64 MiB namespace, its state directory on a
small tmpfs (as root; otherwise on /tmp, without disk-full cycles).  Rounds,
each with the next seed, until the time is up:

1. protocol fuzz on controller 1 (2000 inputs);
2. command fuzz on controller 1 (1000 commands) while controller 2 is read;
3. kill: 4 KiB writes to the first 8 MiB of namespace 2 through
   controller 2, SIGKILL of the whole emulator after a random number of
   them, restart, and every acknowledged write must read back (a killed
   emulator loses nothing);
4. disk full: namespace 1 is written until the file system is full
   (Capacity Exceeded is the only acceptable refusal), then deallocated
   again (every other round it stays full: the next round's fuzzing and
   kill cycle run on a full file system), and namespace 2's acknowledged
   writes must still read back.

After every phase the emulator must be alive and answer on both sockets.
Prints one line per phase, the totals (inputs, kills, cycles, fd and RSS
range) and every failure with its seed; exits 1 if there was any.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from emulator.reliability.fuzz import command_fuzz, protocol_fuzz, server_answers
from emulator.reliability.target import Target

LBA = 512
# The kill cycles write into the first 8 MiB of namespace 2 only: what they leave there stays (it
# is read back after every kill) and must not fill the soak's small file system for good.
KILL_LBAS = (8 << 20) // LBA


@dataclass
class Totals:
    rounds: int = 0
    protocol_inputs: int = 0
    commands: int = 0
    kills: int = 0
    acked_writes: int = 0
    verified_reads: int = 0
    full_cycles: int = 0
    capacity_exceeded: int = 0
    fds: list[int] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _host(sock: str):  # type: ignore[no-untyped-def]
    from emulator.host.driver import NvmeHost
    from emulator.host.memory import HostMemory
    from emulator.host.transport import VfioUserTransport
    from emulator.vfio_user.client import VfioUserClient
    h = NvmeHost(VfioUserTransport(VfioUserClient(sock), HostMemory(8 << 20)))
    h.init(io_queues=1)
    return h


def _verify(t: Target, model: dict[int, bytes], totals: Totals, seed: int, what: str) -> None:
    h = _host(t.sockets[1])
    try:
        for lba, data in model.items():
            c = h.read(2, lba, len(data) // LBA)
            totals.verified_reads += 1
            if not c.ok or c.data != data:
                totals.failures.append(f"seed {seed} {what}: acknowledged write at LBA {lba} lost ({c})")
                return
    finally:
        h.close()


def _kill_cycle(t: Target, rng: random.Random, model: dict[int, bytes], totals: Totals, seed: int) -> None:
    h = _host(t.sockets[1])
    n = rng.randrange(10, 300)
    for _ in range(n):
        lba = rng.randrange(KILL_LBAS // 8) * 8
        data = rng.randbytes(4096)
        c = h.write(2, lba, data)
        if c.ok:
            model[lba] = data
            totals.acked_writes += 1
    t.kill()  # no flush, no goodbye: SIGKILL of the process group
    totals.kills += 1
    t.start()
    _verify(t, model, totals, seed, "after SIGKILL")


def _lba_size(h, nsid: int) -> int:  # type: ignore[no-untyped-def]
    """The namespace's LBA size now (the command fuzzer may have formatted it)."""
    data = h.identify(cns=0, nsid=nsid)
    return 1 << data[128 + 4 * (data[26] & 0xF) + 2]  # LBAF[FLBAS].LBADS (NVM CS Figure 114)


def _full_cycle(t: Target, rng: random.Random, model: dict[int, bytes], totals: Totals, seed: int,
                stay_full: bool) -> None:
    """Fill the file system through namespace 1, then deallocate it, unless ``stay_full``:
    then the next round's fuzzing and kill cycle run on a full file system (this cycle
    finds it full at once and deallocates)."""
    from emulator.nvme.spec import Generic
    h = _host(t.sockets[0])
    try:
        lba_size = _lba_size(h, 1)
        nsze = (64 << 20) // lba_size
        per_mib, per_4k = (1 << 20) // lba_size, max(1, 4096 // lba_size)
        for i in range(1 << 16):  # 4 KiB per 1 MiB stride, then the gaps: each a new page
            lba = (i * per_mib + (i >> 7) * per_4k) % nsze
            c = h.write(1, lba, rng.randbytes(4096), lba_size=lba_size)
            if c.ok:
                continue
            if (c.sct, c.sc) != (0, Generic.CAPACITY_EXCEEDED):
                totals.failures.append(f"seed {seed} disk full: write refused with {c}, not Capacity Exceeded")
            else:
                totals.capacity_exceeded += 1
            break
        else:
            totals.failures.append(f"seed {seed} disk full: the file system never filled up")
        if not stay_full:
            step = 65536
            if not h.deallocate(1, [(k, min(step, nsze - k)) for k in range(0, nsze, step)]).ok:
                totals.failures.append(f"seed {seed} disk full: deallocating namespace 1 failed")
            if not h.flush(1).ok:
                totals.failures.append(f"seed {seed} disk full: flush after deallocation failed")
        totals.full_cycles += 1
    finally:
        h.close()
    _verify(t, model, totals, seed, "after disk full")


def _check(t: Target, totals: Totals, seed: int, phase: str) -> bool:
    if not t.alive():
        totals.failures.append(f"seed {seed} {phase}: the emulator died\n{t.log_tail()}")
        return False
    for s in t.sockets:
        if not server_answers(s):
            totals.failures.append(f"seed {seed} {phase}: {s} does not answer\n{t.log_tail()}")
            return False
    totals.fds.append(t.fds())
    totals.rss_kib.append(t.rss_kib())
    return True


def _mount_tmpfs(size: str) -> tuple[Path | None, str]:
    d = Path(tempfile.mkdtemp(prefix="ne-soak-fs-"))
    if os.geteuid() != 0:
        return None, "not root: no small tmpfs, no disk-full cycles"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode:
        return None, f"mount -t tmpfs failed ({r.stderr.strip()}): no disk-full cycles"
    return d, ""


def soak(minutes: float, seed: int, fs_size: str, out=sys.stdout) -> Totals:  # type: ignore[no-untyped-def]
    totals = Totals()
    deadline = time.monotonic() + minutes * 60
    fs, why = _mount_tmpfs(fs_size)
    if why:
        print(why, file=out, flush=True)
    t = Target(fs / "state" if fs else None)
    model: dict[int, bytes] = {}
    try:
        t.start()
        while time.monotonic() < deadline and len(totals.failures) < 20:
            s = seed + totals.rounds
            rng = random.Random(s)
            t0 = time.monotonic()
            st = protocol_fuzz(t.sockets[0], s, 2000)
            totals.protocol_inputs += st.inputs
            totals.failures += st.failures
            if not _check(t, totals, s, "protocol fuzz"):
                break
            st2 = command_fuzz(t.sockets[0], s, 1000, other=t.sockets[1])
            totals.commands += st2.inputs
            totals.failures += st2.failures
            if not _check(t, totals, s, "command fuzz"):
                break
            _kill_cycle(t, rng, model, totals, s)
            if not _check(t, totals, s, "kill"):
                break
            if fs is not None:
                _full_cycle(t, rng, model, totals, s, stay_full=totals.rounds % 2 == 1)
                if not _check(t, totals, s, "disk full"):
                    break
            totals.rounds += 1
            print(f"round {totals.rounds} (seed {s}, {time.monotonic() - t0:.1f} s): {st.summary()}; "
                  f"{st2.inputs} commands; kills {totals.kills}, full cycles {totals.full_cycles}, "
                  f"fds {totals.fds[-1]}, rss {totals.rss_kib[-1]} KiB, failures {len(totals.failures)}",
                  file=out, flush=True)
    except Exception as e:  # noqa: BLE001 - the soak reports, it does not crash
        totals.failures.append(f"seed {seed + totals.rounds}: soak driver error {type(e).__name__}: {e}\n"
                               f"{t.log_tail()}")
    finally:
        t.stop()
        if fs is not None:
            subprocess.run(["umount", "-l", str(fs)], check=False)
            shutil.rmtree(fs, ignore_errors=True)
        shutil.rmtree(t.config_path.parent, ignore_errors=True)
    return totals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="soak", description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fs-size", default="24m", help="size of the tmpfs holding the state directory")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    totals = soak(a.minutes, a.seed, a.fs_size)
    fds = f"{min(totals.fds)}..{max(totals.fds)}" if totals.fds else "-"
    rss = f"{min(totals.rss_kib) // 1024}..{max(totals.rss_kib) // 1024} MiB" if totals.rss_kib else "-"
    print(f"soak: {(time.monotonic() - t0) / 60:.1f} min, {totals.rounds} rounds from seed {a.seed}: "
          f"{totals.protocol_inputs} protocol inputs, {totals.commands} commands, {totals.kills} SIGKILLs, "
          f"{totals.acked_writes} acknowledged writes ({totals.verified_reads} read back), "
          f"{totals.full_cycles} disk-full cycles ({totals.capacity_exceeded} Capacity Exceeded), "
          f"emulator fds {fds}, RSS {rss}, {len(totals.failures)} failures")
    for f in totals.failures:
        print("FAILURE:", f)
    return 1 if totals.failures else 0


if __name__ == "__main__":
    sys.exit(main())
