"""HF <-> Megatron name/layout rules per architecture, and loading HF weights into shards."""

from dapo_megatron.convert.arch import ModelArgs, UnsupportedModelError, model_args_from_hf
from dapo_megatron.convert.load import load_hf_state_dict
from dapo_megatron.convert.rules import MissingTensorError

__all__ = [
    "MissingTensorError",
    "ModelArgs",
    "UnsupportedModelError",
    "load_hf_state_dict",
    "model_args_from_hf",
]
