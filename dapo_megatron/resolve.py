"""What runs where: the one place that reads the model's shape and lays out a run.

`resolve(cfg)` reads the HF config once (``text_config`` unwrapped) into the model
builder's `ModelArgs`, runs the layout check (the rules megatron-core and SGLang enforce),
and returns the engine layout: how many rollout engines, each one's TP size, node, base GPU
and Ray placement. Config validation, the planner (`plan.py`), Ray start-up, the engine pool
and the policy's model builder all read these answers from here and compute none of them.

Engine layout rules:

- ``rollout.num_engines > 0`` is taken as given (and checked against the GPUs there are).
- 0 (auto): SGLang, colocated: one engine per ``engine_tp`` training GPUs, so every GPU
  serves rollouts; the embedded engine (one process, no TP): one engine per node.
  Disaggregated placement needs an explicit count (the engines' GPUs are extra).
- An SGLang engine never spans nodes (the launcher starts single-node servers): engine k
  of a colocated run uses global GPUs [k*engine_tp, (k+1)*engine_tp), i.e. node
  k*engine_tp // gpus_per_node from local GPU k*engine_tp % gpus_per_node; a disaggregated
  run puts its engines on the nodes after the training nodes, packed the same way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from dapo_megatron.convert.arch import ModelArgs, UnsupportedModelError, model_args_from_hf
from dapo_megatron.errors import ConfigError

# `cfg` below is a dapo_megatron.config.DapoConfig; config.py calls resolve() from its
# validation, so this module does not import it back.


@dataclass(frozen=True)
class EngineSlot:
    """Where rollout engine ``index`` runs.

    node: index of its node (0-based, in the order Ray lists nodes / Slurm lists hosts).
    base_gpu: its first GPU on that node (SGLang's --base-gpu-id); it uses tp GPUs from there.
    policy_bundle: colocated runs: the policy placement-group bundle (training rank) whose node
        it shares, so the engine lands on the GPUs it serves; None when disaggregated.
    resources: what its own actor reserves (its Ray bundle).
    """

    index: int
    tp: int
    node: int
    base_gpu: int
    policy_bundle: int | None
    resources: dict[str, float]


@dataclass(frozen=True)
class Resolved:
    """The facts of a run that several components need, computed once."""

    hf_config: dict[str, Any]  # as the builder reads it (text_config unwrapped)
    source: str  # where the shape came from (a config.json path or the inline shape)
    args: ModelArgs | None  # None when the vocab is the tokenizer's and not yet known
    engines: tuple[EngineSlot, ...]

    @property
    def num_engines(self) -> int:
        return len(self.engines)


def read_hf_config(cfg: "DapoConfig", vocab_size: int | None = None) -> tuple[dict[str, Any], str]:
    """The policy's HF-style config dict and where it came from: hf_dir's config.json, else
    the copy named by model.hf_config, else the inline shape (from-scratch models). A nested
    ``text_config`` (multimodal checkpoints) is what the policy reads."""
    m = cfg.model
    here = os.path.join(m.hf_dir, "config.json") if m.hf_dir else None
    if here and os.path.exists(here):
        hf = _read_json(here, "model.hf_dir")
        if m.hf_config:
            copy = _read_json(m.hf_config, "model.hf_config")
            if _shape_of(copy, m.hf_config) != _shape_of(hf, here):
                raise ConfigError(f"model.hf_config: {m.hf_config} describes another model than {here}; "
                                  f"remove model.hf_config (hf_dir's config.json is the model's)")
        return hf, here
    if m.hf_config:
        return _read_json(m.hf_config, "model.hf_config"), m.hf_config
    if m.hf_dir:
        raise ConfigError(f"model.hf_dir: no config.json in {m.hf_dir} (download the checkpoint there, or "
                          f"set model.hf_config to a copy of its config.json to plan first)")
    return m.hf_config_dict(vocab_size=m.vocab_size or vocab_size), INLINE


def _read_json(path: str, key: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{key}: {path} is not a JSON object")
    if isinstance(hf.get("text_config"), dict):
        outer, hf = hf, dict(hf["text_config"])
        for field in ("tie_word_embeddings", "torch_dtype"):  # often left to the outer config
            if field not in hf and field in outer:
                hf[field] = outer[field]
    return hf


def _shape_of(hf: dict, source: str) -> ModelArgs:
    return _model_args({**hf, "torch_dtype": None}, source)


INLINE = "the inline model shape"
# HF config fields -> the config keys of an inline shape, so an error names what to change.
_INLINE_KEYS = {"num_hidden_layers": "model.num_layers", "num_attention_heads": "model.num_attention_heads",
                "num_key_value_heads": "model.num_key_value_heads", "hidden_size": "model.hidden_size",
                "intermediate_size": "model.intermediate_size", "num_experts": "model.num_experts",
                "num_experts_per_tok": "model.num_experts_per_tok", "head_dim": "model.head_dim"}


def _model_args(hf: dict, source: str) -> ModelArgs:
    try:
        return model_args_from_hf(hf)
    except (UnsupportedModelError, KeyError, ValueError) as e:
        message = str(e)
        if source == INLINE:
            for field, key in _INLINE_KEYS.items():
                message = message.replace(f"{field}=", f"{key}=")
            raise ConfigError(f"model: {message}") from None
        raise ConfigError(f"model: {source}: {message}") from None


def layout_errors(args: ModelArgs, tp: int, pp: int, ep: int, cp: int, world: int, rollout=None) -> list[str]:
    """Why a parallel layout cannot run this model on ``world`` GPUs; each message names the key.

    megatron-core: query heads and KV groups split over TP (attention.py divides
    num_query_groups by the TP size), MLP widths over TP (expert TP = tp), layers over PP,
    experts over EP, tp*pp*cp and the expert grid tp*ep*pp divide the world. SGLang (when
    ``rollout`` is given and runs SGLang): engine_tp divides the heads and divides or is a
    multiple of the KV heads (it replicates KV heads when engine_tp > kv heads). The model
    builder (policy/model.py), config validation and the planner all call this.
    """
    t, e = tp, ep
    errors = []
    if args.num_heads % t:
        errors.append(f"parallel.tp={t} must divide the attention heads (num_attention_heads={args.num_heads})")
    if args.num_kv_heads % t:
        errors.append(f"parallel.tp={t} must divide the KV heads (num_key_value_heads={args.num_kv_heads}): "
                      f"megatron-core splits the KV groups over TP")
    dense_layers = [i for i in range(args.num_layers) if not args.is_moe_layer(i)]
    if dense_layers and args.ffn_hidden_size % t:
        errors.append(f"parallel.tp={t} must divide the MLP width (intermediate_size={args.ffn_hidden_size})")
    if args.is_moe and args.moe_ffn_hidden_size % t:
        errors.append(f"parallel.tp={t} (= expert TP) must divide the expert MLP width "
                      f"(moe_intermediate_size={args.moe_ffn_hidden_size})")
    if args.num_layers % pp:
        errors.append(f"parallel.pp={pp} must divide the layers (num_hidden_layers={args.num_layers})")
    if e > 1 and not args.is_moe:
        errors.append(f"parallel.ep={e} needs a MoE model; this one is dense (set parallel.ep=1)")
    elif args.is_moe and args.num_experts % e:
        errors.append(f"parallel.ep={e} must divide the experts (num_experts={args.num_experts})")
    if world % (t * pp * cp):
        errors.append(f"parallel.tp: tp*pp*cp = {t}*{pp}*{cp} = {t * pp * cp} must divide the world size {world}")
    if e > 1 and world % (t * e * pp):
        errors.append(f"parallel.ep: tp*ep*pp = {t}*{e}*{pp} = {t * e * pp} (the expert grid, expert TP = tp) "
                      f"must divide the world size {world}")
    if rollout is not None and rollout.engine == "sglang":
        et = rollout.engine_tp
        if args.num_heads % et:
            errors.append(f"rollout.engine_tp={et} must divide the attention heads "
                          f"(num_attention_heads={args.num_heads})")
        if args.num_kv_heads % et and et % args.num_kv_heads:
            errors.append(f"rollout.engine_tp={et} and the KV heads (num_key_value_heads={args.num_kv_heads}) "
                          f"must divide one another")
    return errors


def engine_layout(cfg: "DapoConfig") -> tuple[EngineSlot, ...]:
    """The rollout engines of the run (module docstring); raises ConfigError naming the key."""
    p, r = cfg.parallel, cfg.rollout
    world, gpn = p.world_size, p.gpus_per_node
    if r.engine == "embedded":
        n = r.num_engines or p.nodes
        return tuple(EngineSlot(k, 1, k % p.nodes, 0, None, {"CPU": float(r.engine_num_cpus)}) for k in range(n))
    et = r.engine_tp
    if gpn % et:
        raise ConfigError(f"rollout.engine_tp: {et} must divide parallel.gpus_per_node={gpn}: an SGLang "
                          f"engine runs on one node (use engine_tp <= {gpn}, e.g. "
                          f"{max(d for d in range(1, gpn + 1) if gpn % d == 0 and d <= et)})")
    if r.placement == "colocated":
        most = world // et
        n = r.num_engines or most
        if n > most:
            raise ConfigError(f"rollout.num_engines: {n} engines of engine_tp={et} need {n * et} GPUs; a "
                              f"colocated run has {world} (at most {most} engines)")
        slots = []
        for k in range(n):
            first = k * et
            slots.append(EngineSlot(k, et, first // gpn, first % gpn, first, {"CPU": 1.0}))
        return tuple(slots)
    if r.num_engines < 1:
        raise ConfigError("rollout.num_engines: disaggregated placement needs an explicit engine count "
                          "(its engines use GPUs of their own)")
    return tuple(EngineSlot(k, et, p.nodes + (k * et) // gpn, (k * et) % gpn, None,
                            {"CPU": 1.0, "GPU": float(et)}) for k in range(r.num_engines))


def resolve(cfg: "DapoConfig", vocab_size: int | None = None) -> Resolved:
    """Read the shape, check the layout, lay out the engines; ConfigError on any problem.

    vocab_size: the tokenizer's size, for an inline shape with model.vocab_size=0 (without
    it, `args` is None and only the engine layout is resolved).
    """
    hf, source = read_hf_config(cfg, vocab_size)
    # The layout rules do not depend on the vocab: without one, check them with a stand-in.
    args = _model_args(hf if hf.get("vocab_size") else {**hf, "vocab_size": 1}, source)
    p = cfg.parallel
    errors = layout_errors(args, p.tp, p.pp, p.ep, p.cp, p.world_size, cfg.rollout)
    if errors:
        raise ConfigError(f"{errors[0]} (model shape from {source})"
                          + (f"; and {len(errors) - 1} more: " + "; ".join(errors[1:]) if len(errors) > 1 else ""))
    reach = cfg.rollout.max_prompt_length + cfg.algo.max_response_length
    if reach > args.max_position_embeddings:
        raise ConfigError(f"algo.max_response_length: rollout.max_prompt_length + algo.max_response_length = "
                          f"{reach} exceeds the model's max_position_embeddings={args.max_position_embeddings} "
                          f"({source})")
    if cfg.algo.routing_replay != "none" and cfg.parallel.cp > 1:
        # policy/routing_replay.py lays routes out per packed row, not per context-parallel
        # chunk (packing.model_inputs splits the ids, not the routes).
        raise ConfigError(f"algo.routing_replay: {cfg.algo.routing_replay} is not wired for "
                          f"parallel.cp={cfg.parallel.cp}; use parallel.cp=1 or algo.routing_replay=none")
    if cfg.algo.routing_replay != "none" and not args.is_moe:
        raise ConfigError(f"algo.routing_replay: {cfg.algo.routing_replay} replays MoE routing, but "
                          f"{source} describes a dense model (no experts); set algo.routing_replay=none")
    return Resolved(hf, source, args if hf.get("vocab_size") else None, engine_layout(cfg))
