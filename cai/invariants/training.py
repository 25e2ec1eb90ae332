"""Trainer-level invariants: what the SFT/DPO trainer actually feeds the model, and what
DPO compares the policy against. Both run before the first optimizer step; a failure
stops the run there (`cai.pipeline.training.run_trainer`).

- `FirstBatchSentinel` (layer 4 of DESIGN.md's chat-template sentinels): the first batch
  the trainer builds decodes exactly to canonical prompt + completion + declared EOS, the
  loss mask covers exactly the completion + EOS, and no BOS / chat-control id appears
  except that final EOS.
- `ReferenceIdentity`: at step 0 the DPO policy and its reference give the same
  log-probabilities (loss = ln 2, rewards 0), i.e. DPO starts from the SFT policy and is
  regularised towards it - not towards the adapter-disabled base.
- `TrainingTruncation` (warning): records longer than `max_length` lose their ends (and
  their EOS) to truncation.

Subjects are plain data (token id lists, floats, a tokenizer), so the invariants do not
depend on TRL; `cai.pipeline.training` builds them from a trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from cai.invariants.base import Invariant, Severity
from cai.invariants.markers import control_token_ids

IGNORE_INDEX = -100
LN2 = math.log(2.0)
MAX_PROBLEMS = 4  # problems spelled out in the evidence (the rest are counted)


def _short(text: str, n: int = 90) -> str:
    return repr(text if len(text) <= n else text[: n - 1] + "…")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _first_difference(a: Sequence, b: Sequence) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


# --------------------------------------------------------------------------- first batch


@dataclass
class Example:
    """One canonical training example: the prompt rendered by `formats.render` and its
    completion(s) - `{"completion": ...}` for SFT, `{"chosen": ..., "rejected": ...}` for DPO."""

    id: Any
    prompt: str
    completions: dict[str, str]


@dataclass
class FirstBatch:
    """The first batch a trainer built, as lists, plus what it should have been.

    `kind="sft"`: rows are examples; `loss_mask[i][j]` is `labels != -100` and `labels`
    must equal `input_ids` wherever it is set. `kind="dpo"`: DPOTrainer's collator stacks
    the chosen rows first, then the rejected rows in the same order; `loss_mask` is its
    `completion_mask`."""

    kind: Literal["sft", "dpo"]
    input_ids: list[list[int]]
    attention_mask: list[list[int]]
    loss_mask: list[list[int]]
    examples: Sequence[Example]
    tokenizer: Any
    eos_token: str
    labels: list[list[int]] | None = None
    max_length: int | None = None


@dataclass
class _Row:
    problems: list[str] = field(default_factory=list)
    candidates: list[tuple[Example, str, str]] = field(default_factory=list)  # (example, role, text) matching the row
    example: Example | None = None
    role: str | None = None
    truncated: bool = False
    n_tokens: int = 0
    n_prompt: int = 0


class FirstBatchSentinel(Invariant):
    """The first batch the trainer builds decodes EXACTLY to the canonical
    `prompt + completion + eos_token` of a training record (DPO: chosen and rejected of the
    same record), the loss covers exactly the completion and the final EOS (prompt and
    padding are masked), and no BOS or chat-control id appears except that final EOS.

    Prevents: a chat template applied by the trainer or its data path (ChatML around the
    project's format), a BOS the trainer's tokenizer call adds, a second EOS, a prompt
    trained on as if it were the answer, or a completion that is not trained on - each
    silently changes what the "base model instruction follower" learned."""

    name = "first_batch_sentinel"
    severity = Severity.ERROR

    def _check(self, fb: FirstBatch):
        tok = fb.tokenizer
        roles = ("completion",) if fb.kind == "sft" else ("chosen", "rejected")
        eos_id = tok.convert_tokens_to_ids(fb.eos_token)
        controls = control_token_ids(tok)
        if not fb.input_ids:
            return False, "the first batch is empty", None
        # token ids of every canonical text -> the (record, role) pairs that produce it: best-of-N
        # pairs share their chosen text, and a text can be chosen in one pair, rejected in another
        index: dict[tuple[int, ...], list[tuple[Example, str, str]]] = {}
        prompt_ids: dict[int, list[int]] = {}
        for ex in fb.examples:
            prompt_ids[id(ex)] = _encode(tok, ex.prompt)
            for role in roles:
                text = ex.prompt + ex.completions[role] + fb.eos_token
                index.setdefault(tuple(_encode(tok, text)), []).append((ex, role, text))

        rows = [self._row(fb, i, index, prompt_ids, controls, eos_id) for i in range(len(fb.input_ids))]
        if fb.kind == "dpo":
            half = len(rows) // 2
            for i in range(half):
                c, r = rows[i], rows[half + i]
                if not (c.candidates and r.candidates):
                    continue  # already reported as non-canonical
                chosen = {id(ex): ex for ex, role, _ in c.candidates if role == "chosen"}
                common = [ex for ex, role, _ in r.candidates if role == "rejected" and id(ex) in chosen]
                if common:
                    c.example = r.example = common[0]
                    c.role, r.role = "chosen", "rejected"
                else:
                    r.problems.append(f"rows {i} and {half + i} are not the chosen and the rejected completion of "
                                      f"one record (row {i}: {c.role} of {c.example.id!r}; row {half + i}: "
                                      f"{r.role} of {r.example.id!r})")
        problems = [p for row in rows for p in row.problems]
        details = [{"row": i, "id": row.example.id if row.example else None, "role": row.role,
                    "tokens": row.n_tokens, "prompt_tokens": row.n_prompt, "truncated": row.truncated,
                    "decoded": _decode(tok, [t for t, m in zip(fb.input_ids[i], fb.attention_mask[i]) if m])[:300]}
                   for i, row in enumerate(rows)]
        if problems:
            more = f" (+{len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
            return False, "; ".join(problems[:MAX_PROBLEMS]) + more, details
        n_trunc = sum(r.truncated for r in rows)
        what = "prompt + completion" if fb.kind == "sft" else "prompt + chosen / prompt + rejected"
        lo, hi = min(r.n_prompt for r in rows), max(r.n_prompt for r in rows)
        evidence = (f"{len(rows)} rows decode exactly to canonical {what} + {fb.eos_token!r}; the loss masks the "
                    f"{lo}-{hi} prompt tokens and padding and covers completion + EOS; no BOS or control id "
                    "except the final EOS")
        if n_trunc:
            evidence += f"; {n_trunc} row(s) cut at max_length={fb.max_length} (an exact canonical prefix, no EOS)"
        return True, evidence, details

    def _row(self, fb: FirstBatch, i: int, index, prompt_ids, controls, eos_id) -> _Row:
        tok = fb.tokenizer
        row = _Row()
        ids_all, attn, loss = fb.input_ids[i], fb.attention_mask[i], fb.loss_mask[i]
        n = sum(1 for m in attn if m)
        row.n_tokens = n
        if not all(attn[:n]) or any(attn[n:]):
            row.problems.append(f"row {i}: attention mask is not one block of real tokens then padding")
            return row
        ids = list(ids_all[:n])
        hits = index.get(tuple(ids), [])
        if not hits and fb.max_length is not None and n == fb.max_length:
            for key, value in index.items():
                if len(key) > n and list(key[:n]) == ids:
                    hits = hits + value
                    row.truncated = True
        row.candidates = hits
        hit = hits[0] if hits else None
        decoded = _decode(tok, ids)
        if hit is None:
            near = self._nearest(fb.examples, decoded)
            msg = f"row {i} decodes to {_short(decoded)}, which is not the canonical text of any record"
            if near is not None:
                canon = near.prompt + next(iter(near.completions.values())) + fb.eos_token
                at = _first_difference(decoded, canon)
                msg += (f"; record {near.id!r} expects {_short(canon)} (first difference at character {at}: "
                        f"{_short(decoded[at:at + 20], 30)} vs {_short(canon[at:at + 20], 30)})")
            row.problems.append(msg)
        else:
            row.example, row.role, text = hit
            if not row.truncated and decoded != text:
                row.problems.append(f"row {i}: ids match record {row.example.id!r} but decode to {_short(decoded)}, "
                                    f"not {_short(text)} (decode(encode(x)) != x)")
        # BOS / control ids: only the declared EOS, only as the last token of a complete row.
        last_ok = not row.truncated and n > 0 and ids[-1] == eos_id
        bad = [(j, t) for j, t in enumerate(ids) if t in controls and not (j == n - 1 and last_ok)]
        if bad:
            shown = ", ".join(f"{tok.convert_ids_to_tokens(t)!r} (id {t}) at position {j}" for j, t in bad[:3])
            row.problems.append(f"row {i}: control/BOS token(s) {shown}" + (" - position 0 is a BOS" if bad[0][0] == 0 else ""))
        # Loss mask: prompt tokens and padding masked, completion + EOS trained.
        if row.example is not None:
            p_ids = prompt_ids[id(row.example)]
            row.n_prompt = len(p_ids)
            if ids[: len(p_ids)] != p_ids[: min(len(p_ids), n)]:
                row.problems.append(f"row {i}: the tokenized prompt is not a prefix of the tokenized prompt + "
                                    f"completion (tokens merge across the boundary at {_short(row.example.prompt[-12:], 20)})")
            expected = [0] * min(len(p_ids), n) + [1] * max(0, n - len(p_ids)) + [0] * (len(ids_all) - n)
            got = [1 if m else 0 for m in loss]
            if got != expected:
                j = _first_difference(got, expected)
                where = "prompt" if j < len(p_ids) else ("padding" if j >= n else "completion")
                row.problems.append(f"row {i}: loss mask wrong at position {j} ({where} token "
                                    f"{'trained' if got[j] else 'masked'}); trained positions {_spans(got)}, "
                                    f"expected {_spans(expected)}")
            if fb.labels is not None:
                wrong = [j for j, (lab, m) in enumerate(zip(fb.labels[i], got)) if m and lab != ids_all[j]]
                if wrong:
                    row.problems.append(f"row {i}: labels differ from input_ids at trained positions {wrong[:5]}")
        return row

    @staticmethod
    def _nearest(examples: Sequence[Example], decoded: str) -> Example | None:
        """The record a wrong row most likely came from: its completion (or prompt body)
        occurs in the decoded text."""
        for ex in examples:
            if any(c.strip() and c.strip() in decoded for c in ex.completions.values()):
                return ex
        return examples[0] if examples else None


def _spans(mask: Sequence[int]) -> str:
    spans, start = [], None
    for j, m in enumerate(list(mask) + [0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            spans.append(f"{start}-{j - 1}")
            start = None
    return "[" + ", ".join(spans) + "]"


# --------------------------------------------------------------------------- DPO reference


@dataclass
class ReferenceLogps:
    """Summed completion log-probs of the first DPO batch, one value per pair: the policy's
    and the reference's, both computed live on the same padded batch by the same code path
    (so identical models give identical numbers in any dtype), plus the reference values
    the trainer precomputed before training, when it did (other batches, other padding:
    equal only up to numerical noise)."""

    policy_chosen: list[float]
    policy_rejected: list[float]
    reference_chosen: list[float]
    reference_rejected: list[float]
    beta: float
    tolerance: float = 1e-3
    reference: str = "reference"  # how the trainer obtains it, for the evidence
    precomputed_chosen: list[float] | None = None
    precomputed_rejected: list[float] | None = None
    precompute_tolerance: float = 0.05  # on beta * |precomputed - live|, i.e. in reward units

    def losses_and_rewards(self) -> tuple[float, list[float], list[float]]:
        chosen = [self.beta * (p - r) for p, r in zip(self.policy_chosen, self.reference_chosen)]
        rejected = [self.beta * (p - r) for p, r in zip(self.policy_rejected, self.reference_rejected)]
        losses = [_softplus(-(c - r)) for c, r in zip(chosen, rejected)]  # -log sigmoid(beta * delta)
        return sum(losses) / len(losses), chosen, rejected

    def precompute_drift(self) -> float | None:
        if self.precomputed_chosen is None:
            return None
        live = self.reference_chosen + self.reference_rejected
        pre = list(self.precomputed_chosen) + list(self.precomputed_rejected or [])
        return max(self.beta * abs(a - b) for a, b in zip(live, pre))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


class ReferenceIdentity(Invariant):
    """At step 0 of DPO the policy and the reference agree: on the first batch the DPO loss
    is ln 2 and every implicit reward beta * (log pi - log pi_ref) is ~0 (within
    `tolerance`); reference log-probs precomputed before training agree with the live
    reference (within `precompute_tolerance`, reward units).

    Prevents: DPO regularised towards the wrong model. With `peft_config` and
    `ref_model=None`, TRL's reference is the base with the adapter disabled - not the SFT
    policy DPO is meant to start from and stay near - so the run optimises away from SFT
    from its first step while reporting ordinary-looking losses. Also catches precomputed
    reference log-probs from another model (e.g. a stale cache)."""

    name = "dpo_reference_identity"
    severity = Severity.ERROR

    def _check(self, s: ReferenceLogps):
        if not s.policy_chosen:
            return False, "no pairs in the first batch", None
        loss, chosen, rejected = s.losses_and_rewards()
        max_reward = max(abs(x) for x in chosen + rejected)
        drift = s.precompute_drift()
        details = {"loss": loss, "ln2": LN2, "max_abs_reward": max_reward, "beta": s.beta,
                   "tolerance": s.tolerance, "reference": s.reference,
                   "rewards_chosen": chosen, "rewards_rejected": rejected,
                   "precomputed_max_abs_reward_diff": drift}
        identical = abs(loss - LN2) <= s.tolerance and max_reward <= s.tolerance
        summary = (f"step-0 DPO loss {loss:.6f} vs ln 2 = {LN2:.6f} (|diff| {abs(loss - LN2):.2e}), "
                   f"max |reward| {max_reward:.2e}, tolerance {s.tolerance:g}, beta {s.beta:g}; reference: {s.reference}")
        if drift is not None:
            summary += f"; precomputed vs live reference: max {drift:.2e} reward units (tolerance {s.precompute_tolerance:g})"
        if not identical:
            return False, (summary + ": the reference is not the policy DPO starts from (e.g. the adapter-disabled "
                           "base instead of the SFT policy)"), details
        if drift is not None and drift > s.precompute_tolerance:
            return False, summary + ": the precomputed reference log-probs come from another model", details
        return True, summary + ": policy and reference are the same model at step 0", details


# --------------------------------------------------------------------------- truncation


@dataclass
class TokenLengths:
    """Token counts of each record's prompt + completion + EOS (DPO: the longer of chosen
    and rejected) against the trainer's `max_length`."""

    ids: list[Any]
    lengths: list[int]
    max_length: int


class TrainingTruncation(Invariant):
    """Records longer than `max_length` are cut by the trainer: the model never sees their
    end or their EOS, so it learns to ramble instead of stopping. Reported (warning) with
    the count and the longest record."""

    name = "training_truncation"
    severity = Severity.WARN

    def _check(self, s: TokenLengths):
        over = [(i, n) for i, n in zip(s.ids, s.lengths) if n > s.max_length]
        longest = max(s.lengths, default=0)
        if not over:
            return True, f"all {len(s.lengths)} records fit in max_length={s.max_length} (longest {longest} tokens)"
        worst = max(over, key=lambda x: x[1])
        return False, (f"{len(over)} of {len(s.lengths)} records exceed max_length={s.max_length} and lose their end "
                       f"and EOS (longest: {worst[0]!r}, {worst[1]} tokens)"), {"over": over[:50]}
