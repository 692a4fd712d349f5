"""Hub export: the saved folder loads with transformers alone and reproduces the model bit for bit.

The decisive test runs a child Python (`-I -S`: no PYTHONPATH, no user site, no `.pth` files, so neither the editable
install of this project nor the repository is importable; a fresh HF_HOME; HF_HUB_OFFLINE=1) that loads the folder
through every Auto class with `trust_remote_code=True` and compares against tensors saved by this process.
"""

import contextlib
import importlib.util
import json
import re
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from transformers.dynamic_module_utils import get_relative_import_files

from modeling import (
    DecoderOnlyConfig,
    DecoderOnlyForCausalLM,
    DecoderOnlyForSequenceClassification,
    DecoderOnlyModel,
)
from modeling import hub
from modeling.hub import export_for_hub, hub_auto_map, hub_code_files, render_model_card
from modeling.tokenization import train_tokenizer


ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "village_tales.txt"
VOCAB = 320
SMALL = dict(
    vocab_size=VOCAB, hidden_size=32, num_heads=4, num_kv_heads=2, dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2
)
CONFIGS = {
    "gqa": dict(SMALL, num_layers=2),
    "gqa_embed_yarn_irope": dict(
        SMALL, num_layers=3, embed_dim=24, yarn=True, yarn_scale=4, yarn_original_max_position=16, interleave_rope=True
    ),
    "lightning": dict(SMALL, num_layers=2, attention_type="lightning", block_size=4),
    "dual_chunk": dict(SMALL, num_layers=2, attention_type="dual_chunk", chunk_size=8, local_size=2),
    "hybrid": dict(
        SMALL, num_layers=3, attention_types=["lightning", "gqa", "dual_chunk"], block_size=4, chunk_size=8, local_size=2
    ),
}
PROMPT = "The baker woke before the sun and lit the fire in his oven."


def config_params() -> list:
    """One pytest param per layout."""
    return [pytest.param(name, id=name) for name in CONFIGS]


@contextlib.contextmanager
def single_thread():
    """One intra-op thread, as in the child: bit-exact comparisons must not depend on the reduction split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(files=[DATA], vocab_size=VOCAB)


def build_model(name: str, cls=DecoderOnlyForCausalLM):
    torch.manual_seed(0)
    return cls(DecoderOnlyConfig(**CONFIGS[name])).eval()


def batch(tokenizer) -> dict[str, torch.Tensor]:
    """Two rows, the second left-padded, so the mask path and `pooler_output` pooling are both exercised."""
    return tokenizer([PROMPT, "The river froze."], return_tensors="pt", padding=True)


@torch.no_grad()
def reference_outputs(lm, clf, tokenizer) -> dict[str, torch.Tensor]:
    inputs = batch(tokenizer)
    with single_thread():
        base = lm.model(**inputs)
        return {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "last_hidden_state": base.last_hidden_state,
            "pooler_output": base.pooler_output,
            "logits": lm(**inputs).logits,
            "greedy": lm.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True),
            "clf_logits": clf(**inputs).logits,
        }


CHILD = textwrap.dedent(
    r"""
    import json, sys
    lm_dir, clf_dir, ref_path, site_packages = sys.argv[1:5]
    sys.path.append(site_packages)  # the venv's packages, without the .pth files that install this project
    for name in ("modeling", "configuration"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            pass
        else:
            raise SystemExit(f"the project package {name!r} is importable in the clean process")

    import torch
    from transformers import (
        AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    )

    torch.set_num_threads(1)
    ref = torch.load(ref_path)
    inputs = {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]}
    report = {}

    config = AutoConfig.from_pretrained(lm_dir, trust_remote_code=True)
    report["config_class"] = f"{type(config).__module__}.{type(config).__name__}"
    report["config"] = config.to_dict()

    with torch.no_grad():
        base = AutoModel.from_pretrained(lm_dir, trust_remote_code=True).eval()
        out = base(**inputs)
        report["model_class"] = f"{type(base).__module__}.{type(base).__name__}"
        report["hidden_equal"] = torch.equal(out.last_hidden_state, ref["last_hidden_state"])
        report["pooler_equal"] = torch.equal(out.pooler_output, ref["pooler_output"])

        lm = AutoModelForCausalLM.from_pretrained(lm_dir, trust_remote_code=True).eval()
        report["lm_class"] = f"{type(lm).__module__}.{type(lm).__name__}"
        report["logits_equal"] = torch.equal(lm(**inputs).logits, ref["logits"])
        greedy = lm.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
        report["greedy_equal"] = torch.equal(greedy, ref["greedy"])
        report["greedy_tokens"] = greedy.tolist()

        clf = AutoModelForSequenceClassification.from_pretrained(clf_dir, trust_remote_code=True).eval()
        report["clf_class"] = f"{type(clf).__module__}.{type(clf).__name__}"
        report["clf_logits_equal"] = torch.equal(clf(**inputs).logits, ref["clf_logits"])

    tokenizer = AutoTokenizer.from_pretrained(lm_dir, trust_remote_code=True)  # it resolves the config too
    report["tokenizer_ids"] = tokenizer(sys.argv[5])["input_ids"]
    print("REPORT " + json.dumps(report))
    """
)


def run_clean_child(tmp_path: Path, lm_dir: Path, clf_dir: Path, ref_path: Path) -> dict:
    script = tmp_path / "load_clean.py"
    script.write_text(CHILD)
    hf_home = tmp_path / "hf_home"
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    args = [str(lm_dir), str(clf_dir), str(ref_path), sysconfig.get_paths()["purelib"], PROMPT]
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(script), *args],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    # The code really came from the folder, through HF_HOME's dynamic-module cache.
    assert (hf_home / "modules" / "transformers_modules").is_dir()
    return report


@pytest.mark.parametrize("name", config_params())
def test_export_loads_bit_exact_without_the_package(name, tokenizer, tmp_path):
    lm = build_model(name)
    lm_dir = export_for_hub(lm, tmp_path / "lm", tokenizer=tokenizer)
    torch.manual_seed(1)
    clf = DecoderOnlyForSequenceClassification.from_pretrained(lm_dir, num_labels=3).eval()
    clf_dir = export_for_hub(clf, tmp_path / "clf")
    ref_path = tmp_path / "reference.pt"
    reference = reference_outputs(lm, clf, tokenizer)
    torch.save(reference, ref_path)

    report = run_clean_child(tmp_path, lm_dir, clf_dir, ref_path)

    for key, cls in (("config_class", "DecoderOnlyConfig"), ("model_class", "DecoderOnlyModel"),
                     ("lm_class", "DecoderOnlyForCausalLM"), ("clf_class", "DecoderOnlyForSequenceClassification")):
        module, _, class_name = report[key].rpartition(".")
        assert class_name == cls and module.startswith("transformers_modules."), report[key]
    for field in ("attention_types", "layer_types", "rope_layers", "rope_parameters", "embed_dim", "hidden_size",
                  "dual_chunk_attention_config", "block_size", "vocab_size"):
        assert report["config"][field] == lm.config.to_dict()[field], field
    assert report["hidden_equal"] and report["pooler_equal"]
    assert report["logits_equal"]
    assert report["greedy_equal"], (report["greedy_tokens"], reference["greedy"].tolist())
    assert report["clf_logits_equal"]
    assert report["tokenizer_ids"] == tokenizer(PROMPT)["input_ids"]


def test_clean_child_cannot_import_the_project(tmp_path):
    """The isolation the bit-exact test relies on: `-I -S` plus the bare site-packages path hides this project."""
    probe = "import sys; sys.path.append(sys.argv[1]); import transformers; import modeling"
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe, sysconfig.get_paths()["purelib"]],
        cwd=tmp_path,
        env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "No module named 'modeling'" in result.stderr


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory):
    """The default gqa CausalLM and its exported folder (with tokenizer)."""
    lm = build_model("gqa")
    return lm, export_for_hub(lm, tmp_path_factory.mktemp("export"), tokenizer=tokenizer)


def test_folder_is_flat_and_complete(exported):
    lm, folder = exported
    code = hub_code_files()
    expected = {"config.json", "generation_config.json", "model.safetensors", "README.md", "tokenizer.json",
                "tokenizer_config.json", *code}
    assert {path.name for path in folder.iterdir()} == expected
    assert all(path.is_file() for path in folder.iterdir())
    assert {"modeling_decoder_only.py", "configuration_decoder_only.py", "gqa_attention.py", "layers.py"} <= set(code)
    assert not {"hub.py", "tokenization.py", "__init__.py"} & set(code)  # export tooling is not model code
    for name, source in code.items():
        assert (folder / name).read_bytes() == source.read_bytes(), name
    # What the loader will look for (its own scanner, recursively) is all there, flat.
    needed = get_relative_import_files(folder / "modeling_decoder_only.py")
    assert needed and all(Path(path).is_file() for path in needed)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_decoder_only.DecoderOnlyConfig",
        "AutoModel": "modeling_decoder_only.DecoderOnlyModel",
        "AutoModelForCausalLM": "modeling_decoder_only.DecoderOnlyForCausalLM",
        "AutoModelForSequenceClassification": "modeling_decoder_only.DecoderOnlyForSequenceClassification",
    }
    assert hub_auto_map() == json.loads((folder / "config.json").read_text())["auto_map"]


def test_hub_code_files_rejects_non_flat_imports(tmp_path, monkeypatch):
    (tmp_path / "modeling_decoder_only.py").write_text("from .sub.helpers import thing\n")
    (tmp_path / "configuration_decoder_only.py").write_text("")
    monkeypatch.setattr(hub, "CODE_DIRS", (tmp_path,))
    with pytest.raises(FileNotFoundError, match=r"from \.sub\.helpers import"):
        hub_code_files()


@torch.no_grad()
def test_save_load_in_process_through_auto_classes(exported, tokenizer, tmp_path):
    lm, folder = exported
    inputs = batch(tokenizer)
    assert isinstance(AutoConfig.from_pretrained(folder), DecoderOnlyConfig)
    base = AutoModel.from_pretrained(folder).eval()
    assert type(base) is DecoderOnlyModel
    assert torch.equal(base(**inputs).last_hidden_state, lm.model(**inputs).last_hidden_state)
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(reloaded) is DecoderOnlyForCausalLM
    assert torch.equal(reloaded(**inputs).logits, lm(**inputs).logits)
    assert torch.equal(
        reloaded.generate(**inputs, max_new_tokens=6, do_sample=False),
        lm.generate(**inputs, max_new_tokens=6, do_sample=False),
    )
    clf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    clf_dir = export_for_hub(clf, tmp_path / "clf")
    clf_again = AutoModelForSequenceClassification.from_pretrained(clf_dir).eval()
    assert type(clf_again) is DecoderOnlyForSequenceClassification
    assert torch.equal(clf_again(**inputs).logits, clf(**inputs).logits)
    assert AutoTokenizer.from_pretrained(folder)(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_save_pretrained_writes_the_export_folder(exported, tmp_path):
    lm, _ = exported
    lm.save_pretrained(tmp_path / "saved")
    assert folder_bytes(tmp_path / "saved") == folder_bytes(export_for_hub(lm, tmp_path / "exported"))


@pytest.fixture
def fake_hub(monkeypatch):
    """Intercept the Hub calls: the repo is 'created' and each commit's files are read while they still exist."""
    commits = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as handle:
                files[op.path_in_repo] = handle.read()
        commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(oid="0" * 40)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return commits


def test_push_to_hub_uploads_exactly_the_export(exported, tokenizer, fake_hub, tmp_path):
    lm, folder = exported
    lm.push_to_hub("someone/tiny-decoder", tokenizer=tokenizer)
    (commit,) = fake_hub
    assert commit["repo_id"] == "someone/tiny-decoder"
    assert commit["files"] == folder_bytes(folder)  # same names and bytes, README included

    lm.save_pretrained(tmp_path / "tiny-decoder", push_to_hub=True)
    assert fake_hub[1]["repo_id"] == "tiny-decoder"
    assert fake_hub[1]["files"] == folder_bytes(tmp_path / "tiny-decoder")
    assert "README.md" in fake_hub[1]["files"] and "modeling_decoder_only.py" in fake_hub[1]["files"]


def transformers_pin() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [dep for dep in dependencies if re.match(r"transformers\b", dep)]
    return pin


def test_model_card_states_the_checkpoint_facts(tmp_path):
    lm = build_model("gqa_embed_yarn_irope")
    card = (export_for_hub(lm, tmp_path) / "README.md").read_text()
    assert "$" not in card and "<!--" not in card
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"({lm.num_parameters():,})" in card
    assert "| 0 | gqa | full_attention | YaRN RoPE |" in card
    assert "| 1 | gqa | full_attention | NoPE |" in card
    assert "| 2 | gqa | full_attention | YaRN RoPE |" in card
    assert "| embed_dim (input width) | 24 (input_proj to hidden_size) |" in card
    assert "| YaRN | on: factor 4.0, original_max_position_embeddings 16 |" in card
    assert "| iRoPE (RoPE on even layers, NoPE on odd layers) | on |" in card
    assert "gqa layers with RoPE: [0, 2]; NoPE: [1]" in card
    assert "| max_position_embeddings (not a hard limit) | 64 |" in card
    assert "| Lightning block size | 64 (no lightning layer) |" in card
    assert "| special tokens (bos / eos / pad) | 1 / 2 / 0 |" in card
    # The version requirement is the project's real pin (pip's normalised order), not a hard-coded string.
    pin = transformers_pin()
    assert all(part in card for part in re.findall(r"[<>=!]=?[\d.]+", pin))
    assert "No tokenizer is saved with this checkpoint" in card


def test_model_card_hybrid_layout():
    lm = build_model("hybrid")
    card = render_model_card(lm)
    assert "| 0 | lightning | linear_attention | none (per-head decay) |" in card
    assert "| 1 | gqa | full_attention | RoPE |" in card
    assert "| 2 | dual_chunk | full_attention | dual-chunk RoPE (chunk 8, local 2) |" in card
    assert "| Lightning block size | 4 (1 lightning layers) |" in card
    assert "| Dual Chunk Attention (chunk size / local size / original max positions) | 8 / 2 / None" in card


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_script_builds_exports_pushes_and_reexports(fake_hub, tmp_path, capsys):
    script = load_example("export_to_hub")
    with pytest.raises(SystemExit) as help_exit:
        script.main(["--help"])
    assert help_exit.value.code == 0 and "--push REPO_ID" in capsys.readouterr().out

    tiny = ["--hidden-size", "32", "--heads", "2", "--kv-heads", "1", "--layers", "2", "--vocab-size", "300"]
    folder = script.main([*tiny, "--attention", "hybrid", "--train-tokenizer", "--output-dir", str(tmp_path / "new"),
                          "--push", "someone/tiny-hybrid"])
    (commit,) = fake_hub
    assert commit["repo_id"] == "someone/tiny-hybrid" and commit["files"] == folder_bytes(folder)
    assert {"tokenizer.json", "README.md", "lightning_attention.py"} <= set(commit["files"])
    assert json.loads(commit["files"]["config.json"])["attention_types"] == ["lightning", "gqa"]

    again = script.main(["--model", str(folder), "--output-dir", str(tmp_path / "again")])
    assert {path.name for path in again.iterdir()} == {path.name for path in folder.iterdir()}
    assert (again / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert (again / "README.md").read_text() == (folder / "README.md").read_text()
