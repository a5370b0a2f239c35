"""Run a list of shell commands in a guest and collect each one's exit status and output.

The guest's /init (see :mod:`emulator.guest.initramfs`) goes through phases, and
the host waits for each with its own timeout:

* ``boot``: QEMU starts, the kernel boots, /init prints its first marker;
* ``probe``: the NVMe controllers the guest was given reach the ``live`` state and
  the expected namespace block devices appear;
* ``command N``: each command in turn (``sh -c``, stdout and stderr together);
* ``poweroff``: /init prints ``@@DONE`` and QEMU exits.

A phase that does not finish in time kills QEMU (and the emulators the guest was
told about), and :class:`PhaseTimeout` names the phase, e.g. ``command 2
(nvme smart-log /dev/nvme0) did not finish within 60 s``.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence, overload

from emulator.guest.qemu import Guest, GuestError, GuestFailed, GuestResult, GuestTimeout

PROBE_MARKER = "probe"


@dataclass
class CommandResult:
    """One command's exit status and output (stdout and stderr interleaved)."""
    name: str
    command: str
    rc: int
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass
class GuestRun(Sequence[CommandResult]):
    """The commands' results in order; ``run["name"]`` for commands given by name."""
    commands: list[CommandResult]
    result: GuestResult
    probe: str = ""              # "ok", or what the probe phase found missing
    by_name: dict[str, CommandResult] = field(default_factory=dict)

    @overload
    def __getitem__(self, i: int) -> CommandResult: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[CommandResult]: ...
    @overload
    def __getitem__(self, i: str) -> CommandResult: ...

    def __getitem__(self, i):  # type: ignore[no-untyped-def]
        if isinstance(i, str):
            return self.by_name[i]
        return self.commands[i]

    def __len__(self) -> int:
        return len(self.commands)

    def __iter__(self) -> Iterator[CommandResult]:
        return iter(self.commands)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.commands)

    def summary(self) -> str:
        return "\n".join(f"[rc={c.rc}] {c.command}" for c in self.commands)


class PhaseTimeout(GuestTimeout):
    """A guest phase did not finish in time; ``phase`` names it."""

    def __init__(self, phase: str, inner: GuestError) -> None:
        self.phase = phase
        GuestError.__init__(self, "", inner.console_tail, inner.emulator_tails, inner.result)
        self.args = (f"guest phase {phase} hung; QEMU killed\n{inner}",)


class PhaseFailed(GuestFailed):
    """QEMU exited, or the guest reported a failure, during a phase."""

    def __init__(self, phase: str, inner: GuestError | str) -> None:
        self.phase = phase
        if isinstance(inner, GuestError):
            GuestError.__init__(self, "", inner.console_tail, inner.emulator_tails, inner.result)
        else:
            GuestError.__init__(self, "")
        self.args = (f"guest phase {phase} failed: {inner}",)


def normalize(commands: Sequence[str] | Mapping[str, str] | str) -> list[tuple[str, str]]:
    """(name, command) pairs: a mapping keeps its names, a list gets ``cmd1``, ``cmd2``..."""
    if isinstance(commands, str):
        commands = [commands]
    if isinstance(commands, Mapping):
        pairs = [(str(k), str(v)) for k, v in commands.items()]
    else:
        pairs = [(f"cmd{i + 1}", str(c)) for i, c in enumerate(commands)]
    for name, _ in pairs:
        if not name or any(ch.isspace() for ch in name):
            raise ValueError(f"command name {name!r} must be one word")
    return pairs


def body(pairs: Sequence[tuple[str, str]], controllers: int, namespaces: int,
         probe_seconds: int = 60) -> str:
    """The /init body: wait for the controllers and namespaces, then run each command."""
    lines = [
        f"_want_c={controllers}; _want_n={namespaces}; _i=0; _probe=",
        f"while [ $_i -lt {probe_seconds * 10} ]; do",
        "    _c=0; _live=0",
        "    for _d in /sys/class/nvme/nvme*; do",
        "        [ -e \"$_d/state\" ] || continue; _c=$((_c + 1))",
        "        [ \"$(cat $_d/state 2>/dev/null)\" = live ] && _live=$((_live + 1))",
        "    done",
        "    _n=$(ls /sys/block 2>/dev/null | grep -c '^nvme')",
        "    if [ $_live -ge $_want_c ] && [ $_n -ge $_want_n ]; then _probe=ok; break; fi",
        "    sleep 0.1; _i=$((_i + 1))",
        "done",
        "[ -n \"$_probe\" ] || _probe=\"$_live of $_want_c controllers live, $_n of $_want_n namespaces\"",
        f"result {PROBE_MARKER} \"$_probe\"",
    ]
    for name, cmd in pairs:
        lines.append(f"capture {name} sh -c {shlex.quote(cmd)}")
    return "\n".join(lines) + "\n"


def phase_of(guest: Guest, pairs: Sequence[tuple[str, str]]) -> str:
    """The phase the guest is in now, from the markers it printed."""
    seen = {(k, n) for k, n in guest._parser.seen}
    if ("RESULT", "init_uptime_s") not in seen:
        return "boot"
    if ("RESULT", PROBE_MARKER) not in seen:
        return "probe"
    for i, (name, cmd) in enumerate(pairs):
        if ("END", name) not in seen:
            return f"command {i + 1} ({cmd})"
    return "poweroff"


def run_commands(guest: Guest, pairs: Sequence[tuple[str, str]], *, boot_timeout: float = 180.0,
                 probe_timeout: float = 90.0, command_timeout: float = 120.0,
                 poweroff_timeout: float = 60.0) -> GuestRun:
    """Wait for a started guest (its /init from :func:`body`) phase by phase."""
    steps: list[tuple[str, str, float]] = [("RESULT", "init_uptime_s", boot_timeout),
                                           ("RESULT", PROBE_MARKER, probe_timeout)]
    steps += [("END", name, command_timeout) for name, _ in pairs]
    for kind, name, timeout in steps:
        phase = phase_of(guest, pairs)
        try:
            guest.wait_for(kind, name, timeout=timeout)
        except GuestTimeout as e:
            raise PhaseTimeout(f"{phase} did not finish within {timeout:.0f} s", e) from None
        except GuestFailed as e:
            raise PhaseFailed(phase, e) from None
    try:
        res = guest.wait(timeout=poweroff_timeout, check=False)
    except GuestTimeout as e:
        raise PhaseTimeout(f"poweroff did not finish within {poweroff_timeout:.0f} s", e) from None
    if not res.done:
        raise PhaseFailed("poweroff", guest.error(GuestFailed, "guest ended without @@DONE"))
    out = [CommandResult(name, cmd, res.output_rc.get(name, -1), res.outputs.get(name, ""))
           for name, cmd in pairs]
    return GuestRun(out, res, res.results.get(PROBE_MARKER, ""), {c.name: c for c in out})
