"""lm-eval's own IFEval scoring functions, unmodified, for `cai_stage1_gen.yaml`
(`!function utils.process_results`, as lm-eval's own `ifeval.yaml` names them).

Imported through cai's scorer setup first: lm-eval's IFEval modules call `nltk.download`
when imported; `_ifeval()` puts cai's shipped punkt_tab first on NLTK's path, refuses the
download and seeds langdetect as cai's canonical scorer does, so both scorers see the same
data and seed, also when lm-eval runs this YAML without cai's bridge."""

from cai.pipeline.evaluate import _ifeval

_ifeval()

from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: E402

__all__ = ["process_results", "agg_inst_level_acc"]
