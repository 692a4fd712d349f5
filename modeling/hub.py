"""Hub export: one flat folder that loads with transformers alone (`trust_remote_code=True`).

A Hub-ready DecoderOnly folder holds

- `config.json` with an `auto_map` entry for every Auto class (transformers' own `custom_object_save` writes only the
  saved object's class, so `AutoModel.from_pretrained` would fail on a saved CausalLM);
- the safetensors weights and `generation_config.json` (plain `PreTrainedModel.save_pretrained`);
- the model code as flat `.py` files: `modeling_decoder_only.py`, every file it reaches through `from .x import Y`
  (found with transformers' own import scanner, i.e. exactly what the loader will look for) and
  `configuration_decoder_only.py`, which lives in the sibling `configuration/` package of this project;
- `README.md`, rendered from the `model_card.md` template at the project root with the checkpoint's real facts;
- the tokenizer files when a tokenizer is given.

`modeling/__init__.py` calls `enable_hub_export(DecoderOnlyPreTrainedModel)`, so `save_pretrained` and `push_to_hub` of
every DecoderOnly model write (and upload) that same folder. transformers' `register_for_auto_class` cannot do it
for the model classes: `modeling_decoder_only.py` imports its config from `.configuration_decoder_only` inside a
`try` (the flat-folder path), which `custom_object_save` would look for next to the modeling file and not find.

This module is not part of the exported code: nothing in `modeling_decoder_only.py` imports it.
"""

import importlib.metadata
import os
import re
import shutil
import string
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from huggingface_hub import CommitOperationAdd
from transformers import PreTrainedModel
from transformers.dynamic_module_utils import get_relative_imports
from transformers.utils.hub import hf_api

import configuration
from configuration import DecoderOnlyConfig

from .modeling_decoder_only import (
    DecoderOnlyForCausalLM,
    DecoderOnlyForSequenceClassification,
    DecoderOnlyModel,
)


# `modeling/model_card.md` links to the project's top-level `model_card.md`; wheels carry it as package data.
MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
# Where the flat module names of the exported code are looked up, in order.
CODE_DIRS = (Path(__file__).resolve().parent, Path(configuration.__file__).resolve().parent)
ENTRY_MODULES = ("modeling_decoder_only", "configuration_decoder_only")
AUTO_CLASSES = {
    "AutoConfig": DecoderOnlyConfig,
    "AutoModel": DecoderOnlyModel,
    "AutoModelForCausalLM": DecoderOnlyForCausalLM,
    "AutoModelForSequenceClassification": DecoderOnlyForSequenceClassification,
}
TOKENIZER_FILE = "tokenizer_config.json"


def hub_auto_map() -> dict[str, str]:
    """`auto_map` for every Auto class: `{"AutoModel": "modeling_decoder_only.DecoderOnlyModel", ...}`."""
    return {auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}" for auto, cls in AUTO_CLASSES.items()}


def hub_code_files() -> dict[str, Path]:
    """Flat file name -> source path of every `.py` file the exported folder needs.

    Starts from `modeling_decoder_only.py` and `configuration_decoder_only.py` and follows `from .x import Y` with
    transformers' loader regex, so a file the loader will want is never missed and nothing else is shipped. A relative
    import that is not flat (`from .sub.mod import`) or names no file fails here, at export, instead of at load time.
    """
    files: dict[str, Path] = {}
    pending = list(ENTRY_MODULES)
    while pending:
        name = pending.pop()
        if f"{name}.py" in files:  # keys are file names; a bare `name` never matches and an import cycle loops forever
            continue
        path = next((folder / f"{name}.py" for folder in CODE_DIRS if (folder / f"{name}.py").is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"Hub export: `from .{name} import ...` needs a flat module `{name}.py` in one of "
                f"{[str(folder) for folder in CODE_DIRS]}; none was found."
            )
        files[f"{name}.py"] = path
        pending.extend(get_relative_imports(path))
    return dict(sorted(files.items()))


def save_hub_folder(
    model: PreTrainedModel, save_directory: str | os.PathLike, is_main_process: bool = True, **save_kwargs: Any
) -> Path:
    """Write the Hub-ready folder of `model`: weights and config (with the full `auto_map`), code, README.md.

    `save_kwargs` go to `PreTrainedModel.save_pretrained` (e.g. `max_shard_size`, `state_dict`). The README is rendered
    last, from what the folder then holds (a tokenizer saved there earlier is documented).
    """
    folder = Path(save_directory)
    model.config.auto_map = {**(getattr(model.config, "auto_map", None) or {}), **hub_auto_map()}
    PreTrainedModel.save_pretrained(model, folder, is_main_process=is_main_process, **save_kwargs)
    if model.should_save_on_this_rank(is_main_process):
        for name, source in hub_code_files().items():
            shutil.copyfile(source, folder / name)
        (folder / "README.md").write_text(render_model_card(model, folder), encoding="utf-8")
    return folder


def export_for_hub(model: PreTrainedModel, folder: str | os.PathLike, tokenizer=None, **save_kwargs: Any) -> Path:
    """Save `model` (and `tokenizer`, if given) as one flat folder that loads with transformers alone.

    The same folder `model.save_pretrained(folder)` writes, plus the tokenizer files; `push_to_hub` uploads exactly it.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)  # first, so the model card can say it is there
    return save_hub_folder(model, folder, **save_kwargs)


def push_to_hub(
    model: PreTrainedModel,
    repo_id: str,
    *,
    tokenizer=None,
    commit_message: str | None = None,
    max_shard_size: int | str | None = "50GB",
    **hub_kwargs: Any,
) -> Any:
    """Export `model` (and `tokenizer`) with `export_for_hub` into a temporary folder and upload exactly that folder.

    transformers' `push_to_hub` would replace our README.md with a generic card; this keeps the rendered one.
    `hub_kwargs` (`private`, `token`, `revision`, `create_pr`, `commit_description`) go to `push_hub_folder`.
    Returns the `CommitInfo` of the upload.
    """
    with tempfile.TemporaryDirectory() as tmp_dir:
        export_for_hub(model, tmp_dir, tokenizer=tokenizer, max_shard_size=max_shard_size)
        return push_hub_folder(
            tmp_dir, repo_id, commit_message=commit_message or f"Upload {type(model).__name__}", **hub_kwargs
        )


def push_hub_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str,
    commit_description: str | None = None,
    private: bool | None = None,
    token: bool | str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create the repository if needed, then upload every file under `folder` (relative paths kept) in one commit,
    as transformers' own uploads do."""
    repo_id = hf_api().create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    folder = Path(folder)
    operations = [
        CommitOperationAdd(path_or_fileobj=str(path), path_in_repo=path.relative_to(folder).as_posix())
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    ]
    if revision is not None and not revision.startswith("refs/pr"):
        hf_api().create_branch(repo_id=repo_id, branch=revision, token=token, exist_ok=True)
    return hf_api().create_commit(
        repo_id=repo_id,
        operations=operations,
        commit_message=commit_message,
        commit_description=commit_description,
        token=token,
        revision=revision,
        create_pr=create_pr,
    )


def enable_hub_export(model_class: type[PreTrainedModel]) -> None:
    """Make `save_pretrained` and `push_to_hub` of `model_class` and its subclasses write the Hub-ready folder."""
    model_class.save_pretrained = _save_pretrained
    model_class.push_to_hub = _push_to_hub


def _save_pretrained(
    self,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """`PreTrainedModel.save_pretrained`, writing the Hub-ready folder (see `save_hub_folder`).

    With `push_to_hub=True` the folder is uploaded after the code and README are written (transformers' own path
    would upload before them); `repo_id` defaults to the folder name, as in transformers.
    """
    repo_id = kwargs.pop("repo_id", Path(save_directory).name)
    commit_message = kwargs.pop("commit_message", None) or f"Upload {type(self).__name__}"
    create_pr = kwargs.pop("create_pr", False)
    private = kwargs.pop("private", None)
    save_hub_folder(self, save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)
    if push_to_hub and self.should_save_on_this_rank(is_main_process):
        push_hub_folder(
            save_directory,
            repo_id,
            commit_message=commit_message,
            private=private,
            token=kwargs.get("token"),
            create_pr=create_pr,
        )


def _push_to_hub(self, repo_id: str, *, tokenizer=None, tags: list[str] | None = None, **kwargs: Any):
    """`PreTrainedModel.push_to_hub` that uploads exactly the `export_for_hub` folder (optionally with a tokenizer).

    `tags` is accepted for signature compatibility; the rendered model card carries the tags of `model_card.md`.
    """
    return push_to_hub(self, repo_id, tokenizer=tokenizer, **kwargs)


# ------------------------------------------------------------------------------------------------------ model card
def render_model_card(model: PreTrainedModel, folder: str | os.PathLike | None = None) -> str:
    """README.md of a checkpoint: `model_card.md` with every placeholder filled from `model` (and `folder`).

    The template's HTML comments are notes for its editors and are dropped. A placeholder without a fact raises.
    """
    text = re.sub(r"<!--.*?-->\n*", "", MODEL_CARD_TEMPLATE.read_text(encoding="utf-8"), flags=re.DOTALL)
    return string.Template(text).substitute(model_card_facts(model, folder))


def model_card_facts(model: PreTrainedModel, folder: str | os.PathLike | None = None) -> dict[str, str]:
    """The values `model_card.md` names, read from the model, its config and the saved folder."""
    config = model.config
    num_parameters = model.num_parameters()
    has_tokenizer = folder is not None and (Path(folder) / TOKENIZER_FILE).is_file()
    return {
        "architecture": type(model).__name__,
        "parameter_count": human_count(num_parameters),
        "parameter_count_exact": f"{num_parameters:,}",
        "dtype": str(model.dtype).removeprefix("torch."),
        "transformers_requirement": transformers_requirement(),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        "tokenizer_usage": (
            'tokenizer = AutoTokenizer.from_pretrained("path/or/repo-id", trust_remote_code=True)'
            if has_tokenizer
            else f"# No tokenizer is saved with this checkpoint: bring one with vocab_size={config.vocab_size}."
        ),
        "final_norm": "LayerNorm" if config.final_norm == "layernorm" else "RMSNorm",
        "vocab_size": str(config.vocab_size),
        "embed_dim": str(config.embed_dim)
        + (" (input_proj to hidden_size)" if config.embed_dim != config.hidden_size else ""),
        "hidden_size": str(config.hidden_size),
        "intermediate_size": str(config.intermediate_size),
        "num_hidden_layers": str(config.num_hidden_layers),
        "num_attention_heads": str(config.num_attention_heads),
        "num_key_value_heads": str(config.num_key_value_heads),
        "head_dim": str(config.head_dim),
        "tie_word_embeddings": str(config.tie_word_embeddings),
        "special_tokens": f"{config.bos_token_id} / {config.eos_token_id} / {config.pad_token_id}",
        "layer_table": "\n".join(layer_rows(config)),
        **context_facts(config),
    }


def layer_rows(config: DecoderOnlyConfig) -> list[str]:
    """One markdown table row per layer: index, attention type, transformers cache kind, position scheme."""
    dca = config.dual_chunk_attention_config
    positions = {
        "lightning": "none (per-head decay)",
        "dual_chunk": f"dual-chunk RoPE (chunk {dca['chunk_size']}, local {dca['local_size']})",
    }
    rows = []
    for i, (kind, layer_type) in enumerate(zip(config.attention_types, config.layer_types)):
        rope = ("YaRN RoPE" if config.yarn else "RoPE") if config.rope_layers[i] else "NoPE"
        rows.append(f"| {i} | {kind} | {layer_type} | {positions.get(kind, rope)} |")
    return rows


def context_facts(config: DecoderOnlyConfig) -> dict[str, str]:
    """RoPE/YaRN/iRoPE, Lightning block size and DCA sizes, each saying whether any layer uses it."""
    rope = config.rope_parameters
    gqa = [i for i, kind in enumerate(config.attention_types) if kind == "gqa"]
    rope_layers = [i for i in gqa if config.rope_layers[i]]
    nope_layers = [i for i in gqa if not config.rope_layers[i]]
    lightning = config.attention_types.count("lightning")
    dual_chunk = config.attention_types.count("dual_chunk")
    dca = config.dual_chunk_attention_config
    temperature = dca["original_max_position_embeddings"]
    return {
        "rope": (
            f"rope_type={rope['rope_type']}, rope_theta={rope['rope_theta']}; "
            f"gqa layers with RoPE: {rope_layers or 'none'}; NoPE: {nope_layers or 'none'}"
        ),
        "yarn": (
            f"on: factor {rope['factor']}, original_max_position_embeddings {rope['original_max_position_embeddings']}"
            if config.yarn
            else "off"
        ),
        "interleave_rope": "on" if config.interleave_rope else "off",
        "max_position_embeddings": str(config.max_position_embeddings),
        "lightning": f"{config.block_size}"
        + (f" ({lightning} lightning layers)" if lightning else " (no lightning layer)"),
        "dual_chunk": f"{dca['chunk_size']} / {dca['local_size']} / "
        + (f"{temperature}" if temperature is not None else "None (no temperature scaling)")
        + (f" ({dual_chunk} dual_chunk layers)" if dual_chunk else " (no dual_chunk layer)"),
    }


def transformers_requirement() -> str:
    """The transformers requirement of this project's distribution (the pin the shipped code is written against)."""
    try:
        requirements = importlib.metadata.requires("decoder-only") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    for requirement in requirements:
        name = requirement.split(";")[0].strip()
        if name.startswith("transformers") and not name[len("transformers") :][:1].isalnum():
            return name.replace(" ", "")
    return f"transformers>={transformers.__version__}"


def human_count(n: int) -> str:
    """`1234567` -> `"1.23M"`: the short form model cards use."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


__all__ = [
    "export_for_hub",
    "enable_hub_export",
    "hub_auto_map",
    "hub_code_files",
    "push_hub_folder",
    "push_to_hub",
    "render_model_card",
    "save_hub_folder",
]
