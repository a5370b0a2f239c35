"""`nvme-emu` subcommand table: a subcommand that cannot load says why."""
from __future__ import annotations

import pytest

from emulator import cli


def test_unimportable_subcommand_reports_instead_of_vanishing(monkeypatch, capsys) -> None:
    monkeypatch.setitem(cli.SUBCOMMANDS, "broken", ("emulator.no_such_module", "a broken one"))
    assert cli.main(["broken"]) == 2
    err = capsys.readouterr().err
    assert "nvme-emu broken: emulator.no_such_module cannot be imported" in err
    with pytest.raises(SystemExit):  # the others still parse
        cli.main(["serve", "--help"])
