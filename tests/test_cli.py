import subprocess
import sys

import pytest

from dlip_ds.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand():
    out = subprocess.run([sys.executable, "-m", "dlip_ds.cli", "--help"], capture_output=True, text=True, check=True)
    for name in ("synth", "prepare", "inspect", "train", "evaluate", "export", "profile", "demo", "study"):
        assert name in out.stdout
    assert set(SUBCOMMANDS) == {"synth", "prepare", "inspect", "train", "evaluate", "export", "profile", "demo", "study"}


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert name in capsys.readouterr().out
