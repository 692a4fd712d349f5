"""transformers' own test mixins (ModelTesterMixin, ConfigTester, TrainingTesterMixin) run against DecoderOnly.

The mixins come from the sdist of the installed transformers version (see tests/hf_harness.py and
reference/transformers-v5.md §11); the generation checks are the project's (tests/hf_standins/generation.py, §11.3).
If the sdist cannot be obtained, `test_transformers_test_mixins_available` FAILS (it never skips).

One test class per attention layout; a new layout is a one-line subclass setting `tester_kwargs`.
"""

import contextlib
import copy
import unittest
from unittest import mock

import pytest
import torch
from hf_harness import HarnessUnavailable, build_harness
from transformers import masking_utils
from transformers.cache_utils import DynamicLayer, StaticLayer
from transformers.models.auto import modeling_auto

from configuration import DecoderOnlyConfig
from modeling import DecoderOnlyForCausalLM, DecoderOnlyForSequenceClassification, DecoderOnlyModel
from modeling import modeling_decoder_only


try:
    build_harness()
    from hf_upstream_tests.generation.test_utils import GenerationTesterMixin
    from hf_upstream_tests.test_configuration_common import ConfigTester
    from hf_upstream_tests.test_modeling_common import ModelTesterMixin, ids_tensor, random_attention_mask
    from hf_upstream_tests.test_training_mixin import TrainingTesterMixin

    HARNESS_ERROR = None
except HarnessUnavailable as err:
    HARNESS_ERROR = str(err)


def test_transformers_test_mixins_available():
    """Loud failure (not a skip) when transformers' test mixins cannot be had from the sdist."""
    if HARNESS_ERROR is not None:
        pytest.fail(f"transformers' test mixins are unavailable, so none of them ran:\n{HARNESS_ERROR}")


# ------------------------------------------------------------------------------------------------------------ tester
class DecoderOnlyModelTester:
    """Tiny configs and inputs for the mixins (§11.2). Any `DecoderOnlyConfig` field can be overridden."""

    config_class = DecoderOnlyConfig
    base_model_class = DecoderOnlyModel
    causal_lm_class = DecoderOnlyForCausalLM
    sequence_classification_class = DecoderOnlyForSequenceClassification

    def __init__(self, parent, batch_size=3, seq_length=14, is_training=True, **config_overrides):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = True
        self.use_labels = True
        self.config_kwargs = {
            "vocab_size": 99,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 37,
            "dropout": 0.0,
            "attention_dropout": 0.0,
            # test_model_rope_scaling_from_config feeds 1.5x this many tokens: keep it small for the block/chunk loops.
            "max_position_embeddings": 64,
            "initializer_range": 0.02,
            "block_size": 4,
            "chunk_size": 8,
            "local_size": 2,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            **config_overrides,
        }
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            setattr(self, name, self.config_kwargs[name])
        self.head_dim = self.hidden_size // self.num_attention_heads

    def get_config(self) -> DecoderOnlyConfig:
        return self.config_class(**copy.deepcopy(self.config_kwargs))

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        return self.get_config(), input_ids, input_mask

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask = self.prepare_config_and_inputs()
        return config, {"input_ids": input_ids, "attention_mask": input_mask}


# ------------------------------------------------------------------------------------------------------ test classes
if HARNESS_ERROR is None:

    class DecoderOnlyMixinTests(ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin):
        """The mixin suite for one attention layout; concrete classes add `unittest.TestCase` and `tester_kwargs`."""

        all_model_classes = (DecoderOnlyModel, DecoderOnlyForCausalLM)
        model_tester = None  # set in setUp (TrainingTesterMixin declares it abstract)
        tester_kwargs: dict = {}
        test_all_params_have_gradient = True
        # Upstream runs test_can_init_all_missing_weights only for configs whose file has a "# Copyright <year>=2023+"
        # header (older models are exempt); ours has none, so opt in explicitly (new model, `_init_weights` complete).
        test_can_init_all_missing_weights_before_2023 = True
        # The upstream defaults (300 steps at lr 1e-3, 64 tokens) are sized for bigger testers; a 32-wide model reaches
        # the same thresholds (loss and grad norm down 90%, the training sequence regenerated) in fewer, larger steps.
        training_overfit_steps = 100
        training_overfit_learning_rate = 3e-3
        training_overfit_seq_length = 16

        _name_maps = (
            (modeling_auto.MODEL_MAPPING_NAMES, "DecoderOnlyModel"),
            (modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "DecoderOnlyForCausalLM"),
        )

        @classmethod
        def setUpClass(cls):
            super().setUpClass()
            # §11.2: the mixins decide "base model" / "gets labels" from these name maps, which `Auto*.register` does
            # not fill. Registered for this class only and restored afterwards, so other test files are unaffected.
            cls._name_map_patches = [mock.patch.dict(m, {"decoder_only": name}) for m, name in cls._name_maps]
            for patch in cls._name_map_patches:
                patch.start()

        @classmethod
        def tearDownClass(cls):
            for patch in reversed(cls._name_map_patches):
                patch.stop()
            super().tearDownClass()

        def setUp(self):
            self.model_tester = DecoderOnlyModelTester(self, **self.tester_kwargs)

        def test_config(self):
            """ConfigTester.run_common_tests (no seed aliases passed, §2.2)."""
            kwargs = {k: v for k, v in self.model_tester.config_kwargs.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
            ConfigTester(self, config_class=DecoderOnlyConfig, **kwargs).run_common_tests()

        # ------------------------------------------------------------------ layouts without softmax attention
        def _softmax_layers(self, config) -> list[int]:
            """Layers that form attention weights (gqa, dual_chunk); lightning layers never do."""
            return [i for i, kind in enumerate(config.attention_types) if kind != "lightning"]

        def test_attention_outputs(self):
            """Upstream expects one attention map per layer. Lightning layers are linear attention and never form the
            `[q, kv]` weight matrix, so `attentions` holds one entry per softmax layer (gqa / dual_chunk), in layer
            order (§11.2). Pure-softmax layouts run the upstream test unchanged; otherwise this checks the count and
            the `[batch, heads, q, kv]` shape of each map, for `output_attentions` as argument and from the config."""
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            softmax_layers = self._softmax_layers(config)
            if len(softmax_layers) == config.num_hidden_layers:
                return super().test_attention_outputs()
            batch, seq = inputs["input_ids"].shape
            for model_class in self.all_model_classes:
                model = model_class._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
                with torch.no_grad():
                    from_argument = model(**inputs, output_attentions=True).attentions
                    model.config.output_attentions = True
                    from_config = model(**inputs).attentions
                for attentions in (from_argument, from_config):
                    self.assertEqual(len(attentions), len(softmax_layers), f"{model_class.__name__}: one map per softmax layer")
                    for weights in attentions:
                        self.assertEqual(tuple(weights.shape), (batch, config.num_attention_heads, seq, seq))
                        # rows of real query tokens are distributions over the keys
                        rows = weights.sum(-1)[inputs["attention_mask"].bool()[:, None, :].expand_as(weights.sum(-1))]
                        torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-4, rtol=0)

        def test_retain_grad_hidden_states_attentions(self):
            """Without softmax layers (pure lightning) there is no attention map to retain a gradient on: run the
            upstream test in its own `has_attentions=False` branch (hidden-state gradients only)."""
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            if self._softmax_layers(config):
                return super().test_retain_grad_hidden_states_attentions()
            with mock.patch.object(self, "has_attentions", False):
                return super().test_retain_grad_hidden_states_attentions()

        def test_tp_plan_matches_params(self):
            """`base_model_tp_plan` is a class constant of DecoderOnlyConfig covering every layer kind. A layout without
            gqa/dual_chunk layers has no `self_attn.{q,k,v,o}_proj`, so those entries (and only those) are legitimately
            unused there; they are checked on the default GQA layout. Layouts with softmax layers run upstream's test."""
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            if self._softmax_layers(config):
                return super().test_tp_plan_matches_params()
            from transformers.distributed.parallel_utils import _get_parameter_plan

            softmax_entries = {f"layers.*.self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
            for model_class in self.all_model_classes:
                model = model_class(copy.deepcopy(config))
                names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_modules()}
                unused = {
                    pattern
                    for pattern in model.tp_plan
                    if not any(_get_parameter_plan(n, {pattern: ""}, is_weight=True) is not None for n in names)
                }
                self.assertTrue(unused <= {p for p in model.tp_plan if any(p.endswith(e) for e in softmax_entries)}, unused)
            gqa = DecoderOnlyModel(DecoderOnlyConfig(**{**self.model_tester.config_kwargs, "attention_types": None, "attention_type": "gqa"}))
            gqa_names = {n for n, _ in gqa.named_parameters()}
            for pattern in softmax_entries:
                self.assertTrue(any(_get_parameter_plan(n, {pattern: ""}, is_weight=True) is not None for n in gqa_names), pattern)

        def _check_rope_scaling_is_ignored(self, scaling_type):
            """No layer of this layout reads `rope_parameters` (lightning has no positions; dual_chunk rotates with
            plain RoPE frequencies at its remapped positions, by design, see DecoderOnlyConfig), so upstream's
            "scaled RoPE changes the output" cannot hold. Checked our way: the same weights under default and scaled
            `rope_parameters` give identical outputs, for short and long (> max_position_embeddings) inputs."""
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            scaled_config = copy.deepcopy(config)
            scaled_config.rope_parameters = {"rope_type": scaling_type, "factor": 10.0, "rope_theta": 10_000.0}
            model = DecoderOnlyModel(config).eval()
            scaled = DecoderOnlyModel(scaled_config).eval()
            scaled.load_state_dict(model.state_dict())
            for length in (10, int(config.max_position_embeddings * 1.5)):
                input_ids = ids_tensor([1, length], config.vocab_size)
                with torch.no_grad():
                    torch.testing.assert_close(scaled(input_ids).last_hidden_state, model(input_ids).last_hidden_state)

        def _layout_uses_rope_parameters(self) -> bool:
            config = self.model_tester.get_config()
            return any(kind == "gqa" and rope for kind, rope in zip(config.attention_types, config.rope_layers))

        def test_model_rope_scaling_from_config_0_linear(self):
            """Upstream test for layouts with RoPE gqa layers; otherwise `_check_rope_scaling_is_ignored`."""
            if self._layout_uses_rope_parameters():
                return super().test_model_rope_scaling_from_config_0_linear()
            self._check_rope_scaling_is_ignored("linear")

        def test_model_rope_scaling_from_config_1_dynamic(self):
            """Upstream test for layouts with RoPE gqa layers; otherwise `_check_rope_scaling_is_ignored`."""
            if self._layout_uses_rope_parameters():
                return super().test_model_rope_scaling_from_config_1_dynamic()
            self._check_rope_scaling_is_ignored("dynamic")

        def test_model_rope_scaling_from_config_2_yarn(self):
            """Upstream test for layouts with RoPE gqa layers; otherwise `_check_rope_scaling_is_ignored`."""
            if self._layout_uses_rope_parameters():
                return super().test_model_rope_scaling_from_config_2_yarn()
            self._check_rope_scaling_is_ignored("yarn")

        def test_model_forward(self):
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            model = DecoderOnlyModel(config).eval()
            with torch.no_grad():
                out = model(**inputs)
            batch, seq = inputs["input_ids"].shape
            self.assertEqual(tuple(out.last_hidden_state.shape), (batch, seq, self.model_tester.hidden_size))
            self.assertEqual(tuple(out.pooler_output.shape), (batch, self.model_tester.hidden_size))

    class DecoderOnlyModelTest(DecoderOnlyMixinTests, unittest.TestCase):
        """GQA everywhere, RoPE on every layer (the default layout)."""

        tester_kwargs = {"attention_type": "gqa", "num_hidden_layers": 2}

    class DecoderOnlyInterleavedRopeModelTest(DecoderOnlyMixinTests, unittest.TestCase):
        """GQA with iRoPE: RoPE on layer 0, NoPE on layer 1 (test_num_layers_is_small caps testers at 2 layers)."""

        tester_kwargs = {"attention_type": "gqa", "num_hidden_layers": 2, "interleave_rope": True}

    class DecoderOnlyLightningModelTest(DecoderOnlyMixinTests, unittest.TestCase):
        """Pure Lightning attention; block_size 4 with 14-token inputs gives several blocks."""

        tester_kwargs = {"attention_type": "lightning", "num_hidden_layers": 2, "block_size": 4}

    class DecoderOnlyHybridModelTest(DecoderOnlyMixinTests, unittest.TestCase):
        """Hybrid linear/softmax stack: lightning then gqa. Layer 0 is linear, so the cache length comes from its token
        counter and the masks are sized from the first softmax layer (test_num_layers_is_small caps testers at 2)."""

        tester_kwargs = {"attention_types": ["lightning", "gqa"], "num_hidden_layers": 2, "block_size": 4}

    class DecoderOnlyDualChunkModelTest(DecoderOnlyMixinTests, unittest.TestCase):
        """Dual Chunk Attention with chunk_size 8, local_size 2 (partition 6): 18-token inputs span three chunks."""

        tester_kwargs = {"attention_type": "dual_chunk", "num_hidden_layers": 2, "chunk_size": 8, "local_size": 2, "seq_length": 18}


# ------------------------------------------------------------------------------------- the checks are able to fail
def _forgetful_dynamic_update(original):
    """Bug: a dynamic layer stores the new keys/values but attends only to them (the past is ignored)."""

    def update(self, key_states, value_states, *args, **kwargs):
        original(self, key_states, value_states, *args, **kwargs)
        return key_states, value_states

    return update


def _static_update_without_advance(original):
    """Bug: a static layer does not advance its write position on single-token steps (each overwrites the last)."""

    def update(self, key_states, value_states, *args, **kwargs):
        out = original(self, key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] == 1:
            self.cumulative_length.sub_(1)
        return out

    return update


def _mask_ignoring_padding(original):
    """Bug: the softmax layers get a causal mask without the padding."""

    def create_causal_mask(*args, **kwargs):
        return original(*args, **{**kwargs, "attention_mask": None})

    return create_causal_mask


if HARNESS_ERROR is None:

    class GenerationChecksCanFailTest(unittest.TestCase):
        """Every §11.3 check of the project's GenerationTesterMixin fails on a model/cache with the bug it targets.

        Each case runs the real check of the GQA test class with one deliberate defect patched in and expects an
        AssertionError, so none of the checks can pass vacuously."""

        def _expect_failure(self, check: str, *patches):
            case = DecoderOnlyModelTest(check)
            case.setUp()
            with contextlib.ExitStack() as stack:
                for patch in patches:
                    stack.enter_context(patch)
                with self.assertRaises(AssertionError, msg=f"{check} passed on a broken model"):
                    getattr(case, check)()

        def test_greedy_check_fails_when_the_cache_drops_the_past(self):
            self._expect_failure(
                "test_generate_greedy_cache_matches_no_cache",
                mock.patch.object(DynamicLayer, "update", _forgetful_dynamic_update(DynamicLayer.update)),
            )

        def test_beam_check_fails_without_reorder_cache(self):
            self._expect_failure(
                "test_generate_beam_search_cache_matches_no_cache",
                mock.patch.object(DynamicLayer, "reorder_cache", lambda self, beam_idx: None),
            )

        def test_left_padding_check_fails_when_padding_is_not_masked(self):
            self._expect_failure(
                "test_generate_left_padding_matches_single_prompt",
                mock.patch.object(
                    modeling_decoder_only, "create_causal_mask", _mask_ignoring_padding(modeling_decoder_only.create_causal_mask)
                ),
            )

        def test_prefill_steps_check_fails_when_the_cache_drops_the_past(self):
            self._expect_failure(
                "test_prefill_then_single_token_steps_match_full_forward",
                mock.patch.object(DynamicLayer, "update", _forgetful_dynamic_update(DynamicLayer.update)),
            )

        def test_assisted_check_fails_when_crop_is_a_no_op(self):
            self._expect_failure(
                "test_assisted_decoding_matches_greedy",
                mock.patch.object(DynamicLayer, "crop", lambda self, tokens_to_remove: None),
            )

        def test_static_check_fails_when_the_static_cache_overwrites_slots(self):
            self._expect_failure(
                "test_generate_static_cache_matches_dynamic",
                mock.patch.object(StaticLayer, "update", _static_update_without_advance(StaticLayer.update)),
            )

        def test_packed_check_fails_when_packing_is_not_detected(self):
            self._expect_failure(
                "test_packed_sequences_match_padded_rows",
                mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None),
            )
