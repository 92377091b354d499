"""Every correction mode, KL estimator and loss variant through the real trainer.

Four short runs of the tiny default (real Ray actors, Megatron rank, embedded engine), each
3 steps with the KL term on (algo.kl_coef=0.05), together covering each
``algo.rollout_correction`` mode, each ``algo.kl_estimator`` and each ``algo.loss``. They
run one after another in one driver process (one Ray start) to keep the cost low.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.controller.test_train_e2e import ROOT, TINY

RUNS = {  # name: (rollout_correction, kl_estimator, loss)
    "tis_k1_gspo": ("token-tis", "k1", "gspo"),
    "mask_k2_cispo": ("token-mask", "k2", "cispo"),
    "seqtis_k3_drgrpo": ("seq-tis", "k3", "drgrpo"),
    "seqmask_k3_dapo": ("seq-mask", "k3", "dapo"),
}

DRIVER = """
import sys
from dapo_megatron.config import load_config
from dapo_megatron.controller.loop import train
root, common, runs = sys.argv[1], sys.argv[2].split(), eval(sys.argv[3])
for name, (correction, estimator, loss) in runs.items():
    cfg = load_config("examples/tiny_cpu.yaml", common + [
        f"trainer.run_dir={root}/{name}", f"algo.rollout_correction={correction}",
        f"algo.kl_estimator={estimator}", f"algo.loss={loss}"])
    train(cfg)
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("losses")
    common = TINY + ["trainer.max_steps=3", "eval.every=0", "checkpoint.save_every=0",
                     "algo.kl_coef=0.05"]
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(root), " ".join(common), repr(RUNS)],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = {}
    for name in RUNS:
        with open(root / name / "metrics.jsonl") as f:
            out[name] = {r["step"]: r for r in map(json.loads, filter(str.strip, f))}
    return out


MISMATCH = ["mismatch/logprob_abs_diff_mean", "mismatch/logprob_abs_diff_max", "mismatch/kl_k3",
            "mismatch/ppl_ratio", "mismatch/token_outside_frac", "mismatch/seq_outside_frac"]


@pytest.mark.parametrize("name", RUNS)
def test_three_steps_log_mismatch_correction_and_a_nonzero_kl(runs, name):
    records = runs[name]
    assert sorted(records) == [1, 2, 3]
    for step, record in records.items():
        for key in MISMATCH + ["correction/weight_mean", "correction/masked_frac", "actor/kl_loss",
                               "actor/loss", "actor/grad_norm", "time/old_logprobs",
                               "time/ref_logprobs"]:
            assert key in record, (step, key)
        # The engine samples with the weights just synced: the gap is float noise, so the
        # correction keeps (nearly) every token at weight 1.
        assert record["mismatch/logprob_abs_diff_max"] < 1e-4
        assert record["correction/masked_frac"] == 0.0
        assert record["correction/weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert record["actor/grad_norm"] > 0
    # Step 1's first update starts at the reference; after it the policy has moved away.
    assert records[2]["actor/kl_loss"] != 0 and records[3]["actor/kl_loss"] != 0
    if RUNS[name][1] != "k1":  # k2, k3 >= 0; k1 is unbiased but signed
        assert records[3]["actor/kl_loss"] > 0


def test_each_loss_leaves_its_signature(runs):
    # GSPO clips whole sequences at 3e-4 / 4e-4: after the first update most are clipped.
    gspo = runs["tis_k1_gspo"][3]
    assert gspo["actor/clip_frac_low"] + gspo["actor/clip_frac_high"] > 0.05
    # CISPO never clips a token's gradient away from below.
    assert all(r["actor/clip_frac_low"] == 0.0 for r in runs["mask_k2_cispo"].values())
