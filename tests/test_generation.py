"""HFGenerator on the embedded model: batching, stop strings, sampling seeds, scoring."""

from __future__ import annotations

import collections
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cai.config import ModelConfig  # noqa: E402
from cai.pipeline import formats  # noqa: E402
from cai.pipeline.generation import (  # noqa: E402
    HFGenerator,
    VLLMGenerator,
    _GumbelSampler,
    spare_columns_layer,
    token_budget_batches,
    encode_pair,
    truncate_at_stop,
    vllm_available,
)
from cai.pipeline.models import ModelSlot, encode  # noqa: E402

PROMPTS = [formats.render("instruction_response", x) for x in (
    "List three prime numbers.",
    "Describe the four seasons of the year in a few sentences for a child.",
    "Write a haiku about rain.",
    "What is 2+2?",
)]


@pytest.fixture(scope="module")
def gen():
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        yield HFGenerator(slot.model, slot.tokenizer, batch_size=4)


class TestGenerate:
    def test_batched_equals_one_at_a_time_greedy(self, gen):
        prompts = PROMPTS[:3]  # three lengths: padding in play
        batched = gen.generate(prompts, max_new_tokens=8)
        single = [gen.generate([p], max_new_tokens=8, batch_size=1)[0] for p in prompts]
        assert [g.text for g in batched] == [g.text for g in single]
        assert [g.stop_reason for g in batched] == [g.stop_reason for g in single]
        assert all(g.stop_reason in {"eos", "length"} for g in batched)
        assert all(g.n_new_tokens == 8 for g in batched if g.stop_reason == "length")

    def test_stop_string_truncates_and_ends_early(self, gen):
        free = gen.generate(PROMPTS[:2], max_new_tokens=10)
        # a stop string taken from the model's own greedy output is bound to occur
        stops = [g.text[3:6] for g in free]
        assert all(len(s) == 3 for s in stops), free
        stopped = gen.generate(PROMPTS[:2], max_new_tokens=10, stop=stops)
        for f, s in zip(free, stopped):
            expected, hit = truncate_at_stop(f.text, stops)
            assert hit
            assert s.text == expected
            assert s.stop_reason == "stop"
            assert not any(x in s.text for x in stops)
            assert s.n_new_tokens < 10  # generation ended when every row had stopped

    def test_length_reason(self, gen):
        out = gen.generate(PROMPTS[1:2], max_new_tokens=2, progress="length test")  # tqdm bar on stderr
        assert out[0].stop_reason == "length" and out[0].n_new_tokens == 2

    def test_sampling_is_seeded_per_request_not_per_batch(self, gen):
        prompts = PROMPTS[2:4]
        a = gen.generate(prompts, max_new_tokens=6, temperature=0.9, seed=7)
        b = [gen.generate([p], max_new_tokens=6, temperature=0.9, seed=[s], batch_size=1)[0]
             for p, s in zip(prompts, _seeds(7, 2))]
        assert [g.text for g in a] == [g.text for g in b]
        c = gen.generate(prompts[::-1], max_new_tokens=6, temperature=0.9, seed=_seeds(7, 2)[::-1], batch_size=1)
        assert [g.text for g in c[::-1]] == [g.text for g in a]  # the sample follows the seed, not the position

    def test_counters(self, gen):
        before = gen.counters["generated_tokens"]
        out = gen.generate(PROMPTS[:1], max_new_tokens=3)
        assert gen.counters["generated_tokens"] - before == out[0].n_new_tokens


def _seeds(seed, n):
    from cai.pipeline.generation import derive_seed

    return [derive_seed(seed, i) for i in range(n)]


class TestScoring:
    def test_next_token_logprobs_match_unpadded_forward(self, gen):
        import torch

        ids = [49, 50, 330, 389]
        batched = gen.next_token_logprobs(PROMPTS, ids)  # different lengths: left padding in play
        for prompt, row in zip(PROMPTS, batched):
            x = torch.tensor([encode(gen.tokenizer, prompt)])
            with torch.inference_mode():
                full = torch.log_softmax(gen.model(input_ids=x).logits[0, -1].float(), -1)
            assert row == pytest.approx(full[ids].tolist(), abs=2e-4)

    def test_loglikelihood_matches_manual_sum(self, gen):
        import torch

        requests = [("Instruction: What is 2+2?\nResponse:", " 4"), ("The capital of France is ", "Paris.")]
        got = gen.loglikelihood(requests)
        for (context, continuation), value in zip(requests, got):
            ctx, cont = encode_pair(gen.tokenizer, context, continuation)
            x = torch.tensor([ctx + cont])
            with torch.inference_mode():
                logp = torch.log_softmax(gen.model(input_ids=x).logits[0].float(), -1)
            manual = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
            assert value == pytest.approx(manual, abs=2e-3)

    def test_encode_pair_moves_trailing_space(self, gen):
        ctx, cont = encode_pair(gen.tokenizer, "Answer: ", "A")
        assert ctx == encode(gen.tokenizer, "Answer:")
        assert cont == encode(gen.tokenizer, "Answer: A")[len(ctx):]

    def test_empty_context_refused(self, gen):
        with pytest.raises(ValueError, match="empty context"):
            gen.loglikelihood([("", "hello")])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40), st.lists(st.text(min_size=1, max_size=4), max_size=3))
def test_truncate_at_stop_property(text, stops):
    out, hit = truncate_at_stop(text, stops)
    assert text.startswith(out)
    assert not any(s in out for s in stops)
    assert hit == any(s in text for s in stops)


def test_gumbel_sampler_matches_softmax():
    import torch

    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(8000, 1)
    picks = _GumbelSampler(list(range(8000)), 1.0).perturb(range(8000), logits).argmax(-1).tolist()
    freq = collections.Counter(picks)
    for k, p in enumerate(torch.softmax(logits[0], -1).tolist()):
        assert abs(freq[k] / 8000 - p) < 0.02
    # temperature sharpens: at T=0.1 the argmax dominates
    cold = _GumbelSampler(list(range(2000)), 0.1).perturb(range(2000), logits[:2000]).argmax(-1)
    assert (cold == 2).float().mean() > 0.99


@pytest.mark.skipif(not vllm_available(), reason="vllm not installed (optional extra `cai[vllm]`); backend untested here")
def test_vllm_backend_interface():
    assert callable(VLLMGenerator.generate) and callable(VLLMGenerator.next_token_logprobs)


def test_vllm_backend_refuses_without_vllm():
    if vllm_available():
        pytest.skip("vllm installed")
    with pytest.raises(ImportError, match="vllm"):
        VLLMGenerator(llm=None, tokenizer=None)


def test_rows_leave_the_batch_when_they_end(gen):
    """A row that ends early (a stop string after a few tokens) does not cost the steps the
    longest row still takes: the forward passes equal the longest row's steps, the work on
    rows equals the tokens generated, and the result equals generating it alone."""
    import torch

    calls = []
    hook = gen.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        out = gen.generate(PROMPTS[:2], max_new_tokens=24, stop=[" "])  # the first space ends a row
        free = gen.generate(PROMPTS[:2], max_new_tokens=24)
    finally:
        hook.remove()
    stopped_calls, free_calls = calls[:len(calls) - 24], calls[len(calls) - 24:]
    assert all(o.stop_reason == "stop" for o in out)
    assert len(stopped_calls) < 24 and stopped_calls[0] == 2 and stopped_calls[-1] <= 2
    assert [f.stop_reason for f in free] == ["length", "length"] and free_calls == [2] * 24
    alone = [gen.generate([p], max_new_tokens=24, stop=[" "], batch_size=1)[0] for p in PROMPTS[:2]]
    assert out == alone
    assert torch.is_grad_enabled()


def _assert_sampling_equals_the_loop(gen, prompts, *, seed, max_new_tokens):
    """Seeded sampling of a batch equals each prompt sampled alone with its request's seed."""
    sampled = gen.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.8, seed=seed, stop=["."])
    alone = [gen.generate([p], max_new_tokens=max_new_tokens, temperature=0.8, seed=[s], stop=["."], batch_size=1)[0]
             for p, s in zip(prompts, _seeds(seed, len(prompts)))]
    assert sampled == alone


def test_a_shorter_row_finishes_alone_and_the_rest_match_the_loop(gen):
    """Rows of different lengths in one batch: each equals its one-prompt run (greedy and
    seeded sampling), so dropping finished rows from the KV cache changes nothing."""
    batched = gen.generate(PROMPTS, max_new_tokens=20, stop=["\n"])
    single = [gen.generate([p], max_new_tokens=20, stop=["\n"], batch_size=1)[0] for p in PROMPTS]
    assert batched == single
    _assert_sampling_equals_the_loop(gen, PROMPTS, seed=3, max_new_tokens=12)


@settings(max_examples=200, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40), max_rows=st.integers(1, 16),
       max_tokens=st.integers(1, 4000), max_new=st.integers(1, 200))
def test_token_budget_batches_cover_order_within_budget(lengths, max_rows, max_tokens, max_new):
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches = token_budget_batches(order, lengths, max_rows=max_rows, max_tokens=max_tokens, max_new_tokens=max_new)
    assert [i for b in batches for i in b] == order
    for b in batches:
        assert 1 <= len(b) <= max_rows
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + max_new) <= max_tokens


MIXED_PROMPTS = [formats.render("instruction_response", x) for x in (
    "Name a colour.",
    "Write two sentences about the sea, then stop.",
    "What is the capital of France? Answer in one word.",
    "List the days of the week, separated by commas, starting from Monday and ending on Sunday.",
    "Say hello.",
    "Explain in one short paragraph why the sky looks blue during the day and red at sunset.",
    "Count from one to five.",
    "Give a synonym for happy.",
    "Describe a cat.",
    "What is 3 times 4?",
)]


def test_long_decodes_stream_each_result_and_equal_the_loop(gen):
    """Ten prompts through four rows, 80 new tokens (past the cache layers' 64 spare columns, so
    they reallocate, also after rows have left): every output, greedy and seeded sampling,
    equals its one-prompt run, and `on_result` hands over each prompt once, as generated."""
    layers, ended = [], []
    hook = gen.model.register_forward_pre_hook(
        lambda m, a, kw: layers.extend(type(x) for x in kw[gen._cache_arg].layers), with_kwargs=True)
    try:
        greedy = gen.generate(MIXED_PROMPTS, max_new_tokens=80, on_result=lambda i, g: ended.append((i, g)))
    finally:
        hook.remove()
    assert layers and set(layers) == {spare_columns_layer()}
    assert sorted(i for i, _ in ended) == list(range(len(MIXED_PROMPTS)))
    assert [g for _, g in sorted(ended, key=lambda x: x[0])] == greedy
    assert any(g.n_new_tokens > 64 for g in greedy)
    alone = [gen.generate([p], max_new_tokens=80, batch_size=1)[0] for p in MIXED_PROMPTS]
    assert greedy == alone
    _assert_sampling_equals_the_loop(gen, MIXED_PROMPTS, seed=5, max_new_tokens=10)


@settings(max_examples=100, deadline=None)
@given(steps=st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=12), data=st.data())
def test_spare_columns_layer_equals_concatenation(steps, data):
    """Appends of any width, with rows dropped between them (`batch_select_indices`, which
    replaces the keys), give the same keys and values as transformers' `DynamicLayer`."""
    import torch
    from transformers.cache_utils import DynamicLayer

    spare, reference = spare_columns_layer()(), DynamicLayer()
    rows = 5
    for width, drop in steps:
        if drop and rows > 1 and reference.is_initialized:
            index = torch.tensor(sorted(data.draw(st.sets(st.integers(0, rows - 1), min_size=1, max_size=rows))))
            spare.batch_select_indices(index)
            reference.batch_select_indices(index)
            rows = len(index)
        k, v = torch.randn(rows, 2, width, 4), torch.randn(rows, 2, width, 4)
        got, want = spare.update(k, v), reference.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
