"""Invariants: small objects (name, severity, a docstring naming the failure they prevent,
`check(subject) -> Result`) usable in the pipeline (gates), in pytest (the harness) and
from the CLI (`cai check`).

Groups the runner calls (evaluate them with `evaluate(group, subject)`, store the results
in the manifest via `ArtifactWriter.finalize(invariants=...)`, then `raise_on_failures`):

- `tokenizer_invariants()` on a tokenizer / `TokenizerSubject` (or `check_tokenizer(tok, prov)`)
- `encoding_invariants()` on `prompt_tokenizer_subject(records, tok)` (a run's prompts)
- `data_invariants(kind, eval_sets=, critic_enabled=, train_format=)` on a `RecordSet`
- `eval_response_invariants(train_format, tokenizer=None)` on evaluation outputs (suite, model, key,
  prompt, response); with the tokenizer, the encoding sentinels run on the eval prompts too
- `PromptsIdenticalAcrossModels()` on {model: prompts} or evaluation records
- `open_slot_invariants()` on the open `ModelSlot` (inside the stage); `memory_invariants()` on
  the closed slot (stage boundary); `PeakMemoryRecorded()` (warning) on a slot or manifest;
  `memory_snapshot(events_since)` is what a stage passes to finalize(memory=...)
- `slot_leakage_results(slot)`: leakage layers 1 and 5 on the data slot (tokenizer, sentinel)
- `LmEvalNoControlTokens`, `LmEvalPromptParity`, `LmEvalScoreAgreement` on their probes
  (`cai.invariants.lmeval`; `cai.pipeline.lmeval.run_lm_eval` builds and checks them)
- `provenance_invariants(config_hash)` on an artifact directory
- `offline_invariants(model_cfg)` on None, before the first stage
- `SentinelBehaviour()` (warning) on a `ModelSlot` / `LoadedModel`
"""

from cai.invariants.base import (Invariant, Result, Severity, Status, all_passed, evaluate,
                                 raise_on_failures)
from cai.invariants.data import (ChosenDiffersFromRejected, ChosenPassesVerifier, CriticMarginsPresent,
                                 DuplicateRate, GatedChosenPasses, NonEmptyCompletions,
                                 NoTrainEvalOverlap, NoTruncatedCompletions, RecordSchema,
                                 data_invariants, encoding_invariants, eval_response_invariants)
from cai.invariants.leakage import (ChatTemplateDisabled, ChatTemplateRefuses, ChatTemplateShipped,
                                    ModelSubject, NoChatMarkers, NoSpecialTokenIds, RoundTrip,
                                    SentinelBehaviour, TokenizerSubject, check_tokenizer,
                                    prompt_tokenizer_subject, tokenizer_invariants)
from cai.invariants.lmeval import LmEvalNoControlTokens, LmEvalPromptParity, LmEvalScoreAgreement
from cai.invariants.markers import control_token_ids, find_chat_markers
from cai.invariants.memory import (LoadsSequenced, ModelsReleased, OneBaseModelResident, PeakMemoryRecorded,
                                   memory_invariants, memory_snapshot, open_slot_invariants)
from cai.invariants.offline import (HubOffline, ModelSourceLocal, PunktAvailable, enforce_offline,
                                    offline_invariants)
from cai.invariants.parity import FormatMatchesTraining, PromptFormatParity, PromptsIdenticalAcrossModels
from cai.invariants.provenance import (ArtifactSubject, ConfigHashMatches, HashesVerify, InputsCertified,
                                       ManifestComplete, RecordedInvariantsPassed, provenance_invariants)
from cai.invariants.records import RecordSet, detect_kind, load_records
from cai.invariants.slot import slot_leakage_results

__all__ = [
    "Invariant", "Result", "Severity", "Status", "all_passed", "evaluate", "raise_on_failures",
    "RecordSet", "RecordSchema", "NonEmptyCompletions", "NoTruncatedCompletions", "DuplicateRate",
    "NoTrainEvalOverlap", "CriticMarginsPresent", "ChosenDiffersFromRejected", "ChosenPassesVerifier",
    "GatedChosenPasses", "data_invariants", "detect_kind", "load_records",
    "encoding_invariants", "eval_response_invariants", "prompt_tokenizer_subject",
    "ChatTemplateShipped", "ChatTemplateDisabled", "ChatTemplateRefuses", "NoSpecialTokenIds", "RoundTrip",
    "NoChatMarkers", "SentinelBehaviour", "TokenizerSubject", "ModelSubject", "check_tokenizer",
    "find_chat_markers", "control_token_ids", "tokenizer_invariants",
    "OneBaseModelResident", "ModelsReleased", "PeakMemoryRecorded", "LoadsSequenced", "memory_invariants",
    "memory_snapshot", "open_slot_invariants", "slot_leakage_results",
    "LmEvalNoControlTokens", "LmEvalPromptParity", "LmEvalScoreAgreement",
    "HubOffline", "ModelSourceLocal", "PunktAvailable", "enforce_offline", "offline_invariants",
    "PromptFormatParity", "FormatMatchesTraining", "PromptsIdenticalAcrossModels",
    "ArtifactSubject", "ManifestComplete", "HashesVerify", "InputsCertified", "ConfigHashMatches",
    "RecordedInvariantsPassed", "provenance_invariants",
]
