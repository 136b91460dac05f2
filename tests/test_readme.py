"""The README cannot drift: every `dlip-ds` command it shows parses with the real CLI, every recipe,
DeepSpeed config and launcher it names exists. The commands themselves run in the demo and in the
tests of each subcommand (synth/prepare/inspect in test_data_*, train in test_train_runs, evaluate
in test_eval, export/profile in test_checkpoints/test_profile)."""

import re
import shlex
from pathlib import Path

import pytest

from dlip_ds.cli import build_parser
from dlip_ds.models.presets import PRESETS
from dlip_ds.recipe import shipped_recipes

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)


def readme_commands(tool: str) -> list[str]:
    cmds = []
    for block in bash_blocks(README):
        for line in block.splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            for part in re.split(r"\s*&&\s*", line):
                words = shlex.split(part)
                while words and "=" in words[0] and not words[0].startswith("-"):
                    words = words[1:]  # VAR=value prefixes
                if words and words[0] == tool:
                    cmds.append(part)
    return cmds


def test_quickstart_has_exactly_the_two_make_commands():
    quick = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    first = bash_blocks(quick)[0]
    assert [line.split("#")[0].strip() for line in first.strip().splitlines()] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


# the synopsis line (`[--deepspeed DS_JSON] ...`) is documentation, not a command
DLIP_COMMANDS = [c for c in readme_commands("dlip-ds") if "[" not in c]


def test_readme_shows_every_subcommand():
    shown = {shlex.split(c)[1] for c in DLIP_COMMANDS}
    assert {"synth", "prepare", "inspect", "train", "evaluate", "export", "profile"} <= shown


@pytest.mark.parametrize("command", DLIP_COMMANDS)
def test_readme_command_parses(command):
    words = shlex.split(command)[1:]
    args = build_parser().parse_args(words)
    if getattr(args, "config", None) and not args.config.endswith((".yaml", ".yml")):
        assert args.config in shipped_recipes()


def test_named_recipes_configs_and_launchers_exist():
    known = set(shipped_recipes()) | set(PRESETS)
    for name in re.findall(r"`((?:tiny|demo|blip|dlip|test)-[a-z0-9-]+)`", README):
        assert name in known, f"README names '{name}', neither a shipped recipe nor a preset"
    for path in re.findall(r"(launchers/[\w./-]+|ds_configs/)", README):
        assert (ROOT / path.rstrip(".")).exists(), path
    for name in re.findall(r"--deepspeed ([a-z]\w+)", README):
        assert (ROOT / "ds_configs" / f"{name}.json").exists(), name


def test_relative_links_and_images_exist():
    """Every relative link or image in the README (and in the documents it links) points at a file."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for doc in docs:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links to missing {target}"
