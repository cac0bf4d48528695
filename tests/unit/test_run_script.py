"""The `./run` entry script: every verb it documents is handled, and every module it runs exists."""

import importlib.util
import re
import subprocess
from pathlib import Path

RUN = Path(__file__).resolve().parents[2] / "run"


def test_every_module_run_names_exists() -> None:
    modules = re.findall(r'"\$PY" -m ([\w.]+)', RUN.read_text())
    assert {"pytest", "vm.demo", "freeze.build", "bench.run"} <= set(modules)
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert missing == []


def test_every_documented_verb_has_a_case() -> None:
    text = RUN.read_text()
    documented = re.findall(r"^#   \./run (\w+)", text, re.M)
    assert documented == ["setup", "test", "lint", "demo", "binary", "bench", "deb"]
    cases = re.findall(r"^  (\w+)\) ", text, re.M)
    assert cases == documented


def test_unknown_verb_prints_usage_and_fails() -> None:
    done = subprocess.run(["bash", str(RUN), "no-such-verb"], capture_output=True, text=True)
    assert done.returncode == 1
    assert "./run binary" in done.stdout
