"""The subsystem package imports one way: runtime.py wires the control-socket method groups
(handover, monitor, migration_view), which see the runtime through the RuntimeParts
protocol (emulator/subsystem/parts.py) and never import runtime.py, not even for types."""
from __future__ import annotations

import ast
from pathlib import Path

import emulator.subsystem

PACKAGE = Path(emulator.subsystem.__file__).parent
METHOD_GROUPS = ("handover.py", "monitor.py", "migration_view.py", "parts.py")


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_method_groups_do_not_import_the_runtime() -> None:
    for name in METHOD_GROUPS:
        assert "emulator.subsystem.runtime" not in imported_modules(PACKAGE / name), name


def test_runtime_provides_what_the_method_groups_use(emu) -> None:
    from emulator.subsystem.parts import RuntimeParts
    rt = emu().rt.runtime
    wanted = set(RuntimeParts.__annotations__)
    assert wanted and all(hasattr(rt, name) for name in wanted)
    assert {"status", "stats", "migration", "handover.pause"} <= set(rt.control.methods)
