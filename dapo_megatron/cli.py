"""`dapo-megatron train|eval|plan`: the user's entry points.

Each command reads one YAML config plus dotted overrides (`algo.eps_high=0.28`); the config
dataclasses in `dapo_megatron.config` are the only source of defaults.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dapo_megatron.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dapo-megatron", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run DAPO training on a config", epilog=_keys_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", help="YAML config (e.g. examples/tiny_cpu.yaml)")
    train.add_argument("overrides", nargs="*", help="dotted overrides: section.key=value")

    ev = sub.add_parser("eval", help="avg@k / pass@k of a checkpoint on a data file")
    ev.add_argument("config")
    ev.add_argument("overrides", nargs="*")
    ev.add_argument("--ckpt", default=None, help="checkpoint dir (default: the run's newest)")
    ev.add_argument("--data", default=None, help="jsonl/parquet eval file (default: data.eval_path)")
    ev.add_argument("--k", type=int, default=None, help="samples per prompt (default: eval.k)")
    ev.add_argument("--out", default=None, help="write per-prompt results as jsonl here")

    plan = sub.add_parser("plan", help="check a layout fits a cluster, per-GPU memory")
    plan.add_argument("config")
    plan.add_argument("overrides", nargs="*")
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, default=8)
    plan.add_argument("--gpu-mem-gb", type=float, default=80.0)
    return parser


def _keys_epilog() -> str:
    import dataclasses

    from dapo_megatron.config import DapoConfig

    sections = [f.name for f in dataclasses.fields(DapoConfig)]
    return ("config keys: every key with its type, default and meaning is in docs/CONFIG.md\n"
            "(generated from dapo_megatron/config.py; `python -m dapo_megatron.config_doc` prints it).\n"
            f"sections: {', '.join(sections)}. example: dapo-megatron train examples/tiny_cpu.yaml "
            "trainer.max_steps=20 algo.eps_high=0.28")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # `plan` checks the layout against the cluster it is given (--nodes), not the config's.
        cfg = load_config(args.config, args.overrides, check_layout=args.command != "plan")
    except ConfigError as e:
        print(f"dapo-megatron: config error: {e}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(cfg.logging.level)
    try:
        return _run(args, cfg)
    except ConfigError as e:  # checks that need the files (data, checkpoint.dir, the model)
        print(f"dapo-megatron: config error: {e}", file=sys.stderr)
        return 2
    except _user_errors() as e:
        print(f"dapo-megatron: error: {e}", file=sys.stderr)
        return 1


def _user_errors() -> tuple[type, ...]:
    """Failures whose message is the whole story for the user (no traceback)."""
    from dapo_megatron.controller.checkpoint import CheckpointSaveError, NoUsableCheckpoint
    from dapo_megatron.controller.loop import RayStartError
    from dapo_megatron.controller.run_dir import RunDirError

    return (CheckpointSaveError, NoUsableCheckpoint, RayStartError, RunDirError)


def _run(args, cfg) -> int:
    if args.command == "train":
        from dapo_megatron.controller.loop import train

        train(cfg)
        return 0
    if args.command == "eval":
        from dapo_megatron.eval import run_eval

        run_eval(cfg, ckpt=args.ckpt, data_path=args.data, k=args.k, out_path=args.out)
        return 0
    if args.command == "plan":
        from dapo_megatron.plan import format_report, plan

        report = plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gb=args.gpu_mem_gb)
        print(format_report(report))
        return 0 if report.fits else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
