"""Train a byte-level BPE tokenizer offline for DecoderOnly checkpoints.

Byte-level BPE (GPT-2 style) needs no vocabulary file and no network: any UTF-8 text round-trips through it. The result
is a plain transformers fast tokenizer, so `tokenizer.save_pretrained(folder)` next to the model lets
`AutoTokenizer.from_pretrained(folder)` load it with transformers alone, without this package.

This module is a training utility, not model code: `modeling_decoder_only.py` must not import it, so that it is not
copied into exported checkpoints.
"""

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2 in every trained vocabulary


def train_tokenizer(
    texts: Iterable[str] | None = None,
    files: Iterable[str | os.PathLike] | None = None,
    vocab_size: int = 2048,
    min_frequency: int = 2,
    add_bos_token: bool = True,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` (strings) or `files` (UTF-8 text files), fully offline.

    Special tokens `<pad>`, `<s>`, `</s>` get ids 0, 1, 2. With `add_bos_token`, encoding prepends `<s>` (the model then
    always sees a start token, also for the prompts given to `generate()`); `</s>` is never added automatically, so a
    training stream can place it between documents.

    Args:
        texts: strings to learn merges from. Give exactly one of `texts` and `files`.
        files: paths of UTF-8 text files to learn merges from.
        vocab_size: final vocabulary size, special tokens and the 256 byte symbols included.
        min_frequency: a pair must occur this often to be merged.
        add_bos_token: prepend `<s>` when encoding.
        model_max_length: length the tokenizer reports as the model's limit (a hint for truncation).
    """
    if (texts is None) == (files is None):
        raise ValueError("train_tokenizer: pass exactly one of `texts` or `files`.")
    minimum = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(
            f"train_tokenizer: `vocab_size`={vocab_size} is invalid: must be >= {minimum} (special tokens + 256 bytes)."
        )

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: "Hello" and " Hello" stay different tokens, so decode(encode(x)) == x exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    if files is not None:
        backend.train([os.fspath(path) for path in files], trainer)
    else:
        backend.train_from_iterator(texts, trainer)
    if add_bos_token:
        bos_id = backend.token_to_id(BOS_TOKEN)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
        )

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="left",  # batched generate() needs left padding
    )


def read_text_files(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Paragraphs (blank-line separated) of UTF-8 text files, stripped and non-empty, in file order."""
    paragraphs = []
    for path in paths:
        text = Path(path).read_text(encoding="utf-8")
        paragraphs.extend(block.strip() for block in text.split("\n\n") if block.strip())
    return paragraphs


__all__ = ["BOS_TOKEN", "EOS_TOKEN", "PAD_TOKEN", "read_text_files", "train_tokenizer"]
