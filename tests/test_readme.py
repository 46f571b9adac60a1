"""README.md's code runs as written.

- Every ```python block is run in a fresh interpreter (a subprocess, in an empty folder). The one
  placeholders a block may hold are replaced first (:data:`PLACEHOLDERS`): ``"path/to/checkpoint"``
  becomes a tiny checkpoint this test writes (``V4Config.tiny()``, seeded weights, transformers'
  names, one shard and ``config.json``). A block with another ``path/to/`` placeholder fails
  until it is added here. A block that opens ``"tiny-v4"`` finds the tiny text checkpoint the
  README's bash block writes (``tests/checkpoints.py``: weights and a tokenizer) in its folder. A
  block written for torchrun (``parallel.init(``) runs with the environment torchrun gives a
  single process.
- Every ```bash block must parse (``bash -n``): running them is too costly here (the two
  quick-start commands, install and test suite, are what CI runs).
- Every ``dsv4rs ...`` command line of the README (in bash blocks and inline code) must be
  accepted by the command's argument parser (nothing is run).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
PLACEHOLDERS = {'"path/to/checkpoint"': "checkpoint"}
"""Placeholder (as written in a block) -> what replaces it: ``"checkpoint"``, a tiny checkpoint."""


def blocks(language: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of every fenced block of ``language`` in README.md."""
    found, lines = [], README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{language}":
            start = i + 1
            i += 1
            while lines[i].strip() != "```":
                i += 1
            found.append((start + 1, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return found


def _tiny_checkpoint(path: Path) -> str:
    from checkpoints import write_hf

    from dsv4rs.model import DeepseekV4, V4Config, init_random

    write_hf(init_random(DeepseekV4(V4Config.tiny()), seed=0), path)
    return str(path)


def test_readme_has_the_blocks_this_test_expects() -> None:
    assert len(blocks("python")) >= 2 and len(blocks("bash")) >= 2


@pytest.mark.parametrize("line", [line for line, _ in blocks("python")], ids=lambda line: f"README.md:{line}")
def test_python_block_runs(line: int, tmp_path) -> None:
    code = dict(blocks("python"))[line]
    for placeholder, what in PLACEHOLDERS.items():
        if placeholder in code:
            assert what == "checkpoint"
            code = code.replace(placeholder, repr(_tiny_checkpoint(tmp_path / "checkpoint")))
    assert "path/to/" not in code, f"README.md:{line}: a placeholder this test does not know (see PLACEHOLDERS)"
    if '"tiny-v4"' in code:  # written by the README's bash block just above it
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from checkpoints import write_checkpoint

        write_checkpoint(str(tmp_path / "tiny-v4"))
    env = dict(os.environ, TQDM_DISABLE="1")
    if "parallel.init(" in code:  # written for torchrun: run it as torchrun would start one process
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, f"README.md:{line} failed:\n{out.stdout}\n{out.stderr}"


@pytest.mark.parametrize("line", [line for line, _ in blocks("bash")], ids=lambda line: f"README.md:{line}")
def test_bash_block_parses(line: int) -> None:
    code = dict(blocks("bash"))[line]
    out = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"README.md:{line}: {out.stderr}"


def _commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, as words: split at ``;``, ``&&``, ``||``, ``|`` and
    ``&`` outside quotes, comments dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token and set(token) <= set(";&|"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _command_lines() -> list[str]:
    """Every ``dsv4rs ...`` command line of the README: in bash blocks and in inline code."""
    text = README.read_text(encoding="utf-8")
    found = []
    for _, code in blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            for words in _commands(line):
                for i, w in enumerate(words):
                    if os.path.basename(w) == "dsv4rs":
                        found.append(shlex.join(["dsv4rs", *words[i + 1 :]]))
    found += re.findall(r"`(dsv4rs (?:[a-z-][^`]*))`", text)
    return sorted(set(found))


def test_command_lines_parse() -> None:
    from dsv4rs import cli

    lines = _command_lines()
    assert "dsv4rs demo" in lines and "dsv4rs demo --device cpu" in lines and "dsv4rs plan --gpus 2" in lines
    parser, subs = cli._parser()
    for line in lines:
        args = shlex.split(line)[1:]
        if len(args) == 1 and not args[0].startswith("-"):  # a command named in prose: `dsv4rs generate`
            assert args[0] in subs, f"README: {line!r} names no command"
            continue
        if any(re.search(r"[A-Z]{2,}", a) for a in args):  # a placeholder such as COMMAND or FILE.png
            continue
        try:
            parser.parse_args(args)
        except SystemExit as e:
            assert e.code == 0, f"README: {line!r} is not a valid command line"
