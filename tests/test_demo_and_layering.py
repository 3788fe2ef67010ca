"""The demo runs end to end under torchrun, and the package keeps its layering rules."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run_demo(nproc, tp, iters=60):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(ROOT / "examples" / "tp_demo.py"),
           f"--tensor-model-parallel-size={tp}", f"--train-iters={iters}", "--log-interval=20"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("nproc, tp", [(2, 2), (4, 2)])
def test_demo_trains_and_matches_tp1(nproc, tp):
    out = _run_demo(nproc, tp)
    assert f"tensor-model-parallel size {tp}, data-parallel size {nproc // tp}" in out
    assert "difference 0.0e+00" in out
    match = re.search(r"loss went from ([\d.]+) .* to ([\d.]+) in", out)
    first, last = float(match.group(1)), float(match.group(2))
    assert last < first - 1.0, out
    assert "sample: " in out


STDLIB = set(sys.stdlib_module_names)

# package -> (third-party modules it may import, megatron packages it may import). Arrows point
# down only: mpu <- model; mpu <- tokenizer <- data; training and tasks sit above them all.
LAYERS = {
    "mpu": ({"torch"}, {"mpu"}),
    "model": ({"torch"}, {"mpu", "model"}),
    "tokenizer": ({"regex", "sentencepiece", "numpy"}, {"tokenizer"}),
    "data": ({"numpy", "torch", "regex", "sentencepiece", "nltk"}, {"mpu", "tokenizer", "data"}),
    "training": ({"numpy", "torch", "apex"}, {"mpu", "model", "data", "tokenizer", "training"}),
    # checkpoint tools: above training (its checkpoint layout and errors), below tasks/tools.
    "checkpoint": ({"torch", "safetensors"},
                   {"mpu", "model", "tokenizer", "training", "checkpoint"}),
    # tasks/ is a top-level package (tasks/main.py is Megatron-LM's entry point) above training.
    "tasks": ({"numpy", "torch", "tasks"},
              {"mpu", "model", "data", "tokenizer", "training", "checkpoint"}),
}


def _package_dir(package):
    return ROOT / package if package == "tasks" else ROOT / "megatron" / package


def _imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            if node.module == "megatron":  # from megatron import mpu
                yield from (f"megatron.{alias.name}" for alias in node.names)
            else:
                yield node.module


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_packages_import_only_the_layers_below_them(package):
    third_party, own = LAYERS[package]
    for path in sorted(_package_dir(package).rglob("*.py")):
        for name in _imports(path):
            parts = name.split(".")
            if parts[0] == "megatron":
                assert len(parts) > 1 and parts[1] in own, f"{package}/{path.name} imports {name}"
            else:
                assert parts[0] in STDLIB or parts[0] in third_party, (
                    f"{package}/{path.name} imports {name}")


def test_library_code_is_device_agnostic_and_does_not_print():
    for path in sorted([*(ROOT / "megatron").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]):
        text = path.read_text()
        assert ".cuda()" not in text, path
        assert "torch.cuda.current_device" not in text, path
        assert not re.search(r"^\s*print\(", text, re.M), f"{path} prints; use logging"
