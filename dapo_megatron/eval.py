"""`dapo-megatron eval`: evaluate a checkpoint with the trainer's actors.

The evaluation itself (avg@k, pass@k) is a phase of the loop: controller/eval_phase.py.
"""

from __future__ import annotations

import json
import logging

from dapo_megatron.controller.loop import Trainer

logger = logging.getLogger(__name__)


def run_eval(cfg, *, ckpt: str | None, data_path: str | None, k: int | None, out_path: str | None) -> dict:
    """`dapo-megatron eval`: load a checkpoint's policy into an engine and evaluate it."""
    if data_path:
        cfg.data.eval_path = data_path
    trainer = Trainer(cfg, for_eval=True)
    try:
        if not trainer.restore(ckpt):
            logger.warning("no checkpoint in %s: evaluating the initial weights", cfg.checkpoint_dir)
            trainer.sync_weights()
        metrics = trainer.evaluate(k=k, out_path=out_path)
    finally:
        trainer.shutdown()
    print(json.dumps(metrics, indent=2))
    return metrics
