"""rollout package: the engine protocol, the embedded and SGLang engines, and the manager.

protocol.py      SamplingParams, Sample, RolloutEngine (and the log-prob convention)
sampling.py      fp32 temperature / top-k / top-p sampling and its log-probs
embedded.py      EmbeddedEngine over a transformers model (CPU or one GPU), Ray helper
sglang_api.py    SGLang's HTTP wire format: launch args, payloads, answers, names
sglang_engine.py SGLangEngine: one SGLang server per node / TP group, restart on death
buckets.py       size-bounded weight buckets and strict HF-name loading
manager.py       dispatch of rounds over engines, streamed groups, abort, engine replacement
partial.py       partial rollouts: carried groups, continuation requests, stitching, staleness
"""

from dapo_megatron.rollout.embedded import EmbeddedEngine, build_hf_model, create_embedded_actor
from dapo_megatron.rollout.manager import CompletedGroup, RolloutManager, RolloutRound
from dapo_megatron.rollout.protocol import RolloutEngine, Sample, SamplingParams, WeightBucket
from dapo_megatron.rollout.sglang_api import SGLangConfig
from dapo_megatron.rollout.sglang_engine import SGLangEngine, create_sglang_actor

__all__ = [
    "CompletedGroup",
    "EmbeddedEngine",
    "RolloutEngine",
    "RolloutManager",
    "RolloutRound",
    "SGLangConfig",
    "SGLangEngine",
    "Sample",
    "SamplingParams",
    "WeightBucket",
    "build_hf_model",
    "create_embedded_actor",
    "create_sglang_actor",
]
