"""Every ``normlab-train`` command line in README.md and docs/ composes, so the documentation cannot go stale
silently. A sweep's command composes its first job; a line with a placeholder (``...``) is not a command."""

from __future__ import annotations

import re
import shlex

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from normlab.train import CONFIG_DIR
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p"}


def command_lines(text: str) -> list[str]:
    """The ``normlab-train`` commands of a Markdown file: in fenced blocks (continuation lines joined, comments
    dropped) and in inline code."""
    found = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found += [part for part in re.split(r"&&|;|&(?!&)", line.split(" # ")[0]) if "normlab-train " in part]
    found += re.findall(r"`((?:[A-Z_]+=\S+ )*normlab-train [^`]+)`", text)
    return [" ".join(line.split()) for line in found if "..." not in line]


def overrides(command: str) -> list[str]:
    """The overrides of a command line, a sweep's first value for each swept key."""
    words = shlex.split(command)
    words = words[words.index("normlab-train") + 1:]
    args, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in FLAGS_WITH_VALUE:
            skip = True
        elif not word.startswith("-"):
            args.append(word)
    firsts = []
    for arg, parsed in zip(args, OverridesParser.create().parse_overrides(args)):
        if parsed.is_sweep_override():
            first = next(iter(parsed.sweep_string_iterator()))
            arg = f"{arg.split('=', 1)[0]}={first}"
        firsts.append(arg)
    return firsts


COMMANDS = sorted({(path.relative_to(REPO).as_posix(), line) for path in DOCS for line in command_lines(path.read_text())})


def test_the_docs_show_commands():
    files = {f for f, _ in COMMANDS}
    assert "README.md" in files and "docs/scaling-out.md" in files and len(COMMANDS) > 20


@pytest.mark.parametrize("where, command", COMMANDS)
def test_every_documented_command_composes(where, command):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides(command), return_hydra_config=True)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    assert OmegaConf.to_container(job, resolve=True)["name"]
