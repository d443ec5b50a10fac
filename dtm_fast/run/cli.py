"""`dtm run dtm.yaml`: the whole DTM experiment, resumable.

    dtm run dtm.yaml                       # disperse -> train K sub-models + vanilla -> merge -> eval
    dtm run dtm.yaml --dry-run             # the plan: each stage, current or what it would do
    dtm run dtm.yaml --nproc-per-node 8    # each training job as its own torchrun job on 8 GPUs
    dtm run dtm.yaml --emit slurm          # SLURM scripts: prepare, a training array, merge + eval

Only argparse is imported here; the stages import torch when they run.
"""

from __future__ import annotations

import argparse

from dtm_fast.errors import DtmError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the experiment's YAML file (dtm.yaml)")
    parser.add_argument("-o", "--output", metavar="DIR", help="run directory (overrides run_dir in the config)")
    parser.add_argument("--dry-run", action="store_true", help="print the stages and which are current; run nothing")
    parser.add_argument("--nproc-per-node", type=int, metavar="N",
                        help="processes (GPUs) per training job; >1 runs each job with torchrun "
                             "(default: launch.nproc_per_node in the config, else 1)")
    parser.add_argument("--emit", choices=("slurm",), help="write cluster scripts into RUN_DIR/slurm instead of running")
    parser.add_argument("--stage", choices=("all", "prepare", "train", "finish"), default="all",
                        help="run only part of the run (what the SLURM jobs do): prepare = base + disperse, "
                             "train = one training job (--index), finish = merge + eval")
    parser.add_argument("--until", choices=("disperse", "train", "merge", "eval"), default="eval",
                        help="stop after this stage (e.g. train and merge now, evaluate later)")
    parser.add_argument("--index", type=int, metavar="I",
                        help="with --stage train: the job to train (0..K-1 the sub-models, K the vanilla baseline)")
    parser.add_argument("--quiet", action="store_true", help="plain log lines instead of live progress")
    parser.add_argument("--json", action="store_true", help="one JSON object per line on stdout")
    parser.add_argument("--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    from dtm_fast import ui
    from dtm_fast.run import stages
    from dtm_fast.run.config import load_run_config
    from dtm_fast.run.runner import Walk, dry_run, show_report

    ui.configure(json_output=args.json, quiet=args.quiet)
    if args.nproc_per_node is not None and args.nproc_per_node < 1:
        raise DtmError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    config = load_run_config(args.config, args.output)
    jobs = config.job_names()
    if args.stage == "train":
        if args.index is None or not 0 <= args.index < len(jobs):
            raise DtmError(f"--stage train needs --index between 0 and {len(jobs) - 1} ({', '.join(jobs)})")
    elif args.index is not None:
        raise DtmError("--index only goes with --stage train")
    if args.emit == "slurm":
        from dtm_fast.run.slurm import emit_slurm

        scripts = emit_slurm(config)
        ui.info(f"wrote {', '.join(str(p) for p in scripts.values())}")
        ui.info(f"submit with: {scripts['submit']}")
        return 0
    if args.dry_run:
        dry_run(config, args.until, f"dtm run {args.config} (dry run: nothing is run)")
        return 0
    if args.stage == "finish":
        # refuse before any work when the stages the finish job reads are not all there
        upstream = {"base", *(f"{cell.prefix}disperse" for cell in config.cells()), *jobs}
        looked = Walk(config, execute=False, until=args.until).walk()
        waiting = [s.name for s in looked if s.name in upstream and s.state != "current"]
        if waiting:
            raise DtmError(f"--stage finish: {', '.join(waiting)} not current yet (run the prepare and train jobs "
                           "first)")
    walk = Walk(config, execute=True, nproc_per_node=args.nproc_per_node, group=args.stage, job_index=args.index,
                until=args.until)
    stages.log_path(config).parent.mkdir(parents=True, exist_ok=True)
    with ui.library_output_to(stages.log_path(config)):
        plan = walk.walk()
    waiting = [s.name for s in plan if s.name not in walk.identities]
    if waiting:
        raise DtmError(f"--stage {args.stage}: {', '.join(waiting)} cannot run yet: an earlier stage is not "
                       "current (run the prepare and train jobs first)")
    ran = [s.name for s in plan if s.state == "to run"]
    ui.info(f"[dtm run] {'ran ' + ', '.join(ran) if ran else 'every stage was current; nothing to do'} "
            f"({config.run_dir}; library output in {stages.log_path(config)})")
    if args.stage in ("all", "finish") and args.until == "eval":
        show_report(config)
    return 0
