"""`dtm merge`: argument definitions (light) and the command (imports the engine on demand).

  dtm merge --method ties --base BASE M1 M2 ... -o OUT --weights 1 1 --density 0.5
  dtm merge config.yml OUT            (a mergekit YAML config)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dtm_fast.merge.budget import DEFAULT_MAX_MEMORY_TEXT

PARAMETER_OPTIONS = {  # CLI shortcut -> method parameter (per model when given several values)
    "weights": "weight", "density": "density", "gamma": "gamma",
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "examples:\n"
        "  dtm merge --method linear sub-0 sub-1 sub-2 sub-3 -o merged\n"
        "  dtm merge --method ties --base base M1 M2 --weights 1 0.5 --density 0.5 -o merged\n"
        "  dtm merge mergekit-config.yml merged --max-memory 2GiB\n"
        "  dtm merge --list-methods")
    parser.add_argument("inputs", nargs="*", metavar="MODEL",
                        help="model directories (HF safetensors or peft adapters), or CONFIG.yml OUT")
    parser.add_argument("-o", "--output", type=Path, help="output directory (written atomically)")
    parser.add_argument("--method", default="linear", help="merge method (default linear; see --list-methods)")
    parser.add_argument("--base", type=Path, help="base model (required by task-vector methods)")
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per model")
    parser.add_argument("--density", nargs="+", type=float, help="fraction kept (one value, or one per model)")
    parser.add_argument("--gamma", nargs="+", type=float, help="breadcrumbs: outlier fraction dropped")
    parser.add_argument("--lambda", dest="lambda_", type=float, help="scale of the merged task vector")
    parser.add_argument("--t", type=float, help="slerp: interpolation factor")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                        help="divide by the sum of weights (method default if not given)")
    parser.add_argument("--rescale", choices=("none", "l1", "inverse_density"), help="rescale of sparsified deltas")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="any other method parameter, e.g. --param filter_wise=true")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="output dtype (default: input's)")
    parser.add_argument("--max-memory", default=DEFAULT_MAX_MEMORY_TEXT,
                        help=f"memory budget for buffers and workspace (default {DEFAULT_MAX_MEMORY_TEXT}); any model "
                             "size fits")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    parser.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "triton"))
    parser.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks")
    parser.add_argument("--lora-mode", default="materialize", choices=("exact-concat", "materialize", "factor-average"),
                        help="how LoRA adapters are merged (see README)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="accept .bin pickle checkpoints (loaded with torch.load(weights_only=True))")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted merge of the same inputs")
    parser.add_argument("--verify-inputs", action="store_true",
                        help="hash every input file (slow: reads them once more) so that --resume and dtm_merge.json "
                             "identify inputs by content, not only by file identity and modification time")
    parser.add_argument("--strict", action="store_true",
                        help="stop at the first NaN or infinity in an input (default: merge and report them)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--shard-index", type=int, default=0, help="this process's share of the output shards")
    parser.add_argument("--num-shards", type=int, default=1, help="number of processes sharing the output shards")
    parser.add_argument("--list-methods", action="store_true", help="list the merge methods and their parameters")
    parser.add_argument("--json", action="store_true", help="machine-readable progress on stdout")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of progress bars")
    parser.add_argument("-v", "--verbose", action="store_true")


def _parse_param(text: str):
    import yaml

    from dtm_fast.errors import DtmError

    if "=" not in text:
        raise DtmError(f"--param {text!r}: expected NAME=VALUE")
    name, value = text.split("=", 1)
    try:
        return name.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise DtmError(f"--param {text!r}: cannot read the value ({problem}); write a number, true/false, a "
                       "list such as [0, 0.5, 1] or [{filter: mlp, value: 0.5}, {value: 1}]") from None


def build_config(args: argparse.Namespace):
    """The command line as MergeConfig.from_dict values (a mergekit YAML's, with these options on top)."""
    from dtm_fast.errors import DtmError
    from dtm_fast.merge.config import MergeConfig, parse_size

    # sizes are parsed here only to name the option in errors as the user typed it
    options = dict(max_memory=parse_size(args.max_memory, "--max-memory"),
                   max_shard_size=parse_size(args.max_shard_size, "--max-shard-size"), backend=args.backend,
                   seed=args.seed, lora_mode=args.lora_mode, allow_pickle=args.allow_pickle, resume=args.resume,
                   overwrite=args.overwrite, shard_index=args.shard_index, num_shards=args.num_shards,
                   verify_inputs=args.verify_inputs, strict=args.strict)
    if args.dtype:
        options["dtype"] = args.dtype
    if args.inputs and args.inputs[0].endswith((".yml", ".yaml")):
        from dtm_fast.merge.mergekit_yaml import load_mergekit_yaml

        if len(args.inputs) > 2 or (len(args.inputs) == 1 and args.output is None):
            raise DtmError("with a YAML config, give exactly: dtm merge CONFIG.yml OUT")
        output = Path(args.inputs[1]) if len(args.inputs) == 2 else args.output
        return load_mergekit_yaml(Path(args.inputs[0]), output, **options)
    if not args.inputs:
        raise DtmError("no models given; see dtm merge --help")
    if args.output is None:
        raise DtmError("no output directory given (-o OUT)")
    count = len(args.inputs)
    per_model: list[dict] = [{} for _ in range(count)]
    shared: dict = {}
    for option, name in PARAMETER_OPTIONS.items():
        values = getattr(args, option)
        if values is None:
            continue
        if len(values) == 1:
            shared[name] = values[0]
        elif len(values) == count:
            for model_params, value in zip(per_model, values):
                model_params[name] = value
        else:
            raise DtmError(f"--{option}: give one value or one per model ({count}), got {len(values)}")
    for option, name in (("lambda_", "lambda"), ("t", "t"), ("normalize", "normalize"), ("rescale", "rescale")):
        if getattr(args, option) is not None:
            shared[name] = getattr(args, option)
    for text in args.param:
        name, value = _parse_param(text)
        shared[name] = value
    return MergeConfig.from_dict({
        "method": args.method, "models": [{"path": path, "parameters": params} for path, params in zip(args.inputs, per_model)],
        "output": args.output, "base": args.base, "parameters": shared, **options})


def list_methods() -> int:
    from dtm_fast import ui
    from dtm_fast.merge.methods import METHODS
    from dtm_fast.merge.methods.base import REQUIRED

    rows = []
    for method in METHODS.values():
        params = ", ".join(f"{p.name}{'' if p.default is REQUIRED else '=' + str(p.default)}"
                           f"{' (per model)' if p.scope == 'model' else ''}" for p in method.params)
        rows.append([method.name, "yes" if method.needs_base else "no", method.summary, params])
    ui.table("merge methods", ["method", "base", "what it does", "parameters"], rows)
    return 0


def run(args: argparse.Namespace) -> int:
    from dtm_fast import ui

    ui.configure(json_output=args.json, quiet=args.quiet)
    if args.list_methods:
        return list_methods()
    from dtm_fast.merge.engine import run_merge

    run_merge(build_config(args))
    return 0
