"""transformers' Trainer with DecoderOnly: causal-LM fine-tuning, gradient accumulation (num_items_in_batch),
activation checkpointing, evaluation/prediction, bf16 on CPU, and sequence classification of continuous feature
sequences (`inputs_embeds`). Also smoke-tests the example scripts (`--help` and tiny runs)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator

import modeling  # noqa: F401
from modeling import DecoderOnlyForCausalLM, DecoderOnlyForSequenceClassification
from helpers import tiny_config


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPO_ROOT, "examples")
sys.path.insert(0, EXAMPLES)

import finetune_causal_lm  # noqa: E402
import finetune_sequence_classification  # noqa: E402


VOCAB = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


class PaddedLMDataset(torch.utils.data.Dataset):
    """Rows of different lengths (right-padded with 0, labels -100 there): the micro-batches of an accumulated batch
    hold different numbers of label tokens, so a per-micro-batch mean would weight tokens unequally."""

    def __init__(self, n=16, seq=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=g)
        lengths = torch.tensor([seq if i % 4 == 0 else 3 + (5 * i) % (seq - 3) for i in range(n)])
        self.mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        self.ids[self.mask == 0] = 0
        self.labels = self.ids.masked_fill(self.mask == 0, -100)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def _model(seed=0, **overrides) -> DecoderOnlyForCausalLM:
    torch.manual_seed(seed)
    return DecoderOnlyForCausalLM(tiny_config(vocab_size=VOCAB, pad_token_id=0, **overrides))


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------------------------------------ causal LM example
def test_causal_lm_example_loss_falls(tmp_path):
    """The example on generated sentences: evaluation loss from ~ln(vocab) ≈ 6.0 to <= 4.0 in 40 steps
    (measured 5.99 -> 2.00)."""
    result = finetune_causal_lm.main([
        "--synthetic", "--max_steps", "40", "--seq_len", "32", "--output_dir", str(tmp_path), "--disable_tqdm",
        "--no_save",
    ])
    assert result["steps"] == 40
    assert result["eval_loss_before"] > 5.5
    assert result["eval_loss_after"] < result["eval_loss_before"] - 2.0, result
    assert result["logged_losses"][-1] < result["logged_losses"][0] - 2.0


# ------------------------------------------------------------------------------------------- gradient accumulation
def _train_sgd(tmp_path, model, batch, accum, steps=1):
    args = _args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=steps,
                 optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    before = _weights(model)
    Trainer(model=model, args=args, train_dataset=PaddedLMDataset(), data_collator=default_data_collator).train()
    return before, _weights(model)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """batch 8 x accumulation 1 == batch 2 x accumulation 4, because the Trainer passes `num_items_in_batch` (the label
    tokens of the whole accumulated batch) through forward's **kwargs to the loss. SGD (lr 0.5, no clipping), one
    optimizer step: the update is -lr * gradient, compared within 1e-6 (the updates are ~1e-2). Without the kwarg
    (control: `accepts_loss_kwargs = False`) the per-micro-batch means weight tokens unequally and the updates differ
    by > 1e-4."""
    seen = []
    full = _model()
    init, full_after = _train_sgd(tmp_path / "full", full, batch=8, accum=1)

    accumulated = _model()
    accumulated.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("num_items_in_batch")), with_kwargs=True
    )
    _, accumulated_after = _train_sgd(tmp_path / "accum", accumulated, batch=2, accum=4)

    ds = PaddedLMDataset()
    expected_items = int((ds.labels[:8, 1:] != -100).sum())  # the loss shifts labels: position 0 is never a target
    assert len(seen) == 4 and all(n is not None and int(n) == expected_items for n in seen), (seen, expected_items)
    update = max((full_after[k] - init[k]).abs().max().item() for k in init)
    assert update > 1e-3
    assert _max_diff(full_after, accumulated_after) < 1e-6

    control = _model()
    control.accepts_loss_kwargs = False  # the Trainer then averages per micro-batch and divides by 4
    _, control_after = _train_sgd(tmp_path / "control", control, batch=2, accum=4)
    assert _max_diff(full_after, control_after) > 1e-4


# ------------------------------------------------------------------------------------------ activation checkpointing
def test_activation_checkpointing_same_loss_and_gradients(monkeypatch):
    """`activation_checkpointing_enable()` recomputes every decoder layer in backward (its MLP runs twice) and
    gives the same loss and gradients as plain backprop (float32, within 1e-6)."""
    model = _model().train()
    ds = PaddedLMDataset()
    batch = {"input_ids": ds.ids[:4], "attention_mask": ds.mask[:4], "labels": ds.labels[:4]}
    calls = []
    mlp_forward = type(model.model.layers[0].mlp).forward

    def counting_forward(self, *args, **kwargs):  # module hooks do not fire in the recompute; count forward itself
        calls.append(1)
        return mlp_forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model.model.layers[0].mlp), "forward", counting_forward)

    def loss_and_grads():
        model.zero_grad()
        calls.clear()
        loss = model(**batch).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    loss_plain, grads_plain, calls_plain = loss_and_grads()
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    loss_ckpt, grads_ckpt, calls_ckpt = loss_and_grads()
    assert calls_plain == 2 and calls_ckpt == 4  # 2 layers; recomputed once each in backward
    assert abs(loss_plain - loss_ckpt) < 1e-6
    assert _max_diff(grads_plain, grads_ckpt) < 1e-6


def test_trainer_activation_checkpointing_same_training(tmp_path):
    """`TrainingArguments(activation_checkpointing=True)` (and its deprecated 5.x alias `gradient_checkpointing=True`)
    switches it on for the model, and 3 AdamW steps end at the same weights (within 1e-5) and losses (within 1e-6)
    as without."""
    results = {}
    variants = {"off": {}, "on": {"activation_checkpointing": True}, "alias": {"gradient_checkpointing": True}}
    for name, flags in variants.items():
        model = _model()
        args = _args(tmp_path / name, per_device_train_batch_size=4, **flags)
        trainer = Trainer(model=model, args=args, train_dataset=PaddedLMDataset(), data_collator=default_data_collator)
        trainer.train()
        assert model.is_activation_checkpointing == (name != "off")
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        results[name] = (_weights(model), losses)
    for name in ("on", "alias"):
        assert _max_diff(results["off"][0], results[name][0]) < 1e-5
        assert np.allclose(results["off"][1], results[name][1], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------- evaluation, prediction
def test_evaluate_and_predict(tmp_path):
    """evaluate() reports the mean of the per-batch losses (within 1e-5); predict() returns logits only, equal to a
    plain forward (within 1e-5): with `TrainingArguments(use_cache=True)` the model returns a cache in eval mode and
    the config's `keys_to_ignore_at_inference=["cache"]` is what drops it (the default `use_cache=False` of 5.x
    TrainingArguments would hide a wrong setting)."""
    model = _model()
    ds = PaddedLMDataset(n=8)
    assert model.config.keys_to_ignore_at_inference == ["cache"]
    trainer = Trainer(model=model, args=_args(tmp_path, per_device_eval_batch_size=4, use_cache=True), eval_dataset=ds,
                      data_collator=default_data_collator)
    metrics = trainer.evaluate()
    model.eval()
    with torch.no_grad():
        per_batch = [model(input_ids=ds.ids[i:i + 4], attention_mask=ds.mask[i:i + 4],
                           labels=ds.labels[i:i + 4]).loss.item() for i in (0, 4)]
        out = model(input_ids=ds.ids, attention_mask=ds.mask)
    assert out.cache is not None  # the model does return a cache in eval mode ...
    assert abs(metrics["eval_loss"] - sum(per_batch) / 2) < 1e-5

    prediction = trainer.predict(ds)
    assert isinstance(prediction.predictions, np.ndarray)  # ... which predict() drops (a tuple otherwise)
    assert prediction.predictions.shape == (8, 12, VOCAB)
    np.testing.assert_array_equal(prediction.label_ids, ds.labels.numpy())
    real = ds.mask.bool().numpy()
    np.testing.assert_allclose(prediction.predictions[real], out.logits.numpy()[real], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------ bf16 on CPU
def test_bf16_autocast_training_on_cpu(tmp_path):
    """`TrainingArguments(bf16=True, use_cpu=True)` trains under CPU bf16 autocast: the projections compute in
    bfloat16 (checked on lm_head's output), the master weights stay float32, and the loss falls over 20 steps
    (by > 0.5 on this memorisable data; measured ~2)."""
    model = _model()
    dtypes = set()
    model.lm_head.register_forward_hook(lambda mod, inp, out: dtypes.add(out.dtype))
    trainer = Trainer(model=model, args=_args(tmp_path, bf16=True, max_steps=20, per_device_train_batch_size=4),
                      train_dataset=PaddedLMDataset(), data_collator=default_data_collator)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert dtypes == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, losses


def test_pure_bf16_model_trains_on_cpu():
    """A model loaded/cast to bfloat16 (no autocast) runs forward and backward on CPU; its loss matches the float32
    model's within bf16 precision (2e-2 relative); logits and gradients are bfloat16 and finite."""
    model = _model()
    ds = PaddedLMDataset()
    batch = {"input_ids": ds.ids[:4], "attention_mask": ds.mask[:4], "labels": ds.labels[:4]}
    loss32 = model(**batch).loss.item()
    model = model.to(torch.bfloat16)
    out = model(**batch)
    loss16 = out.loss  # transformers' loss upcasts the logits to float32
    loss16.backward()
    assert out.logits.dtype == torch.bfloat16
    assert abs(loss16.item() - loss32) / loss32 < 2e-2
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------- classification of feature sequences
def test_sequence_classification_example_learns_feature_task(tmp_path):
    """Continuous features `inputs_embeds [b, s, 12]` (hidden 32, so the input projection is used), random lengths 6-16,
    label = sign of feature 0 at time step 0, read from the last real position. Chance is 50 %; after 150 steps of
    batch 32 (lr 5e-3, under one epoch) the held-out accuracy must reach >= 85 % (measured 92-96 % over 3 seeds)."""
    result = finetune_sequence_classification.main([
        "--num_train", "4800", "--num_eval", "256", "--max_steps", "150", "--learning_rate", "5e-3",
        "--output_dir", str(tmp_path), "--disable_tqdm", "--no_save",
    ])
    assert result["steps"] == 150
    assert 0.35 < result["eval_accuracy_before"] < 0.65
    assert result["eval_accuracy_after"] >= 0.85, result
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.2


def test_sequence_classification_gradient_accumulation(tmp_path):
    """Classification under the Trainer: batch 8 x accumulation 1 == batch 2 x accumulation 4 (SGD, one step; within
    1e-6). The head's loss is a per-batch mean for every problem type, so the model sets `accepts_loss_kwargs = False`
    and the Trainer divides by the accumulation steps; a model that took `**kwargs` without using num_items_in_batch
    made the update 4x too large."""
    ds = finetune_sequence_classification.FeatureSequenceDataset(16, 12, min_len=4, max_len=8, seed=0)

    def one_step(batch, accum):
        torch.manual_seed(0)
        model = DecoderOnlyForSequenceClassification(tiny_config(embed_dim=12, num_labels=2, vocab_size=1))
        init = _weights(model)
        args = _args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accum, max_steps=1,
                     optim="sgd", learning_rate=0.5, max_grad_norm=0.0, remove_unused_columns=False)
        Trainer(model=model, args=args, train_dataset=ds,
                data_collator=finetune_sequence_classification.FeatureCollator()).train()
        return {k: v - init[k] for k, v in _weights(model).items()}

    full, accumulated = one_step(8, 1), one_step(2, 4)
    assert full["score.weight"].abs().max() > 1e-3
    assert _max_diff(full, accumulated) < 1e-6


@pytest.mark.parametrize("embed_dim", [12, 287])
def test_feature_collator_padding_side_invariant(embed_dim):
    """The collator's right- and left-padded batches give the same logits (pooler_output = last real position;
    within 1e-5), and the Trainer's loss for one row equals the unpadded row's loss."""
    config = tiny_config(embed_dim=embed_dim, num_labels=2, vocab_size=1)
    torch.manual_seed(0)
    model = DecoderOnlyForSequenceClassification(config).eval()
    assert model.model.input_proj.in_features == embed_dim
    ds = finetune_sequence_classification.FeatureSequenceDataset(6, embed_dim, min_len=3, max_len=9, seed=1)
    rows = [ds[i] for i in range(6)]
    assert len({r["inputs_embeds"].shape[0] for r in rows}) > 1
    right = finetune_sequence_classification.FeatureCollator("right")(rows)
    left = finetune_sequence_classification.FeatureCollator("left")(rows)
    assert right["inputs_embeds"].shape[-1] == embed_dim
    assert right["attention_mask"].sum() == left["attention_mask"].sum()
    with torch.no_grad():
        logits_right = model(**right).logits
        logits_left = model(**left).logits
        alone = torch.cat([model(inputs_embeds=r["inputs_embeds"][None]).logits for r in rows])
    torch.testing.assert_close(logits_right, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits_left, alone, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- example CLIs (--help)
@pytest.mark.parametrize(
    "script", ["finetune_causal_lm.py", "finetune_sequence_classification.py", "lora.py", "train_ddp.py",
               "tp_inference.py"],
)
def test_example_help(script):
    """Every example has an argparse `--help` that exits 0 without importing torch (fast)."""
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), "--help"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and "--" in proc.stdout
