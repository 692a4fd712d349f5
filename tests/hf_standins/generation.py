"""Project-authored stand-in for transformers' `tests/generation/test_utils.py` (not shipped in the sdist).

`GenerationTesterMixin` holds the project's generation checks (reference/transformers-v5.md §11.3). Every check
compares two ways of computing the same thing and asserts token equality **and** closeness of the per-step logits, so a
cache bug that does not happen to flip an argmax still fails. Checks that could pass vacuously also assert that the
code path they target actually ran (beam reordering with a non-identity permutation; assisted decoding rejecting at
least one drafted token, i.e. a real `crop`). tests/test_transformers_mixins.py shows each check failing on a
deliberately broken cache or model.

Test-class contract: `self.model_tester` with `get_config()` (dropout 0), `prepare_config_and_inputs_for_common()`,
`vocab_size`; `self.all_model_classes` / `self.all_generative_model_classes` (from `ModelTesterMixin`).
"""

import contextlib
import copy
from unittest import mock

import pytest
import torch
from transformers.cache_utils import Cache


class GenerationTesterMixin:
    generation_max_new_tokens = 8
    generation_atol = 1e-4
    generation_seed = 0

    # ------------------------------------------------------------------------------------------------- helpers
    def _generation_config(self):
        config = copy.deepcopy(self.model_tester.get_config())
        config.pad_token_id = 0
        config.eos_token_id = None  # never stop early: every run produces exactly max_new_tokens tokens
        config.bos_token_id = None
        return config

    def _generation_model(self, model_class, config=None, seed=None):
        config = self._generation_config() if config is None else config
        torch.manual_seed(self.generation_seed if seed is None else seed)
        return model_class(config).eval()

    def _generation_prompts(self, batch_size=2, seq_length=None):
        """Prompts without the pad id (0), so padding is unambiguous."""
        seq_length = seq_length or self.model_tester.seq_length
        generator = torch.Generator().manual_seed(1234)
        return torch.randint(1, self.model_tester.vocab_size, (batch_size, seq_length), generator=generator)

    def _generate(self, model, input_ids, attention_mask=None, **kwargs):
        kwargs = {
            "do_sample": False,
            "max_new_tokens": self.generation_max_new_tokens,
            "min_new_tokens": self.generation_max_new_tokens,
            "pad_token_id": model.config.pad_token_id,
            "return_dict_in_generate": True,
            "output_logits": True,
            **kwargs,
        }
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        with torch.no_grad():
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def _assert_same_generation(self, expected, actual, what, rows=None, check_logits=True):
        exp_seq, act_seq = expected.sequences, actual.sequences
        if rows is not None:
            exp_seq, act_seq = exp_seq[rows[0]], act_seq[rows[1]]
        new = self.generation_max_new_tokens
        self.assertEqual(
            exp_seq[..., -new:].tolist(), act_seq[..., -new:].tolist(), f"{what}: generated tokens differ"
        )
        if check_logits:
            exp_logits = torch.stack(expected.logits, dim=1)
            act_logits = torch.stack(actual.logits, dim=1)
            if rows is not None:
                exp_logits, act_logits = exp_logits[rows[0]], act_logits[rows[1]]
            torch.testing.assert_close(
                act_logits, exp_logits, atol=self.generation_atol, rtol=0, msg=lambda m: f"{what}: logits differ\n{m}"
            )

    @contextlib.contextmanager
    def _spy(self, owner, name, record):
        original = getattr(owner, name)

        def wrapper(obj, *args, **kwargs):
            record.append(args)
            return original(obj, *args, **kwargs)

        with mock.patch.object(owner, name, wrapper):
            yield

    def _generative_classes(self):
        classes = self.all_generative_model_classes
        if not classes:
            self.skipTest("no generative model class")
        return classes

    # -------------------------------------------------------------------------------------------------- checks
    @pytest.mark.generate
    def test_generate_greedy_cache_matches_no_cache(self):
        """Greedy decoding with the KV/recurrent cache == recomputing the whole sequence at every step."""
        for model_class in self._generative_classes():
            model = self._generation_model(model_class)
            prompts = self._generation_prompts()
            with_cache = self._generate(model, prompts, use_cache=True)
            without_cache = self._generate(model, prompts, use_cache=False)
            self._assert_same_generation(without_cache, with_cache, f"{model_class.__name__} greedy cache/no-cache")

    @pytest.mark.generate
    def test_generate_beam_search_cache_matches_no_cache(self):
        """Beam search (3 beams, 2 returned) with a cache == without; catches a cache that does not reorder its
        (recurrent) states. Also asserts that beams were really reordered (non-identity `beam_idx`)."""
        for model_class in self._generative_classes():
            model = self._generation_model(model_class)
            prompts = self._generation_prompts()
            kwargs = {"num_beams": 3, "num_return_sequences": 2, "output_scores": True, "output_logits": False}
            reorders = []
            with self._spy(Cache, "reorder_cache", reorders):
                with_cache = self._generate(model, prompts, use_cache=True, **kwargs)
            without_cache = self._generate(model, prompts, use_cache=False, **kwargs)
            identity = torch.arange(prompts.shape[0] * 3)
            self.assertTrue(
                any(not torch.equal(args[0].cpu(), identity) for args in reorders),
                "beam search never reordered the cache: the check would pass vacuously",
            )
            self._assert_same_generation(without_cache, with_cache, "beam cache/no-cache", check_logits=False)
            torch.testing.assert_close(
                with_cache.sequences_scores, without_cache.sequences_scores, atol=self.generation_atol, rtol=0
            )

    @pytest.mark.generate
    def test_generate_left_padding_matches_single_prompt(self):
        """A left-padded row of a batch generates exactly what the same prompt generates alone."""
        for model_class in self._generative_classes():
            model = self._generation_model(model_class)
            long_prompt, short_prompt = self._generation_prompts(batch_size=2)
            pad = self.model_tester.seq_length // 3 + 1
            short_prompt = short_prompt[pad:]
            batch = torch.stack([long_prompt, torch.cat([torch.zeros(pad, dtype=torch.long), short_prompt])])
            mask = torch.ones_like(batch)
            mask[1, :pad] = 0
            batched = self._generate(model, batch, attention_mask=mask)
            for row, prompt in ((0, long_prompt), (1, short_prompt)):
                alone = self._generate(model, prompt[None])
                self._assert_same_generation(
                    alone, batched, f"{model_class.__name__} left-padded row {row}", rows=(slice(0, 1), slice(row, row + 1))
                )

    def test_prefill_then_single_token_steps_match_full_forward(self):
        """Prefill a prefix with `use_cache=True`, feed the rest one token at a time through the cache: every output
        equals the one of a single full forward (atol 1e-4). Checked for every model class (hidden states of the base
        model, logits of the heads) and for several prefix lengths."""
        config = self._generation_config()
        input_ids = self._generation_prompts()
        seq = input_ids.shape[1]
        for model_class in self.all_model_classes:
            model = self._generation_model(model_class, config)
            with torch.no_grad():
                full = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))[0]
                for prefix in sorted({1, seq // 2, seq - 1}):
                    out = model(input_ids=input_ids[:, :prefix], attention_mask=torch.ones_like(input_ids[:, :prefix]), use_cache=True)
                    cache, pieces = out.cache, [out[0]]
                    self.assertIsNotNone(cache, f"{model_class.__name__}: use_cache=True returned no cache")
                    for t in range(prefix, seq):
                        out = model(
                            input_ids=input_ids[:, t : t + 1],
                            attention_mask=torch.ones_like(input_ids[:, : t + 1]),
                            cache=cache,
                            use_cache=True,
                        )
                        cache = out.cache
                        pieces.append(out[0])
                    stepped = torch.cat(pieces, dim=1)
                    torch.testing.assert_close(
                        stepped,
                        full,
                        atol=self.generation_atol,
                        rtol=0,
                        msg=lambda m: f"{model_class.__name__} prefill {prefix} + single steps != full forward\n{m}",
                    )

    @pytest.mark.generate
    def test_assisted_decoding_matches_greedy(self):
        """Assisted decoding with a *different* assistant (same architecture, other weights, so drafts get rejected
        and both caches are cropped) generates exactly the greedy output, for 1, 2 and 5 drafted tokens per step.
        Asserts that at least one draft token was rejected (a real `crop`), otherwise the check would be vacuous."""
        for model_class in self._generative_classes():
            model = self._generation_model(model_class)
            assistant = self._generation_model(model_class, seed=self.generation_seed + 1)
            prompt = self._generation_prompts(batch_size=1)
            greedy = self._generate(model, prompt)
            crops = []
            for num_assistant_tokens in (1, 2, 5):
                # `generate` kwargs do not reach the assistant: configure its own generation_config.
                assistant.generation_config.num_assistant_tokens = num_assistant_tokens
                assistant.generation_config.num_assistant_tokens_schedule = "constant"
                assistant.generation_config.assistant_confidence_threshold = 0.0
                with self._spy(Cache, "crop", crops):
                    assisted = self._generate(model, prompt, assistant_model=assistant)
                self._assert_same_generation(
                    greedy, assisted, f"{model_class.__name__} assisted ({num_assistant_tokens} drafts) vs greedy"
                )
            self.assertTrue(
                any(args and args[0] < 0 for args in crops),
                "the assistant's drafts were never rejected: the assisted check would pass vacuously",
            )

    @pytest.mark.generate
    def test_generate_static_cache_matches_dynamic(self):
        """`cache_implementation="static"` (pre-allocated key/value slots, unused ones masked) == the default dynamic
        cache, with a left-padded batch."""
        for model_class in self._generative_classes():
            model = self._generation_model(model_class)
            prompts = self._generation_prompts()
            mask = torch.ones_like(prompts)
            mask[1, :3] = 0
            prompts = prompts.masked_fill(mask == 0, 0)
            dynamic = self._generate(model, prompts, attention_mask=mask)
            static = self._generate(model, prompts, attention_mask=mask, cache_implementation="static")
            self._assert_same_generation(dynamic, static, f"{model_class.__name__} static vs dynamic cache")

    def test_packed_sequences_match_padded_rows(self):
        """Padding-free packing: two sequences concatenated in one row with restarting `position_ids` and no mask
        give, token for token, the outputs of the same sequences as right-padded rows of a batch."""
        config = self._generation_config()
        seq = self.model_tester.seq_length
        a, b = self._generation_prompts(batch_size=2)
        b = b[: seq - seq // 3]
        for model_class in self.all_model_classes:
            model = self._generation_model(model_class, config)
            packed_ids = torch.cat([a, b])[None]
            position_ids = torch.cat([torch.arange(len(a)), torch.arange(len(b))])[None]
            padded_ids = torch.zeros(2, len(a), dtype=torch.long)
            padded_ids[0], padded_ids[1, : len(b)] = a, b
            mask = (torch.arange(len(a))[None] < torch.tensor([[len(a)], [len(b)]])).long()
            # No cache, as transformers' own padding-free tests do: packing is a training-style forward, and the
            # masks detect it only without a cache (a cache would merge both sequences into one decoding state).
            with torch.no_grad():
                packed = model(input_ids=packed_ids, position_ids=position_ids, use_cache=False)[0][0]
                padded = model(input_ids=padded_ids, attention_mask=mask, use_cache=False)[0]
            torch.testing.assert_close(
                packed, torch.cat([padded[0], padded[1, : len(b)]]), atol=self.generation_atol, rtol=0,
                msg=lambda m: f"{model_class.__name__}: packed row != padded rows\n{m}",
            )  # fmt: skip
