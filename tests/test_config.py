"""RunConfig: unknown keys and bad values are one-line errors naming file and key."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from cai.config import DPOConfig, RunConfig, load_config
from cai.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_smoke_config_loads():
    cfg = load_config("configs/smoke.yaml")
    assert cfg.model.source == "embedded" and cfg.format == "instruction_response"


def test_name_defaults_to_file_stem(tmp_path):
    assert load_config(write(tmp_path, "seed: 3\n")).name == "cfg"


@pytest.mark.parametrize("text, key", [
    ("sft:\n  lora:\n    rank: 8\n", "sft.lora.rank"),
    ("model:\n  quantization: 3bit\n", "model.quantization"),
    ("dpo:\n  beta: 1.5\n", "dpo.beta"),
    ("format: chatml\n", "chatml"),
    ("bogus: 1\n", "bogus"),
])
def test_bad_values_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    message = str(err.value)
    assert key in message and str(tmp_path / "cfg.yaml") in message and "\n" not in message


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"cfg.yaml: line \d+: invalid YAML"):
        load_config(write(tmp_path, "seed: 1\nmodel: [\n"))


@pytest.mark.parametrize("beta", [0.1, 0.2, 0.3, 1.0])
def test_beta_in_range_accepted_without_warning(beta, recwarn):
    assert DPOConfig(beta=beta).beta == beta
    assert not recwarn.list


@pytest.mark.parametrize("beta", [0.0, -0.1, 1.01])
def test_beta_outside_unit_interval_rejected(beta):
    with pytest.raises(ValidationError, match="beta"):
        DPOConfig(beta=beta)


def test_config_hash_tracks_content():
    a, b = RunConfig(name="x"), RunConfig(name="x", seed=1)
    assert a.hash() == RunConfig(name="x").hash() != b.hash()


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, "sft:\n  lr: 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "cai.cli", "run", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sft.lr" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("shard", [[], ["--shard", "0/2"]])
def test_cli_refuses_a_backend_it_cannot_drive(tmp_path, shard):
    """`generation.backend: vllm` was once accepted and silently ignored (HF ran instead)."""
    path = write(tmp_path, "model:\n  source: tiny-random\ngeneration:\n  backend: vllm\n")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cai.cli", "run", str(path), "--out", str(out), *shard],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "generation.backend: 'vllm' is not wired" in lines[0]
    assert not out.exists(), "refused before anything was written"
