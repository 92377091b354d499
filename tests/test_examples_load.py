"""Every shipped example config loads and validates against its model's real shape.

examples/tiny_chains.yaml once stopped loading (keys removed from the config) and nothing
noticed, because no test read it: this one reads them all, so a config change that breaks
an example fails here, naming the file and the key.
"""

import glob
import os

import pytest

from dapo_megatron.config import load_config
from dapo_megatron.resolve import engine_layout, read_hf_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.yaml")))


def test_there_are_examples():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"tiny_cpu.yaml", "tiny_chains.yaml", "tiny_moe_cpu.yaml", "qwen2.5_32b_dapo.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=[os.path.basename(p) for p in EXAMPLES])
def test_example_loads_with_its_layout_checked(path):
    cfg = load_config(path)  # validation, including the layout against the model's config
    assert cfg.trainer.max_steps >= 1
    hf, _source = read_hf_config(cfg)
    assert hf["num_hidden_layers"] >= 1
    assert len(engine_layout(cfg)) >= 1
