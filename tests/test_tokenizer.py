"""The offline byte-level BPE tokenizer: specials, exact round trips, saving for AutoTokenizer, argument errors."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from modeling.hub import hub_code_files
from modeling.tokenization import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, read_text_files, train_tokenizer


DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "village_tales.txt"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(files=[DATA], vocab_size=512)


def test_vocabulary_and_special_tokens(tokenizer):
    assert len(tokenizer) == 512
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token] == [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id] == [0, 1, 2]
    ids = tokenizer("The river")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids
    # Learned merges: common words of the corpus are single tokens.
    assert len(tokenizer(" village", add_special_tokens=False)["input_ids"]) == 1


@pytest.mark.parametrize(
    "text",
    ["The baker woke early.", "  two  spaces\tand a tab\n", "naïve café — 東京 🙂", "UPPER lower 12345 !?"],
)
def test_decode_encode_round_trip_is_exact(tokenizer, text):
    """Byte-level BPE with `add_prefix_space=False` has no unknown token and changes no whitespace."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_round_trip_of_the_whole_corpus(tokenizer):
    paragraphs = read_text_files([DATA])
    assert len(paragraphs) > 50
    ids = tokenizer(paragraphs, add_special_tokens=False)["input_ids"]
    assert tokenizer.batch_decode(ids) == paragraphs
    # Compression: BPE learned something (bytes per token well above 1).
    assert sum(map(len, paragraphs)) / sum(map(len, ids)) > 2.0


def test_left_padding_for_batched_generation(tokenizer):
    batch = tokenizer(["a b", "The long river"], padding=True)
    assert batch["input_ids"][0][0] == tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0
    assert batch["attention_mask"][1] == [1] * len(batch["input_ids"][1])


def test_saved_tokenizer_loads_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "In winter the wind came down from the mountains."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.padding_side == "left"


def test_training_from_in_memory_texts():
    from_texts = train_tokenizer(texts=["the cat sat on the mat"] * 20, vocab_size=270)
    assert len(from_texts) == 270
    assert from_texts.decode(from_texts("the mat", add_special_tokens=False)["input_ids"]) == "the mat"


def test_argument_errors():
    with pytest.raises(ValueError, match="exactly one of `texts` or `files`"):
        train_tokenizer()
    with pytest.raises(ValueError, match="exactly one of `texts` or `files`"):
        train_tokenizer(texts=["a"], files=[DATA])
    with pytest.raises(ValueError, match=r"`vocab_size`=100 is invalid: must be >= 259"):
        train_tokenizer(texts=["a"], vocab_size=100)


def test_tokenization_is_not_exported_model_code():
    assert "tokenization.py" not in hub_code_files()
