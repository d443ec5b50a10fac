"""Synthetic Llama checkpoints for `dtm bench merge`: a base of N(0, 0.02) weights and fine-tunes
= base + N(0, noise), written as sharded safetensors with config.json and an index, the layout both
dtm merge and mergekit read. Built once per preset into a work directory and reused while its
manifest matches (building the default set takes about a minute; the merge runs are what is timed)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "dtm_bench_model.json"


@dataclass(frozen=True)
class Preset:
    name: str
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    shard_bytes: int
    description: str

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of an untied Llama, in file order."""
        kv = self.kv_heads * self.head_dim
        shapes = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for layer in range(self.layers):
            prefix = f"model.layers.{layer}"
            shapes += [
                (f"{prefix}.input_layernorm.weight", (self.hidden,)),
                (f"{prefix}.self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (f"{prefix}.self_attn.k_proj.weight", (kv, self.hidden)),
                (f"{prefix}.self_attn.v_proj.weight", (kv, self.hidden)),
                (f"{prefix}.self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (f"{prefix}.post_attention_layernorm.weight", (self.hidden,)),
                (f"{prefix}.mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (f"{prefix}.mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (f"{prefix}.mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ]
        shapes += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return shapes

    def parameter_count(self) -> int:
        total = 0
        for _, shape in self.tensor_shapes():
            count = 1
            for dim in shape:
                count *= dim
            total += count
        return total

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5,
            "max_position_embeddings": 2048, "hidden_act": "silu", "rope_theta": 10000.0,
            "bos_token_id": 1, "eos_token_id": 2,
        }


PRESETS = {
    "default": Preset("default", 2048, 5632, 12, 32000, 32, 4, 500_000_000,
                      "1.32 GB bf16 Llama (issue 3's mergekit measurement)"),
    "small": Preset("small", 256, 688, 2, 1000, 8, 2, 2_000_000, "a few MB, for a quick check"),
    "70b-slice": Preset("70b-slice", 8192, 28672, 1, 128256, 64, 8, 5_000_000_000,
                        "Llama-3-70B shapes with 1 layer: 5.9 GB per model, 2.1 GB embedding"),
}


def _shard_plan(preset: Preset) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors grouped into shards of at most shard_bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    filled = 0
    for name, shape in preset.tensor_shapes():
        size = 2
        for dim in shape:
            size *= dim
        if shards[-1] and filled + size > preset.shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append((name, shape))
        filled += size
    return shards


def _write_model(directory: Path, preset: Preset, seed: int, base_dir: Path | None, noise: float) -> None:
    """One checkpoint: the base (seed's N(0, 0.02)) or base + N(0, noise), one shard in memory at a time."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    plan = _shard_plan(preset)
    weight_map = {}
    for number, shard_tensors in enumerate(plan, start=1):
        file = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        base_file = safe_open(str(base_dir / file), framework="pt") if base_dir is not None else None
        for name, shape in shard_tensors:
            if base_file is None:
                shard[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            else:
                noisy = torch.randn(shape, generator=generator).mul_(noise).add_(base_file.get_tensor(name).float())
                shard[name] = noisy.to(torch.bfloat16)
                del noisy
            weight_map[name] = file
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        del shard, base_file
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": preset.parameter_count() * 2}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(preset.config(), indent=1))
    os.replace(tmp, directory)


def build_models(workdir: Path, preset: Preset, models: int, noise: float) -> tuple[Path, list[Path]]:
    """The base and `models` fine-tunes under workdir/<preset>, built unless already there.

    Runs that share a --workdir share its models: each holds a shared lock on them until it exits,
    and one that must rebuild them (other settings) waits for an exclusive one. A directory in the
    way that this benchmark did not build (no manifest) is never deleted."""
    import fcntl

    from dtm_fast.errors import DtmError

    root = workdir / preset.name
    wanted = {"preset": asdict(preset), "models": models, "noise": noise, "version": 1}
    manifest = root / MANIFEST
    base = root / "base"
    tuned = [root / f"ft-{index}" for index in range(models)]

    def present() -> bool:
        return manifest.is_file() and json.loads(manifest.read_text()) == wanted and all(
            (path / "config.json").is_file() for path in [base, *tuned])

    workdir.mkdir(parents=True, exist_ok=True)
    lock = open(workdir / f".{preset.name}.lock", "a+")
    _HELD_LOCKS.append(lock)  # held until the process exits: other runs may not rebuild the models meanwhile
    fcntl.flock(lock, fcntl.LOCK_SH)
    if present():
        log.info("reusing the synthetic models in %s", root)
        return base, tuned
    fcntl.flock(lock, fcntl.LOCK_EX)  # waits for the runs still reading other models there
    try:
        if present():  # another run built them meanwhile
            return base, tuned
        if root.exists() and not manifest.is_file():
            raise DtmError(f"{root} exists and was not built by dtm bench (it has no {MANIFEST}); "
                           "choose another --workdir, or move that directory away")
        import shutil

        if root.exists():
            shutil.rmtree(root)  # this benchmark's models, built with other settings
        root.mkdir(parents=True)
        log.info("building %s: base + %d fine-tunes of %.2f GB each in %s", preset.name, models,
                 preset.parameter_count() * 2 / 1e9, root)
        _write_model(base, preset, seed=0, base_dir=None, noise=0.0)
        for index, path in enumerate(tuned, start=1):
            _write_model(path, preset, seed=index, base_dir=base, noise=noise)
        manifest.write_text(json.dumps(wanted, indent=1))
        return base, tuned
    finally:
        fcntl.flock(lock, fcntl.LOCK_SH)


_HELD_LOCKS: list = []


def checkpoint_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))
