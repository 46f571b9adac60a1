"""The package's layering: the model path never loads the float64 reference, the config and the
cost model never load torch, and every documentation reference in the sources resolves."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_running_the_model_does_not_load_the_reference() -> None:
    code = """
import sys
import torch
from dsv4rs.model import DeepseekV4, V4Config, init_random
from dsv4rs.runtime import Engine
model = init_random(DeepseekV4(V4Config.tiny()), seed=0)
for quant in (False, True):
    engine = Engine(model, max_sequences=1, max_len=300, quant=quant)
    seq, _ = engine.add_sequence()
    engine.step([seq], [list(range(260))])
    engine.draft([5])
    engine.step([seq], [[5]])
    engine.draft([7])
print(sorted(m for m in sys.modules if m.startswith("dsv4rs.reference")))
"""
    assert _run(code) == "[]"


def test_config_and_cost_model_do_not_load_torch() -> None:
    code = """
import sys
from dsv4rs import cost
from dsv4rs.model import V4Config
cfg = V4Config.v4_flash()
assert len(cfg.inv_freq(True)) == 32
cost.compare()
print('torch' in sys.modules)
"""
    assert _run(code) == "False"


SOURCES = [p for d in ("python", "rust", "cuda", "tests", "benches", "scripts") for p in (ROOT / d).rglob("*")
           if p.suffix in (".py", ".pyi", ".rs", ".cu", ".cuh", ".sh", ".toml")] + [ROOT / "README.md"]
DOC_REF = re.compile(r"docs/([\w./-]+\.md)(?:\s+sections?\s+(\d+)(?:\s*-\s*(\d+))?)?")


def test_every_doc_reference_resolves() -> None:
    """``docs/<file>.md`` names a file of the repository; ``docs/<file>.md section N`` (or
    ``sections N-M``) names headings ``## N.`` of that file."""
    checked = 0
    for path in SOURCES:
        text = path.read_text(encoding="utf-8")
        for m in DOC_REF.finditer(text):
            doc = ROOT / "docs" / m.group(1).rstrip(".")
            where = f"{path.relative_to(ROOT)}: {m.group(0)}"
            assert doc.is_file(), where
            if m.group(2):
                headings = set(re.findall(r"^## (\d+)\. ", doc.read_text(encoding="utf-8"), re.M))
                for n in range(int(m.group(2)), int(m.group(3) or m.group(2)) + 1):
                    assert str(n) in headings, where
            checked += 1
    assert checked > 50, f"only {checked} doc references found"


def test_no_reference_to_files_outside_the_repository() -> None:
    outside = re.compile(r"\b(SPEC|DESIGN|STYLE)\.md\b")
    for path in SOURCES:
        assert not outside.search(path.read_text(encoding="utf-8")), path.relative_to(ROOT)
