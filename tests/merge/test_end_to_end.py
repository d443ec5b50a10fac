"""Whole merges of tiny Llama checkpoints through the `dtm merge` command: the output loads with
transformers and gives the logits of the same merge done in memory with the reference; and the
result agrees with mergekit on the same YAML."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_state, save_llama, tiny_llama_config
from dtm_fast.cli import main as dtm
from dtm_fast.merge.config import MergeConfig, ModelInput
from dtm_fast.merge.methods import METHODS
from dtm_fast.merge.methods.base import TensorContext
from dtm_fast.merge.plan import layer_index

PROMPT = torch.tensor([[1, 5, 9, 42, 7, 99, 3, 150]])


def in_memory_merge(config: MergeConfig) -> dict[str, torch.Tensor]:
    base = load_state(config.base) if config.base else None
    models = [load_state(m.path) for m in config.models]
    reference = base if base is not None else models[0]
    method = METHODS[config.method]
    merged = {}
    for name, value in reference.items():
        params = config.tensor_params(name, layer_index(name), 2)
        merged[name] = method.reference(params, base[name] if base else None, [m[name] for m in models],
                                        TensorContext(name, tuple(value.shape), config.seed)).to(value.dtype)
    return merged


def logits_of(path_or_state, config=None) -> torch.Tensor:
    import transformers

    if isinstance(path_or_state, dict):
        model = transformers.LlamaForCausalLM(config)
        model.load_state_dict(path_or_state)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path_or_state, torch_dtype=torch.float32)
    model.float().eval()
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.mark.parametrize("method,extra", [
    ("linear", []),
    ("ties", ["--density", "0.4", "--weights", "1", "0.5", "0.8"]),
    ("dare_ties", ["--density", "0.5"]),
    ("slerp", ["--t", "0.4"]),
])
def test_cli_merge_loads_with_transformers_and_matches_in_memory_merge(llama_family, tmp_path, method, extra):
    import transformers

    paths = llama_family["fp32"]
    models = [paths["m0"]] if method == "slerp" else [paths["m0"], paths["m1"], paths["m2"]]
    out = tmp_path / "merged"
    code = dtm(["merge", "--method", method, "--base", str(paths["base"]), *map(str, models), "-o", str(out),
                "--max-shard-size", "60KB", "--backend", "reference", "--quiet", *extra])
    assert code == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert (out / "config.json").is_file() and (out / "dtm_merge.json").is_file()
    provenance = json.loads((out / "dtm_merge.json").read_text())
    assert provenance["method"] == method and len(provenance["models"]) == len(models)

    per_model = [{} for _ in models]
    if "--weights" in extra:
        for params, weight in zip(per_model, extra[extra.index("--weights") + 1: extra.index("--weights") + 4]):
            params["weight"] = float(weight)
    shared = {}
    if "--density" in extra:
        shared["density"] = float(extra[extra.index("--density") + 1])
    if "--t" in extra:
        shared["t"] = float(extra[extra.index("--t") + 1])
    config = MergeConfig(method=method, models=tuple(ModelInput(m, p) for m, p in zip(models, per_model)),
                         output=out, base=paths["base"], parameters=shared)
    expected = in_memory_merge(config)
    written = load_state(out)
    assert written.keys() == expected.keys()
    for name in expected:
        assert torch.equal(written[name], expected[name]), name
    llama_config = transformers.AutoConfig.from_pretrained(paths["base"])
    assert torch.allclose(logits_of(out), logits_of(expected, llama_config), atol=1e-5)


def test_bf16_output_and_dtype_override(llama_family, tmp_path):
    paths = llama_family["bf16"]
    assert dtm(["merge", paths["m0"].as_posix(), paths["m1"].as_posix(), "-o", str(tmp_path / "bf16"), "--quiet"]) == 0
    assert dtm(["merge", paths["m0"].as_posix(), paths["m1"].as_posix(), "-o", str(tmp_path / "fp32"),
                "--dtype", "float32", "--quiet"]) == 0
    bf16, fp32 = load_state(tmp_path / "bf16"), load_state(tmp_path / "fp32")
    m0, m1 = load_state(paths["m0"]), load_state(paths["m1"])
    for name in bf16:
        exact = (m0[name].float() * 0.5 + m1[name].float() * 0.5)
        assert bf16[name].dtype == torch.bfloat16 and fp32[name].dtype == torch.float32
        assert torch.equal(fp32[name], exact)
        assert torch.equal(bf16[name], exact.to(torch.bfloat16))  # round to nearest even once
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["torch_dtype"] == "float32"


def test_tied_embeddings_stay_tied(tmp_path):
    import transformers

    config = tiny_llama_config(tie=True)
    torch.manual_seed(3)
    paths = []
    for index in range(2):
        model = transformers.LlamaForCausalLM(config)
        paths.append(save_llama(tmp_path / f"t{index}", model.state_dict(), config, torch.float32))
    out = tmp_path / "merged"
    assert dtm(["merge", *map(str, paths), "-o", str(out), "--quiet"]) == 0
    assert "lm_head.weight" not in load_state(out)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


MERGEKIT_CASES = {
    "linear": "parameters: {weight: 1.0}|parameters: {weight: 3.0}|parameters: {weight: 0.5}",
    "task_arithmetic": "parameters: {weight: 0.5}|parameters: {weight: 0.25}|parameters: {weight: 1.0}",
    "ties": "parameters: {weight: 1.0, density: 0.5}|parameters: {weight: 0.5, density: 0.3}|parameters: {weight: 0.7, density: 0.7}",
}


@pytest.mark.parametrize("method", list(MERGEKIT_CASES))
def test_agrees_with_mergekit(llama_family, tmp_path, method):
    """Differential test against mergekit 0.1.x on fp32 models. Random fp32 deltas have no equal
    magnitudes at the TIES threshold, so mergekit's exactly-k and our keep-all-ties rules agree."""
    mergekit = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    if mergekit is None:
        pytest.skip("mergekit is not installed")
    paths = llama_family["fp32"]
    lines = [f"merge_method: {method}", f"base_model: {paths['base']}", "dtype: float32", "models:"]
    if method != "linear":
        lines.append(f"  - model: {paths['base']}")
    for index, params in enumerate(MERGEKIT_CASES[method].split("|")):
        lines += [f"  - model: {paths[f'm{index}']}", f"    {params}"]
    if method == "linear":
        lines.remove(f"base_model: {paths['base']}")
    config = tmp_path / "merge.yml"
    config.write_text("\n".join(lines) + "\n")
    subprocess.run([mergekit, str(config), str(tmp_path / "mergekit"), "--quiet"], check=True,
                   capture_output=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert dtm(["merge", str(config), str(tmp_path / "dtm"), "--quiet"]) == 0
    theirs, ours = load_state(tmp_path / "mergekit"), load_state(tmp_path / "dtm")
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-6), name
