"""Logprob A/B critic: one forward pass per prompt, the margin is log p(A) - log p(B).

The critic prompt (built in `formats`) ends in "Answer: (" so the next token names an
option. We read log-probs of the "A" and "B" tokens from one forward pass (the ids are
computed from the tokenizer, never hard-coded) and call the gap the margin, in nats.
With `swap`, the same pair is also judged with the options in the other order; the two
margins are combined as (m_ab - m_ba) / 2, which cancels a constant position bias, and
a judgement whose two orders pick different winners is recorded as `disagree`.

Two judgements:

* instruction quality: each candidate against one fixed, deliberately mediocre anchor
  instruction (`INSTRUCTION_ANCHOR`). The anchor is always the other option, so the
  margin is a per-candidate score on a common scale: > 0 means "clearer and more
  answerable than the anchor". `filter_instructions` keeps candidates whose margin clears
  `critic.threshold` (confident) and takes the best n by margin; it abstains on the rest.
* response quality: two responses to one instruction (`judge_responses`); best-of-N in
  `responses.py` is built on it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from cai.config import RunConfig
from cai.errors import CaiError
from cai.pipeline import formats
from cai.pipeline.models import encode

# Well-formed but maximally unspecific: a clear, specific instruction should beat it and a
# garbled or unanswerable one should lose to it. Changing it changes every margin: it is part
# of the critic's definition and recorded in the stats. Measured with the embedded 135M model
# (swap on), AUC of clear seed instructions vs 12 garbled ones: 0.83 / 0.86 on two disjoint
# seed subsets with this anchor, vs 0.70 / 0.66 with "Write something about a topic." and 0.68
# with "Tell me about dogs.". Without swap the same critic is at chance (AUC 0.45).
INSTRUCTION_ANCHOR = "Do something."
HISTOGRAM_EDGES = tuple(x / 2 for x in range(-8, 9))  # -4 .. 4 nats in 0.5 steps, plus under/overflow


@dataclass(frozen=True)
class Judgement:
    """One A/B judgement of (first, second). `margin` > 0 favours the first option.

    margin_ab: log p(A) - log p(B) with first shown as (A); margin_ba: the same with the
    options swapped (first shown as (B)), None without swap. `mass`: p(A) + p(B) averaged
    over the orders (how much the model answers with an option at all). `passes`: forward
    passes (prompts scored) behind this judgement."""

    margin: float
    margin_ab: float
    margin_ba: float | None
    disagree: bool
    mass: float
    passes: int

    def winner(self, threshold: float = 0.0, *, abstain_on_disagreement: bool = False) -> str | None:
        """'first', 'second', or None (abstain: |margin| below threshold, or optionally the orders disagree)."""
        if (abstain_on_disagreement and self.disagree) or abs(self.margin) < threshold or self.margin == 0:
            return None
        return "first" if self.margin > 0 else "second"

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Ids of the option letters as the token right after the critic cue "Answer: (".
    Computed by encoding cue + letter and taking what follows the cue's tokens; refuses a
    tokenizer where the letter is not exactly one token there (the margin would be wrong)."""
    cue = encode(tokenizer, formats.CRITIC_ANSWER_CUE)
    ids = []
    for letter in ("A", "B"):
        full = encode(tokenizer, formats.CRITIC_ANSWER_CUE + letter)
        if full[: len(cue)] != cue or len(full) != len(cue) + 1:
            raise CaiError(f"critic: {letter!r} after {formats.CRITIC_ANSWER_CUE!r} is not one token for this tokenizer "
                           f"(cue {cue}, cue+letter {full}); the A/B margin needs single-token options")
        ids.append(full[-1])
    return ids[0], ids[1]


def judge(gen, prompts_ab: Sequence[str], prompts_ba: Sequence[str] | None = None, *,
          batch_size: int | None = None) -> list[Judgement]:
    """Judge A/B prompts. prompts_ba[i] (optional) is prompts_ab[i] with the options swapped.
    All prompts go through one batched `next_token_logprobs` call: one forward pass per prompt."""
    prompts_ab = list(prompts_ab)
    if prompts_ba is not None and len(prompts_ba) != len(prompts_ab):
        raise ValueError(f"{len(prompts_ba)} swapped prompts for {len(prompts_ab)} prompts")
    id_a, id_b = answer_token_ids(gen.tokenizer)
    prompts = prompts_ab + (list(prompts_ba) if prompts_ba is not None else [])
    kwargs = {"batch_size": batch_size} if batch_size else {}
    scores = gen.next_token_logprobs(prompts, [id_a, id_b], **kwargs)
    n = len(prompts_ab)
    out = []
    for i in range(n):
        la, lb = scores[i]
        m_ab = la - lb
        mass = math.exp(la) + math.exp(lb)
        if prompts_ba is None:
            out.append(Judgement(m_ab, m_ab, None, False, mass, 1))
            continue
        la2, lb2 = scores[n + i]
        m_ba = la2 - lb2
        # first wins in order ab when m_ab > 0 and in order ba when m_ba < 0
        disagree = (m_ab > 0) != (m_ba < 0)
        out.append(Judgement((m_ab - m_ba) / 2, m_ab, m_ba, disagree, (mass + math.exp(la2) + math.exp(lb2)) / 2, 2))
    return out


def judge_instructions(gen, candidates: Sequence[str], *, swap: bool = True, anchor: str = INSTRUCTION_ANCHOR,
                       batch_size: int | None = None) -> list[Judgement]:
    """Each candidate (first) against the anchor (second): margin > 0 = better than the anchor."""
    ab = [formats.render_critic_instruction(c, anchor) for c in candidates]
    ba = [formats.render_critic_instruction(anchor, c) for c in candidates] if swap else None
    return judge(gen, ab, ba, batch_size=batch_size)


def judge_responses(gen, items: Sequence[tuple[str, str, str]], *, swap: bool = True,
                    batch_size: int | None = None) -> list[Judgement]:
    """items: (instruction, first response, second response); margin > 0 favours the first."""
    ab = [formats.render_critic_response(i, x, y) for i, x, y in items]
    ba = [formats.render_critic_response(i, y, x) for i, x, y in items] if swap else None
    return judge(gen, ab, ba, batch_size=batch_size)


def margin_stats(margins: Sequence[float]) -> dict[str, Any]:
    """Quantiles and a fixed-edge histogram of margins (nats)."""
    if not margins:
        return {"n": 0}
    xs = sorted(margins)

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return round(xs[lo] + (xs[hi] - xs[lo]) * (k - lo), 4)

    counts = [0] * (len(HISTOGRAM_EDGES) + 1)
    for x in xs:
        counts[sum(1 for e in HISTOGRAM_EDGES if x >= e)] += 1
    labels = [f"<{HISTOGRAM_EDGES[0]}"] + [f"[{a},{b})" for a, b in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:])] + [f">={HISTOGRAM_EDGES[-1]}"]
    return {"n": len(xs), "mean": round(sum(xs) / len(xs), 4),
            "quantiles": {"min": xs[0], "p10": q(0.1), "p25": q(0.25), "p50": q(0.5), "p75": q(0.75), "p90": q(0.9), "max": xs[-1]},
            "histogram": {label: c for label, c in zip(labels, counts) if c}}


def judgement_units(cfg: RunConfig, n_candidates: int) -> list[range]:
    """Candidates judged together (one `judge` call: `critic.batch_size` candidates, both
    orders): the unit of sharding. Fixed by the config so a unit's margins are the same
    floats wherever it is judged."""
    bs = cfg.critic.batch_size
    return [range(start, min(start + bs, n_candidates)) for start in range(0, n_candidates, bs)]


def judge_candidates(cfg: RunConfig, gen, candidates: Sequence[dict], shard=None) -> dict[str, Judgement]:
    """Judgements of the candidates (against the anchor) by id, unit by unit; with `shard`,
    only that shard's units."""
    from tqdm.auto import tqdm

    units = [unit for u, unit in enumerate(judgement_units(cfg, len(candidates))) if shard is None or shard.owns(u)]
    out: dict[str, Judgement] = {}
    for unit in tqdm(units, desc="critic: instructions", unit="batch", mininterval=1.0):
        chunk = [candidates[i] for i in unit]
        for c, j in zip(chunk, judge_instructions(gen, [c["instruction"] for c in chunk], swap=cfg.critic.swap,
                                                  batch_size=cfg.critic.batch_size)):
            out[c["id"]] = j
    return out


def filter_instructions(cfg: RunConfig, gen, candidates: Sequence[dict], *,
                        abstain_on_disagreement: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Judge every candidate, then `select_instructions`."""
    judgements = judge_candidates(cfg, gen, candidates) if cfg.critic.enabled else {}
    return select_instructions(cfg, candidates, judgements, abstain_on_disagreement=abstain_on_disagreement)


def select_instructions(cfg: RunConfig, candidates: Sequence[dict], judgements: dict[str, Judgement], *,
                        abstain_on_disagreement: bool = False) -> tuple[list[dict], dict[str, Any]]:
    """Keep the best `cfg.instructions.n` candidates the critic is confident about.

    Confident = combined margin against the anchor >= `cfg.critic.threshold`. The combined
    margin already cancels a constant position bias; a swap disagreement only says the
    preference is smaller than the bias, so it is reported (`disagreement_rate`) and abstains
    only with `abstain_on_disagreement=True` (a small, strongly position-biased critic such as
    the embedded 135M model disagrees on ~95% of items and would abstain on everything).
    Among the confident, the highest margins win (ties: earlier candidate);
    kept records come back in candidate order, each with a `critic` field. With
    `critic.enabled: false` the first n are kept and the stats say filtering was off.
    Fewer confident candidates than n is not an error here: `stats["short_by"]` says by how
    much and the caller decides (the runner must not let it pass silently)."""
    n = cfg.instructions.n
    candidates = list(candidates)
    if not cfg.critic.enabled:
        kept = [dict(c, critic=None) for c in candidates[:n]]
        return kept, {"enabled": False, "filtering": "off (critic.enabled: false): first n candidates kept",
                      "n_candidates": len(candidates), "n_kept": len(kept), "short_by": max(0, n - len(kept))}
    missing = [c["id"] for c in candidates if c["id"] not in judgements]
    if missing:
        raise CaiError(f"critic: {len(missing)} of {len(candidates)} candidates have no judgement (first: {missing[0]}); "
                       "every candidate must be judged before selection")
    judgements = [judgements[c["id"]] for c in candidates]
    threshold = cfg.critic.threshold
    confident = [i for i, j in enumerate(judgements)
                 if j.margin >= threshold and not (abstain_on_disagreement and j.disagree)]
    best = sorted(confident, key=lambda i: (-judgements[i].margin, i))[:n]
    kept = [dict(candidates[i], critic=judgements[i].to_json()) for i in sorted(best)]
    margins = [j.margin for j in judgements]
    stats = {
        "enabled": True,
        "anchor": INSTRUCTION_ANCHOR,
        "threshold": threshold,
        "swap": cfg.critic.swap,
        "abstain_on_disagreement": abstain_on_disagreement,
        "n_candidates": len(candidates),
        "n_confident": len(confident),
        "n_kept": len(kept),
        "short_by": max(0, n - len(kept)),
        "rejection_rate": round(1 - len(kept) / len(candidates), 4) if candidates else 0.0,
        "abstention_rate": round(1 - len(confident) / len(candidates), 4) if candidates else 0.0,
        "disagreement_rate": round(sum(j.disagree for j in judgements) / len(judgements), 4) if judgements else 0.0,
        "kept_with_disagreement": sum(judgements[i].disagree for i in best),
        "mean_option_mass": round(sum(j.mass for j in judgements) / len(judgements), 4) if judgements else 0.0,
        "forward_passes_per_judgement": (judgements[0].passes if judgements else (2 if cfg.critic.swap else 1)),
        "forward_passes": sum(j.passes for j in judgements),
        "margins": margin_stats(margins),
        "kept_margins": margin_stats([judgements[i].margin for i in best]),
    }
    return kept, stats
