"""Logprob A/B critic on the embedded model: option ids, margins, swap, filtering."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from cai.config import ModelConfig, RunConfig  # noqa: E402
from cai.pipeline import critic, formats  # noqa: E402
from cai.pipeline.generation import HFGenerator  # noqa: E402
from cai.pipeline.models import ModelSlot, encode  # noqa: E402

CLEAR = [
    "Explain why the sky is blue in exactly three sentences.",
    "Give four reasons to learn to cook at home, as a bulleted list.",
    "Write a tweet announcing a bake sale, all in lowercase letters.",
    "Describe the moon without mentioning the words \"night\" or \"sky\".",
    "Suggest five names for a pet goldfish.",
    "Write a short email inviting a colleague to lunch, and add a postscript starting with P.S.",
]
BROKEN = ["asdf qwe zzzz ??", "hjk lkj jkl", "Write.", "and then because the of", "12 34 56 78",
          "purple monkey dishwasher sideways"]


@pytest.fixture(scope="module")
def gen():
    with ModelSlot(ModelConfig(source="embedded")) as slot:
        yield HFGenerator(slot.model, slot.tokenizer, batch_size=12)


@pytest.fixture(scope="module")
def judged(gen):
    return critic.judge_instructions(gen, CLEAR + BROKEN, swap=True)


def test_option_ids_are_computed_single_tokens(gen):
    id_a, id_b = critic.answer_token_ids(gen.tokenizer)
    cue = encode(gen.tokenizer, formats.CRITIC_ANSWER_CUE)
    assert encode(gen.tokenizer, formats.CRITIC_ANSWER_CUE + "A") == cue + [id_a]
    assert encode(gen.tokenizer, formats.CRITIC_ANSWER_CUE + "B") == cue + [id_b]
    assert gen.tokenizer.decode([id_a]) == "A" and gen.tokenizer.decode([id_b]) == "B"


def test_broken_instructions_score_below_clear_ones(judged):
    clear = [j.margin for j in judged[:len(CLEAR)]]
    broken = [j.margin for j in judged[len(CLEAR):]]
    assert sum(broken) / len(broken) < sum(clear) / len(clear)
    assert judged[len(CLEAR)].margin < sum(clear) / len(clear)  # "asdf qwe zzzz ??"
    # ranking quality: most (clear, broken) pairs are ordered correctly
    auc = sum(c > b for c in clear for b in broken) / (len(clear) * len(broken))
    assert auc >= 0.7, auc


def test_swap_combines_orders_and_reports_disagreement(gen, judged):
    for j in judged:
        assert j.passes == 2
        assert j.margin == pytest.approx((j.margin_ab - j.margin_ba) / 2)
        assert j.disagree == ((j.margin_ab > 0) != (j.margin_ba < 0))
        assert 0.0 < j.mass <= 1.0
    single = critic.judge_instructions(gen, CLEAR[:2], swap=False)
    assert all(j.passes == 1 and j.margin_ba is None and not j.disagree for j in single)
    assert [j.margin for j in single] == pytest.approx([j.margin_ab for j in judged[:2]], abs=1e-4)


def test_judge_is_one_forward_pass_per_prompt(gen):
    before = gen.counters["scored_prompts"]
    critic.judge_instructions(gen, CLEAR[:3], swap=True)
    assert gen.counters["scored_prompts"] - before == 6


def test_winner_abstains_below_threshold():
    j = critic.Judgement(margin=0.3, margin_ab=1.0, margin_ba=0.4, disagree=True, mass=0.5, passes=2)
    assert j.winner(0.2) == "first" and j.winner(0.5) is None
    assert j.winner(0.2, abstain_on_disagreement=True) is None
    assert critic.Judgement(-0.8, -0.8, None, False, 0.5, 1).winner(0.5) == "second"


def _cfg(**critic_cfg) -> RunConfig:
    return RunConfig.model_validate({"name": "t", "instructions": {"n": 4}, "critic": critic_cfg})


def _cands(texts):
    return [{"id": f"c{i}", "instruction": t} for i, t in enumerate(texts)]


def test_filter_keeps_best_confident_in_candidate_order(gen):
    texts = CLEAR[:4] + BROKEN[:3]
    cands = _cands(texts)
    kept, stats = critic.filter_instructions(_cfg(threshold=0.0, batch_size=14), gen, cands)
    # the same prompts in the same batch: identical margins to check the selection against
    margins = {c["id"]: j.margin for c, j in zip(cands, critic.judge_instructions(gen, texts, batch_size=14))}
    best = sorted((c for c, m in margins.items() if m >= 0.0), key=lambda c: -margins[c])[:4]
    assert [k["id"] for k in kept] == [c["id"] for c in cands if c["id"] in best]  # best, in candidate order
    assert all(k["critic"]["margin"] == pytest.approx(margins[k["id"]], abs=1e-4) for k in kept)
    assert stats["n_kept"] == len(kept) == min(4, stats["n_confident"]) and stats["n_candidates"] == 7
    assert stats["forward_passes_per_judgement"] == 2 and stats["forward_passes"] == 14
    assert 0.0 <= stats["disagreement_rate"] <= 1.0
    assert stats["rejection_rate"] == pytest.approx(1 - len(kept) / 7, abs=1e-4)
    assert sum(stats["margins"]["histogram"].values()) == 7
    assert stats["short_by"] == max(0, 4 - len(kept))


def test_filter_threshold_abstains(gen):
    kept, stats = critic.filter_instructions(_cfg(threshold=50.0, swap=False), gen, _cands(CLEAR[:2]))
    assert kept == [] and stats["short_by"] == 4 and stats["forward_passes_per_judgement"] == 1


def test_filter_disabled_keeps_first_n(gen):
    kept, stats = critic.filter_instructions(_cfg(enabled=False), gen, _cands(CLEAR))
    assert [k["id"] for k in kept] == ["c0", "c1", "c2", "c3"]
    assert stats["enabled"] is False and "off" in stats["filtering"]


def test_response_critic_prefers_an_answer_to_nonsense(gen):
    items = [("Name three primary colors.", "Red, blue and yellow.", "zq zq zq zq"),
             ("What is the capital of France?", "The capital of France is Paris.", "asdf qwe")]
    js = critic.judge_responses(gen, items, swap=True)
    assert all(j.passes == 2 for j in js)
    assert sum(j.margin for j in js) > 0


def test_margin_stats():
    s = critic.margin_stats([-5.0, -0.2, 0.1, 0.3, 4.5])
    assert s["n"] == 5 and s["quantiles"]["p50"] == 0.1
    assert s["histogram"] == {"<-4.0": 1, "[-0.5,0.0)": 1, "[0.0,0.5)": 2, ">=4.0": 1}
    assert critic.margin_stats([]) == {"n": 0}
