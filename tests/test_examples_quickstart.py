"""Smoke test of `examples/quickstart.py` (the `make demo` job): tiny settings, in a subprocess as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "quickstart.py"


def run_quickstart(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_help_lists_the_options():
    result = run_quickstart("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--steps", "--attention", "--output-dir", "--hidden-size", "--layers", "--no-progress"):
        assert option in result.stdout
    assert "{dual_chunk,gqa,hybrid,lightning}" in result.stdout


def test_tiny_run_trains_saves_reloads_and_generates(tmp_path):
    out = tmp_path / "tiny"
    result = run_quickstart(
        "--steps", "3", "--attention", "hybrid", "--layers", "2", "--hidden-size", "32", "--heads", "2",
        "--kv-heads", "1", "--vocab-size", "300", "--seq-len", "32", "--batch-size", "2", "--max-new-tokens", "4",
        "--output-dir", str(out), "--no-progress",
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout
    for marker in ("==> 1/5", "==> 2/5", "==> 3/5", "==> 4/5", "==> 5/5", "held-out loss after training"):
        assert marker in stdout
    assert "step    3/3  train loss" in stdout
    assert "layers ['lightning', 'gqa']" in stdout
    assert "logits identical to the trained model: True" in stdout
    assert "-- greedy" in stdout and "-- sampled" in stdout
    for name in ("config.json", "model.safetensors", "README.md", "modeling_decoder_only.py", "tokenizer.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["attention_types"] == ["lightning", "gqa"] and config["vocab_size"] == 300
    auto_classes = {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"}
    assert set(config["auto_map"]) == auto_classes
