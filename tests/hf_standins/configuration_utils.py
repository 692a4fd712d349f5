"""Project-authored stand-in for transformers' `tests/utils/test_configuration_utils.py` (not shipped in the sdist).

`ConfigTester.check_config_arguments_init` builds a config from `config_common_kwargs` and reads every value back,
so each entry is a **non-default** value of a generic `PreTrainedConfig` field of transformers 5.x.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 7,
    "architectures": ["DecoderOnlyForCausalLM"],
    "id2label": {0: "negative", 1: "positive"},
    "label2id": {"negative": 0, "positive": 1},
    "problem_type": "single_label_classification",
}
