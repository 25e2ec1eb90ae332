"""One model interface for every stage (lm-eval's `LM`, cut to what cai needs).

`HFGenerator(model, tokenizer)` wraps a loaded transformers model:

* `generate(prompts, max_new_tokens=, temperature=, stop=, seed=, on_result=)` -> `list[Generation]`:
  batched (prompts sorted by token length, order restored; batches sized by padded tokens,
  `max_batch_tokens`, as well as rows), left padding, KV cache, greedy at temperature 0,
  stop strings and EOS; a row leaves the batch the step it ends.
* `next_token_logprobs(prompts, token_ids)` -> log-probs of the given ids as the next
  token: one forward pass per batch, only the last position's logits computed.
* `loglikelihood([(context, continuation), ...])` -> summed continuation log-probs,
  encoded lm-eval's way (`encode_pair`).

Sampling is Gumbel-max with one `torch.Generator` per *request*: request i of a call
with `seed=s` draws its noise from `derive_seed(s, i)` (or from `seed[i]` when a
sequence of per-request seeds is given). A request's sample therefore depends only
on its prompt and its seed, not on batch size, batch composition or sort order (up
to the float noise of padded batches), which is what makes a resumed stage equal an
uninterrupted one. Argmax(logits / T + Gumbel noise) is an exact sample from
softmax(logits / T); the model's own `do_sample` path is never used.

All encoding goes through `models.encode_batch` (no special tokens). `VLLMGenerator`
is the same interface over vLLM (raw prompts only, never `LLM.chat`); it is importable
only where vLLM is installed, untested here, and `cai run` refuses `generation.backend: vllm`
rather than run an untested path (scale out with `--shard I/N` instead).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, Literal, Protocol, Sequence

from cai.config import GenerationConfig
from cai.pipeline.models import encode, encode_batch

StopReason = Literal["stop", "eos", "length"]
# Padded tokens a generation batch may hold (rows x (prompt + new tokens)): bounds the KV
# cache (SmolLM2-135M: about 0.1 MB per token in fp32) whatever the row count.
DEFAULT_MAX_BATCH_TOKENS = GenerationConfig.model_fields["max_batch_tokens"].default


@dataclass(frozen=True)
class Generation:
    """One completion. `text` is cut before the first stop string (which is not included).
    `stop_reason`: "stop" (a stop string), "eos" (the model ended), "length" (max_new_tokens).
    `n_new_tokens`: tokens the model generated for this row, excluding EOS and padding."""

    text: str
    stop_reason: StopReason
    n_new_tokens: int


class Generator(Protocol):
    """What stages need from a model backend."""

    tokenizer: object

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                 stop: Sequence[str] = (), seed: int | Sequence[int] = 0, progress: str | None = None,
                 batch_size: int | None = None,
                 on_result: Callable[[int, Generation], None] | None = None) -> list[Generation]: ...

    def next_token_logprobs(self, prompts: list[str], token_ids: Sequence[int]) -> list[list[float]]: ...

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]: ...


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (stable across processes, unlike `hash`)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `TemplateLM._encode_pair`: trailing whitespace of the context moves into the
    continuation, the whole string is encoded once and split at the context's length, so the
    boundary token is the one the model would really see."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def truncate_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def token_budget_batches(order: list[int], lengths: list[int], *, max_rows: int, max_tokens: int,
                         max_new_tokens: int) -> list[list[int]]:
    """Consecutive runs of `order` (longest prompt first) holding at most `max_rows` prompts and
    at most `max_tokens` padded tokens at the end of decoding (rows x (longest prompt +
    max_new_tokens)), and always at least one prompt. Batches of short prompts get more rows
    than batches of long ones, so memory stays bounded and the matmuls stay wide."""
    batches: list[list[int]] = []
    for i in order:
        if batches:
            current = batches[-1]
            width = max(lengths[current[0]], lengths[i]) + max_new_tokens
            if len(current) < max_rows and (len(current) + 1) * width <= max_tokens:
                current.append(i)
                continue
        batches.append([i])
    return batches


def _decode_cache():
    """A transformers `DynamicCache` whose layers keep spare columns (`spare_columns_layer`)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    cache.layer_class_to_replicate = spare_columns_layer()
    return cache


@functools.cache
def spare_columns_layer():
    from transformers.cache_utils import DynamicLayer

    class SpareColumnsLayer(DynamicLayer):
        """transformers' `DynamicLayer` appends a decode step's key and value by `torch.cat`, which
        copies the whole cache every step; this one writes the step into spare columns of a
        larger buffer (`SPARE` more at each reallocation) and hands out views of it. Anything
        that replaces `keys` (dropping finished rows) is seen by identity and the next step
        reallocates, so the layer never writes into a tensor it did not allocate."""

        SPARE = 64
        _buffers = _view = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n = self.keys.shape[-2] if self.keys.dim() == 4 else 0
            k = key_states.shape[-2]
            if self._buffers is None or self.keys is not self._view or n + k > self._buffers[0].shape[-2]:
                batch, heads, _, dim = key_states.shape
                self._buffers = tuple(x.new_empty((batch, heads, n + k + self.SPARE, dim)) for x in (key_states, value_states))
                if n:
                    self._buffers[0][:, :, :n] = self.keys
                    self._buffers[1][:, :, :n] = self.values
            keys, values = self._buffers
            keys[:, :, n:n + k] = key_states
            values[:, :, n:n + k] = value_states
            self.keys = self._view = keys[:, :, :n + k]
            self.values = values[:, :, :n + k]
            return self.keys, self.values

    return SpareColumnsLayer


class _StopOnStrings:
    """Whether a row's new tokens' text contains a stop string. Only a tail window of the row
    is decoded (enough tokens to hold the longest stop string), so a check costs little next
    to a forward pass."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.window = max(len(s) for s in self.stop) + 2

    def __call__(self, ids: list[int]) -> bool:
        tail = self.tokenizer.decode(ids[-self.window:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return any(s in tail for s in self.stop)


class _GumbelSampler:
    """Turns greedy search into sampling: adds Gumbel noise from one generator per request to
    logits / temperature. A request draws one noise vector per step it is alive, whatever
    batch it sits in, so its sample depends only on (prompt, seed)."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.seeds = list(seeds)
        self.temperature = temperature
        self.generators = None

    def perturb(self, rows: Sequence[int], scores):
        """`scores[j]` belongs to request `rows[j]`."""
        import torch

        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(s) for s in self.seeds]
        scores = scores.float() / self.temperature
        tiny = torch.finfo(torch.float32).tiny
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=self.generators[r], device=scores.device,
                                          dtype=torch.float32) for r in rows])
        exponential = -torch.log(uniform.clamp_min(tiny))
        return scores - torch.log(exponential.clamp_min(tiny))  # + Gumbel(0, 1) noise


class HFGenerator:
    """Batched generation and scoring over a loaded transformers causal LM.

    The tokenizer must pad on the left (cai's loader sets it): the last position of
    every row is then its last real token, for generation and for next-token scoring.
    `self.counters` counts forward work (`scored_prompts`, `forward_batches`,
    `generated_tokens`) for benchmarks and stage statistics.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS):
        if tokenizer.padding_side != "left":
            raise ValueError(f"HFGenerator needs a left-padding tokenizer (got padding_side={tokenizer.padding_side!r}); "
                             "load it through cai.pipeline.models")
        if tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad token; load it through cai.pipeline.models")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.eos_token_id = tokenizer.eos_token_id
        self.counters = {"scored_prompts": 0, "forward_batches": 0, "generated_tokens": 0, "generate_calls": 0}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        forward_params = inspect.signature(base.forward).parameters
        self._logits_to_keep = "logits_to_keep" in forward_params
        # transformers renamed `past_key_values` to `cache` (the old name warns, then goes)
        self._cache_arg = "cache" if "cache" in forward_params else "past_key_values"

    @property
    def device(self):
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ helpers

    def _order(self, prompts: list[str]) -> tuple[list[int], list[int]]:
        """Prompt indices longest first (padding waste and OOM show up in the first batch)."""
        lengths = [len(ids) for ids in encode_batch(self.tokenizer, list(prompts))["input_ids"]]
        if lengths and min(lengths) == 0:
            raise ValueError("empty prompt: every prompt must encode to at least one token")
        order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
        return order, lengths

    def _tensors(self, texts: list[str]):
        enc = encode_batch(self.tokenizer, texts, padding=True, return_tensors="pt")
        input_ids = enc["input_ids"].to(self.device)
        attention_mask = enc["attention_mask"].to(self.device)
        return input_ids, attention_mask

    @staticmethod
    def _position_ids(attention_mask):
        # left padding: real tokens get positions 0..n-1 whatever the padding before them
        return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                 stop: Sequence[str] = (), seed: int | Sequence[int] = 0, progress: str | None = None,
                 batch_size: int | None = None,
                 on_result: Callable[[int, Generation], None] | None = None) -> list[Generation]:
        """Complete every prompt. `seed`: an int (request i samples with derive_seed(seed, i)) or
        one seed per prompt. Greedy (and seed-free) when temperature == 0. `on_result(i, g)` is
        called for each prompt of a batch as the batch ends, so a caller can write results while
        later batches decode (a crash loses only the batch in flight)."""
        prompts = list(prompts)
        if not prompts:
            return []
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if isinstance(seed, int):
            seeds = [derive_seed(seed, i) for i in range(len(prompts))]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != len(prompts):
                raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts")
        stop = tuple(s for s in stop if s)
        order, lengths = self._order(prompts)
        results: list[Generation | None] = [None] * len(prompts)
        bar = _progress_bar(progress, len(prompts))
        call_tokens = 0
        self.counters["generate_calls"] += 1
        try:
            for batch in token_budget_batches(order, lengths, max_rows=batch_size or self.batch_size,
                                              max_tokens=self.max_batch_tokens, max_new_tokens=max_new_tokens):
                rows = self._decode([prompts[i] for i in batch], [seeds[i] for i in batch], temperature, stop,
                                    max_new_tokens)
                for i, (ids, reason) in zip(batch, rows):
                    results[i] = self._finish(ids, reason, stop)
                    if on_result is not None:
                        on_result(i, results[i])
                n_new = sum(results[i].n_new_tokens for i in batch)
                call_tokens += n_new
                self.counters["generated_tokens"] += n_new
                self.counters["forward_batches"] += 1
                if bar is not None:
                    bar.update(len(batch))
                    bar.set_postfix(tok_s=f"{call_tokens / max(bar.format_dict['elapsed'], 1e-9):.1f}")
        finally:
            if bar is not None:
                bar.close()
        return results  # type: ignore[return-value]

    def _decode(self, texts: list[str], seeds: list[int], temperature: float, stop: Sequence[str],
                max_new_tokens: int) -> list[tuple[list[int], StopReason]]:
        """Greedy or Gumbel-max decoding of one batch with a KV cache, dropping each row from the
        batch (and from the cache) the step it ends: at EOS, at a stop string, at the token cap.
        `model.generate` keeps computing finished rows until the longest row ends, which on a
        batch with varied lengths costs most of the work; transformers' continuous batching
        (`generate_batch`) measured slower on the CPU. Returns each row's new ids (EOS
        excluded) and why it ended."""
        import torch

        input_ids, attention_mask = self._tensors(texts)
        positions = self._position_ids(attention_mask)
        cache = _decode_cache()
        sampler = _GumbelSampler(seeds, temperature) if temperature > 0 else None
        stop_check = _StopOnStrings(self.tokenizer, stop) if stop else None
        new_ids: list[list[int]] = [[] for _ in texts]
        reasons: list[StopReason] = ["length"] * len(texts)
        alive = list(range(len(texts)))
        kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
        with torch.inference_mode():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                             use_cache=True, **{self._cache_arg: cache}, **kwargs)
            next_position = positions[:, -1:] + 1
            for _ in range(max_new_tokens):
                scores = out.logits[:, -1, :].float()
                if sampler is not None:
                    scores = sampler.perturb(alive, scores)
                chosen = scores.argmax(dim=-1)
                keep = []
                for j, (row, token) in enumerate(zip(alive, chosen.tolist())):
                    if token == self.eos_token_id or token == self.tokenizer.pad_token_id:
                        reasons[row] = "eos"
                        continue
                    new_ids[row].append(token)
                    if stop_check is not None and stop_check(new_ids[row]):
                        reasons[row] = "stop"
                    elif len(new_ids[row]) < max_new_tokens:
                        keep.append(j)
                if not keep:
                    break
                if len(keep) < len(alive):
                    index = torch.tensor(keep, device=chosen.device)
                    cache.batch_select_indices(index)
                    attention_mask, next_position, chosen = attention_mask[index], next_position[index], chosen[index]
                    alive = [alive[j] for j in keep]
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(alive), 1))], dim=-1)
                out = self.model(input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=next_position,
                                 use_cache=True, **{self._cache_arg: cache}, **kwargs)
                next_position = next_position + 1
        return list(zip(new_ids, reasons))

    def _finish(self, ids: list[int], reason: StopReason, stop: Sequence[str]) -> Generation:
        """Turn one row's new token ids into a Generation, cut before its first stop string."""
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        text, stopped = truncate_at_stop(text, stop)
        return Generation(text, "stop" if stopped else reason, len(ids))

    # ------------------------------------------------------------------ scoring

    def next_token_logprobs(self, prompts: list[str], token_ids: Sequence[int], *,
                            batch_size: int | None = None) -> list[list[float]]:
        """log p(token | prompt) for each prompt and each of `token_ids` (full-vocab log-softmax).
        One forward pass per batch (batched like `generate`); only the last position's logits are computed."""
        import torch

        prompts = list(prompts)
        if not prompts:
            return []
        ids = torch.tensor(list(token_ids), dtype=torch.long)
        order, lengths = self._order(prompts)
        results: list[list[float] | None] = [None] * len(prompts)
        for batch in token_budget_batches(order, lengths, max_rows=batch_size or self.batch_size,
                                          max_tokens=self.max_batch_tokens, max_new_tokens=0):
            input_ids, attention_mask = self._tensors([prompts[i] for i in batch])
            kwargs = {"logits_to_keep": 1} if self._logits_to_keep else {}
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=self._position_ids(attention_mask), use_cache=False, **kwargs).logits
            logprobs = torch.log_softmax(logits[:, -1, :].float(), dim=-1)[:, ids.to(logits.device)].cpu().tolist()
            for row, i in enumerate(batch):
                results[i] = logprobs[row]
            self.counters["scored_prompts"] += len(batch)
            self.counters["forward_batches"] += 1
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests: list[tuple[str, str]], *, batch_size: int | None = None) -> list[float]:
        """Sum of log p(continuation tokens | context), lm-eval's encoding (`encode_pair`).
        The context must encode to at least one token: cai never prepends a BOS or other
        control token to make an empty context scorable."""
        import torch

        if not requests:
            return []
        pairs = [encode_pair(self.tokenizer, c, x) for c, x in requests]
        for (ctx, cont), (c, x) in zip(pairs, requests):
            if not ctx:
                raise ValueError(f"empty context for continuation {x[:40]!r}: cai adds no BOS/prefix token to score it")
            if not cont:
                raise ValueError(f"continuation {x!r} encodes to no tokens after context {c[-40:]!r}")
        lengths = [len(c) + len(x) - 1 for c, x in pairs]
        order = sorted(range(len(pairs)), key=lambda i: (-lengths[i], i))
        pad = self.tokenizer.pad_token_id
        results: list[float | None] = [None] * len(pairs)
        for batch in token_budget_batches(order, lengths, max_rows=batch_size or self.batch_size,
                                          max_tokens=self.max_batch_tokens, max_new_tokens=0):
            seqs = [(pairs[i][0] + pairs[i][1])[:-1] for i in batch]  # the last token is predicted, never input
            width = max(len(s) for s in seqs)
            input_ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
            attention_mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device)
            keep = max(len(pairs[i][1]) for i in batch)
            kwargs = {"logits_to_keep": keep} if self._logits_to_keep else {}
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=self._position_ids(attention_mask), use_cache=False, **kwargs).logits
            logits = logits[:, -keep:, :]
            for row, i in enumerate(batch):
                cont = pairs[i][1]
                row_logits = logits[row, logits.shape[1] - len(cont):, :].float()
                logp = torch.log_softmax(row_logits, dim=-1)
                target = torch.tensor(cont, device=logp.device).unsqueeze(-1)
                results[i] = float(logp.gather(-1, target).sum())
            self.counters["scored_prompts"] += len(batch)
            self.counters["forward_batches"] += 1
        return results  # type: ignore[return-value]


def _progress_bar(desc: str | None, total: int):
    if desc is None:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", dynamic_ncols=True, mininterval=1.0)


# ---------------------------------------------------------------------------- vLLM (optional)


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMGenerator:
    """UNTESTED HERE (vLLM is not installed on the development machines). The same
    interface over a `vllm.LLM`, for generation at scale on GPUs.

    Raw prompts only: `LLM.generate` on token ids encoded by cai's `encode` (no special
    tokens), never `LLM.chat`. Per-request seeds go into `SamplingParams(seed=...)`.
    Scoring uses `prompt_logprobs` on prompt + candidate token, so `next_token_logprobs`
    costs one (prefix-cached) request per (prompt, token id).
    """

    def __init__(self, llm, tokenizer):
        if not vllm_available():
            raise ImportError("VLLMGenerator needs the optional `vllm` extra: pip install 'cai[vllm]'")
        self.llm = llm
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def _run(self, token_prompts: list[list[int]], params: list):
        from vllm.inputs import TokensPrompt

        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in token_prompts], params, use_tqdm=False)

    def generate(self, prompts: list[str], *, max_new_tokens: int, temperature: float = 0.0,
                 stop: Sequence[str] = (), seed: int | Sequence[int] = 0, progress: str | None = None,
                 batch_size: int | None = None,
                 on_result: Callable[[int, Generation], None] | None = None) -> list[Generation]:
        from vllm import SamplingParams

        seeds = [derive_seed(seed, i) for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=s if temperature > 0 else None,
                                 stop=list(stop) or None, skip_special_tokens=False) for s in seeds]
        outs = self._run([encode(self.tokenizer, p) for p in prompts], params)
        results = []
        for out in outs:
            o = out.outputs[0]
            text, stopped = truncate_at_stop(o.text, stop)
            reason: StopReason = "stop" if stopped or isinstance(o.stop_reason, str) else (
                "length" if o.finish_reason == "length" else "eos")
            n = len([t for t in o.token_ids if t != self.eos_token_id])
            results.append(Generation(text, reason, n))
            if on_result is not None:
                on_result(len(results) - 1, results[-1])
        return results

    def next_token_logprobs(self, prompts: list[str], token_ids: Sequence[int], *,
                            batch_size: int | None = None) -> list[list[float]]:
        from vllm import SamplingParams  # vLLM schedules its own batches: batch_size is accepted, unused

        requests = [encode(self.tokenizer, p) + [t] for p in prompts for t in token_ids]
        outs = self._run(requests, [SamplingParams(max_tokens=1, prompt_logprobs=0)] * len(requests))
        flat = [o.prompt_logprobs[-1][req[-1]].logprob for o, req in zip(outs, requests)]
        k = len(token_ids)
        return [flat[i * k:(i + 1) * k] for i in range(len(prompts))]

    def loglikelihood(self, requests: list[tuple[str, str]]) -> list[float]:
        from vllm import SamplingParams

        pairs = [encode_pair(self.tokenizer, c, x) for c, x in requests]
        outs = self._run([c + x for c, x in pairs], [SamplingParams(max_tokens=1, prompt_logprobs=0)] * len(pairs))
        results = []
        for (ctx, cont), o in zip(pairs, outs):
            ids = ctx + cont
            results.append(sum(o.prompt_logprobs[j][ids[j]].logprob for j in range(len(ctx), len(ids))))
        return results

