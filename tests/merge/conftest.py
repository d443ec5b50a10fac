"""Tiny checkpoints built on the fly: Llama models saved with transformers, and raw safetensors
files with chosen tensors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama_config(tie: bool = False):
    import transformers

    return transformers.LlamaConfig(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                    max_position_embeddings=64)


def save_llama(path: Path, state: dict, config, dtype, shard: str = "40KB") -> Path:
    import transformers

    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(state, strict=False)
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """A base and three fine-tunes (base + small noise), fp32 and bf16, untied."""
    import transformers

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(1234)
    config = tiny_llama_config()
    base_model = transformers.LlamaForCausalLM(config)
    base_state = {k: v.clone() for k, v in base_model.state_dict().items()}
    family = {}
    for dtype, tag in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        paths = {"base": save_llama(root / f"base-{tag}", base_state, config, dtype)}
        for index in range(3):
            generator = torch.Generator().manual_seed(100 + index)
            state = {k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in base_state.items()}
            paths[f"m{index}"] = save_llama(root / f"m{index}-{tag}", state, config, dtype)
        family[tag] = paths
    return family


def load_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


# 660,871 elements: above the sampling threshold of the bracketed TIES thresholds (4 x 131,072)
BIG_SHAPE = (1031, 641)


@pytest.fixture(scope="module")
def bf16_big_family(tmp_path_factory):
    """A base and three bf16 fine-tunes of one BIG_SHAPE tensor "w": their deltas take few distinct
    values, so many magnitudes tie."""
    return tied_bf16_family(tmp_path_factory.mktemp("big-bf16"), BIG_SHAPE, seed=5)


def tied_bf16_family(root: Path, shape: tuple[int, ...], seed: int) -> list[Path]:
    """A base (N(0, 0.02)) and three bf16 fine-tunes (+ N(0, 1e-3)) of one tensor "w" in `root`."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator) * 0.02
    paths = [write_safetensors(root / "base" / "model.safetensors", {"w": base.bfloat16()}).parent]
    for index in range(3):
        model = base + 1e-3 * torch.randn(shape, generator=generator)
        paths.append(write_safetensors(root / f"m{index}" / "model.safetensors", {"w": model.bfloat16()}).parent)
    return paths


# Code run in a fresh interpreter before the measured merge. Every loaded shared library is faulted in
# first: the first call of a torch operator otherwise pages in megabytes of libtorch code during the merge
# (9 MiB for ties on the reference backend here, more on other machines), which VmHWM counts although it
# is no part of the merge's memory. The peak is then reset to the resident size, the baseline.
PEAK_PRELUDE = """
import ctypes, json

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def map_library_code():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    MADV_POPULATE_READ = 22
    for line in open("/proc/self/maps"):
        fields = line.split()
        if len(fields) >= 6 and fields[1].startswith("r") and ".so" in fields[5].rsplit("/", 1)[-1]:
            start, stop = (int(address, 16) for address in fields[0].split("-"))
            if libc.madvise(start, stop - start, MADV_POPULATE_READ) != 0:  # a kernel before 5.14
                for page in range(start, stop, 4096):
                    ctypes.string_at(page, 1)

def start_peak():
    map_library_code()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident size
    return status("VmRSS")

def report_peak(baseline):
    print(json.dumps({"above_baseline": status("VmHWM") - baseline}))
"""


def peak_above_baseline(script: str, *args: object) -> int:
    """Run `script` (which calls start_peak() and report_peak() around the work it measures) in a fresh
    interpreter; the bytes its peak resident size rose above the baseline."""
    import json
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PEAK_PRELUDE + script, *map(str, args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])["above_baseline"]


# -- LoRA adapters of a tiny Llama (tests/merge/test_lora*.py) ----------------------------------------
PROMPT = torch.tensor([[1, 5, 9, 42, 7, 99, 3, 150]])
ATTENTION_AND_MLP = ["q_proj", "v_proj", "gate_proj", "down_proj"]
# name -> (r, lora_alpha, use_rslora, target modules, seed)
ADAPTERS = {
    "a0": (4, 8, False, ATTENTION_AND_MLP, 10),
    "a1": (4, 8, False, ATTENTION_AND_MLP, 11),
    "a2": (8, 4, True, ATTENTION_AND_MLP, 12),  # another rank, alpha and rslora
    "a3": (2, 4, False, ["k_proj", "up_proj"], 13),  # other modules
}


@pytest.fixture(scope="session")
def lora_family(tmp_path_factory):
    """A fp32 tiny Llama base directory and peft adapter directories trained 'on' it, with random
    non-zero lora_B (peft initialises B to zero, which would make every test pass trivially)."""
    import copy

    import peft
    import transformers

    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(4321)
    config = tiny_llama_config()
    base_model = transformers.LlamaForCausalLM(config).eval()
    paths = {"base": save_llama(root / "base", base_model.state_dict(), config, torch.float32, shard="1GB"),
             "base_bf16": save_llama(root / "base-bf16", base_model.state_dict(), config, torch.bfloat16)}
    for name, (rank, alpha, rslora, targets, seed) in ADAPTERS.items():
        lora = peft.LoraConfig(r=rank, lora_alpha=alpha, use_rslora=rslora, target_modules=targets,
                               lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
        model = peft.get_peft_model(copy.deepcopy(base_model), lora)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, parameter in model.named_parameters():
                if "lora_" in key:  # A re-drawn too, so adapters differ in both factors
                    parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
        model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def merge(paths, names, out, *options) -> int:
    from dtm_fast.cli import main as dtm

    return dtm(["merge", "--base", str(paths["base"]), *(str(paths[n]) for n in names), "-o", str(out),
                "--backend", "reference", "--quiet", *options])


def run_mergekit(config: Path, output: Path, *options: str) -> None:
    """mergekit-yaml (the peer tool) on a config; skips the test when mergekit is not installed."""
    import shutil
    import subprocess
    import sys

    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    if mergekit is None:
        pytest.skip("mergekit is not installed")
    subprocess.run([mergekit, str(config), str(output), "--quiet", *options], check=True, capture_output=True,
                   env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
