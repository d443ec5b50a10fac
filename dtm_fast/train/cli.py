"""`dtm train`: one sub-model from a YAML config, with any config key overridable as `--key value`.

    dtm train --config train.yaml --learning_rate 1e-4
    dtm train train.yaml --nproc-per-node 8             # launches torchrun itself
    torchrun --nproc-per-node 8 -m dtm_fast.train train.yaml

Only argparse and the config dataclass are imported here; torch is imported when a run starts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from dtm_fast.errors import DtmError

# torchrun options forwarded as they are: (option, help)
LAUNCH_OPTIONS = [
    ("--nnodes", "number of nodes (or MIN:MAX) for a multi-node run"),
    ("--node-rank", "this node's rank in a static multi-node run"),
    ("--rdzv-backend", "torchrun rendezvous backend (c10d, etcd)"),
    ("--rdzv-endpoint", "rendezvous HOST:PORT shared by every node"),
    ("--rdzv-id", "job id shared by every node"),
    ("--master-addr", "address of node 0 for a static multi-node run"),
    ("--master-port", "port on node 0 for a static multi-node run"),
]


def configure(parser: argparse.ArgumentParser) -> None:
    from dtm_fast.train.config import TrainConfig
    import dataclasses

    parser.add_argument("config_file", nargs="?", metavar="CONFIG", help="YAML config (or use --config)")
    parser.add_argument("--config", dest="config_option", metavar="CONFIG", help="YAML config file")
    parser.add_argument("--plan", action="store_true",
                        help="print the per-rank memory plan for --nproc-per-node x --nnodes ranks and whether it "
                             "fits (the GPU seen, or --gpu-memory); loads nothing")
    parser.add_argument("--gpu-memory", default=None, metavar="SIZE",
                        help="with --plan: memory of one GPU to plan for, e.g. 80GB or 141GiB")
    launch = parser.add_argument_group("launching (torchrun)")
    launch.add_argument("--nproc-per-node", type=int, default=None,
                        help="processes (GPUs) per node; >1 launches torchrun with this command")
    for option, help_text in LAUNCH_OPTIONS:
        launch.add_argument(option, default=None, help=help_text)
    output = parser.add_argument_group("output")
    output.add_argument("--quiet", action="store_true", help="plain log lines instead of live progress")
    output.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    output.add_argument("--verbose", action="store_true", help="debug logging")
    keys = parser.add_argument_group("config keys (override the YAML file)")
    for item in dataclasses.fields(TrainConfig):
        flags = [f"--{item.name}"] + ([f"--{item.name.replace('_', '-')}"] if "_" in item.name else [])
        # a bare boolean flag (`--resume`) means true
        flag_kwargs = {"nargs": "?", "const": "true"} if item.type == "bool" else {}
        keys.add_argument(*flags, dest=f"set_{item.name}", default=argparse.SUPPRESS, metavar="VALUE",
                          help=f"default: {item.default!r}", **flag_kwargs)


def _config_path(args: argparse.Namespace) -> str | None:
    if args.config_file and args.config_option and args.config_file != args.config_option:
        raise DtmError(f"two config files given ({args.config_file} and {args.config_option}); give one")
    return args.config_option or args.config_file


def _override_texts(args: argparse.Namespace) -> dict[str, str]:
    return {key[len("set_"):]: value for key, value in vars(args).items() if key.startswith("set_")}


def _launch_torchrun(args: argparse.Namespace) -> int:
    """Re-run this command as `torchrun ... -m dtm_fast.train`, passing the config through."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc_per_node)]
    for option, _ in LAUNCH_OPTIONS:
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None:
            command += [option, str(value)]
    if args.nnodes in (None, "1") and not args.rdzv_endpoint and not args.master_addr:
        command.append("--standalone")  # one node: torchrun picks a free local port
    command += ["-m", "dtm_fast.train"]
    path = _config_path(args)
    if path:
        command.append(path)
    for key, value in _override_texts(args).items():
        command += [f"--{key}", value]
    command += [flag for flag in ("--quiet", "--json", "--verbose") if getattr(args, flag[2:])]
    return subprocess.call(command)


def _plan(args: argparse.Namespace, config) -> int:
    """`dtm train --plan`: the memory plan, exit 0 when it fits, a one-line refusal naming the fix otherwise."""
    from dtm_fast import ui
    from dtm_fast.train.plan import gib, plan_for

    nodes_text = str(args.nnodes or "1").split(":")[0]
    if not nodes_text.isdigit() or int(nodes_text) < 1:
        raise DtmError(f"--nnodes: expected a number of nodes (or MIN:MAX), got {args.nnodes!r}")
    per_node = args.nproc_per_node or 1
    if per_node < 1:
        raise DtmError(f"--nproc-per-node must be at least 1, got {per_node}")
    world_size = per_node * int(nodes_text)
    gpu_memory = None
    if args.gpu_memory is not None:
        from dtm_fast.merge.config import parse_size

        gpu_memory = parse_size(args.gpu_memory, "--gpu-memory")
    import torch

    device_type = "cuda" if gpu_memory is not None or torch.cuda.is_available() else "cpu"
    config.gradient_accumulation(world_size)
    plan = plan_for(config, world_size, device_type, gpu_memory, ranks_per_node=per_node)
    ui.table(f"memory plan: {config.finetuning} fine-tuning of {config.model} on {world_size} rank(s) ({device_type}, "
             f"micro-batch {config.micro_batch_size} x {config.max_length} tokens)", ["part", "per rank"], plan.rows())
    if plan.fits is False:
        raise DtmError(plan.refusal())
    ui.info(f"fits: {gib(plan.total)} of {gib(plan.capacity)} per rank ({plan.capacity_source})")
    return 0


def run(args: argparse.Namespace) -> int:
    from dtm_fast import ui
    from dtm_fast.train.config import load_config, parse_value

    if args.plan:
        overrides = {key: parse_value(value) for key, value in _override_texts(args).items()}
        config = load_config(_config_path(args), overrides)
        ui.configure(json_output=args.json, quiet=args.quiet)
        return _plan(args, config)
    launching = (args.nproc_per_node or 1) > 1 or args.nnodes not in (None, "1")
    if launching and "LOCAL_RANK" not in os.environ:
        return _launch_torchrun(args)
    overrides = {key: parse_value(value) for key, value in _override_texts(args).items()}
    config = load_config(_config_path(args), overrides)
    ui.configure(json_output=args.json, quiet=args.quiet)
    from dtm_fast.threads import configure_cpu_threads
    from dtm_fast.train.loop import train

    configure_cpu_threads()  # torchrun sets OMP_NUM_THREADS=1 for several ranks, which this respects
    train(config)
    return 0
