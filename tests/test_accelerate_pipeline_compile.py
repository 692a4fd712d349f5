"""accelerate loading (`device_map="auto"`, bf16), the `text-generation` pipeline and `torch.compile` with a small
checkpoint trained and saved by examples/finetune_causal_lm.py (which is smoke-tested here as well)."""

import os
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import modeling  # noqa: F401


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO_ROOT, "examples"))

import finetune_causal_lm  # noqa: E402


PROMPTS = ["the miller crosses", "a heron"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """examples/finetune_causal_lm.py on the bundled text (examples/data), 30 steps, saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("causal_lm")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = finetune_causal_lm.main([
            "--max_steps", "30", "--seq_len", "32", "--max_blocks", "120", "--output_dir", str(folder),
            "--disable_tqdm",
        ])
    finally:
        torch.set_num_threads(threads)
    # the smoke test of the example itself: real prose, 30 steps, eval loss down by > 0.5 nat (measured 6.2 -> ~5)
    assert result["eval_loss_after"] < result["eval_loss_before"] - 0.5, result
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    return folder


def test_device_map_auto_bfloat16(checkpoint):
    """`from_pretrained(folder, device_map="auto", dtype=torch.bfloat16)` loads every weight as bfloat16 on the CPU
    and runs; its logits match the float32 model within bf16 precision (max error < 3 % of
    the logit range) and the next-token argmax agrees on >= 90 % of positions."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="auto", dtype=torch.bfloat16)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    assert type(model).__name__ == "DecoderOnlyForCausalLM"
    # with no accelerator "auto" places everything on the CPU (5.25 sets no hf_device_map for a single device)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        expected = reference(**batch).logits
    assert logits.dtype == torch.bfloat16
    real = batch["attention_mask"].bool()
    error = (logits.float() - expected)[real].abs().max()
    scale = expected[real].max() - expected[real].min()
    assert error < 0.03 * scale, (error, scale)
    agreement = (logits.argmax(-1) == expected.argmax(-1))[real].float().mean()
    assert agreement >= 0.9


def test_text_generation_pipeline(checkpoint):
    """`pipeline("text-generation", model=..., tokenizer=...)` generates greedily: the text starts with the prompt,
    adds tokens, and equals decoding `model.generate()` with the same settings (batch of 2 prompts, left padding)."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    outputs = generator(PROMPTS, max_new_tokens=8, do_sample=False, batch_size=2)
    for prompt, output in zip(PROMPTS, outputs):
        text = output[0]["generated_text"]
        assert text.startswith(prompt) and len(text) > len(prompt)
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**ids, max_new_tokens=8, do_sample=False)
        assert generated.shape[1] == ids["input_ids"].shape[1] + 8 or generated[0, -1] == tokenizer.eos_token_id
        assert text == tokenizer.decode(generated[0], skip_special_tokens=True)


def test_torch_compile_matches_eager(checkpoint):
    """`torch.compile(model, backend="aot_eager")` (dynamo + AOTAutograd; inductor needs ~80 s of C++ compilation
    on 2 CPU cores, aot_eager ~5 s) really compiles frames and its forward equals eager within 1e-5, with a padded
    batch."""
    from torch._dynamo.testing import CompileCounterWithBackend

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    start = time.perf_counter()
    with torch.no_grad():
        eager = model(**batch).logits
        out = compiled(**batch).logits
    elapsed = time.perf_counter() - start
    assert counter.frame_count >= 1
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
    assert elapsed < 120
