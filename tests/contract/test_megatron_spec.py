"""Contract: what convert/ writes and export/HF loading read against megatron's TE layer spec.

The Transformer Engine spec is read from megatron-core 0.16.1's own spec functions
(tests/contract/megatron_specs.py: TE cannot be imported on CPU, so its classes are named,
not built). Checked here:
- the sharded-state-dict keys of the model convert builds (local spec, CPU) are exactly
  the keys the TE-spec model asks for, MoE layers included (issue 14, finding 7);
- every TP-split dimension the loader and exporter use (``rules.tp_split_dim``) is the
  one megatron's checkpoint format uses, on the local model for real and on the TE spec
  by its column/row classes; expert weights carrying TE's ``partition_dim=0`` still load
  and export bit-exact at expert TP 2 (finding 6);
- a converted MoE checkpoint stores the TE key and loads into a model that asks for TE
  ``_extra_state`` objects the checkpoint lacks;
- the TE spec's self-attention is causal, the premise of skipping the dense mask on GPU
  (finding 11).
"""

from __future__ import annotations

import pytest
import torch

from tests.convert.tiny import make_hf_model, read_hf_dir
from tests.dist import run_distributed

# Tied embeddings + qkv bias, qk norm, shared experts, Mixtral names, dense + MoE layers.
FAMILIES = ("qwen2", "qwen3", "qwen2_moe", "mixtral", "qwen3_moe_dense0")


def _canonical(key: str) -> str:
    """A sharded key's canonical parameter name (enough for ``tp_split_dim``)."""
    return key.replace("mlp.experts.experts.", "mlp.experts.local_experts.0.")


def _spec_worker(rank, world, dirs):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.transformer.enums import AttnMaskType
    from transformers import AutoConfig

    from dapo_megatron.convert.arch import model_args_from_hf
    from dapo_megatron.convert.spec_keys import spec_with_te_keys
    from dapo_megatron.policy.model import build_model, make_transformer_config
    from dapo_megatron.policy.parallel import destroy_parallel, init_parallel
    from tests.contract import megatron_specs as ms

    init_parallel()
    out = {}
    for fam, d in dirs.items():
        hf_config = AutoConfig.from_pretrained(d)
        args = model_args_from_hf(hf_config)
        model = build_model(hf_config)[0]
        real = sorted({sh.key for k, sh in model.sharded_state_dict().items()
                      if not k.endswith("_extra_state")})
        local_cfg = make_transformer_config(args, params_dtype=torch.float32, use_te=False)
        local = ms.model_params(
            spec_with_te_keys(ms.block(ms.layer_specs(local_cfg, False))).layer_specs,
            local_cfg, args.tie_word_embeddings)
        # What build_model gives TE on a GPU: grouped GEMM experts (model.py, use_te).
        te_cfg = make_transformer_config(args, params_dtype=torch.float32, use_te=True,
                                         moe_grouped_gemm=args.is_moe)
        te_specs = ms.layer_specs(te_cfg, True)
        te = ms.model_params(te_specs, te_cfg, args.tie_word_embeddings)
        te_run = ms.model_params(spec_with_te_keys(ms.block(te_specs)).layer_specs, te_cfg,
                                 args.tie_word_embeddings)
        causal = [s.submodules.self_attention.params.get("attn_mask_type") == AttnMaskType.causal
                  for s in te_specs]
        out[fam] = dict(real=real, local=sorted(local), te=te, te_run=sorted(te_run),
                        causal=causal)
    destroy_parallel()
    return out


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    dirs = {}
    for fam in FAMILIES:
        dirs[fam] = str(tmp_path_factory.mktemp(fam))
        make_hf_model(fam, dirs[fam])
    return run_distributed(_spec_worker, 1, dirs)[0]


@pytest.mark.dist
def test_spec_walk_reproduces_the_local_model(specs):
    for fam, s in specs.items():
        assert s["local"] == s["real"], f"{fam}: the spec walk disagrees with megatron's model"


@pytest.mark.dist
def test_convert_writes_the_keys_the_te_spec_asks_for(specs):
    for fam, s in specs.items():
        te = sorted(s["te"])
        assert s["real"] == te, (
            f"{fam}: local-spec keys differ from the TE spec's: only local "
            f"{sorted(set(s['real']) - set(te))}, only TE {sorted(set(te) - set(s['real']))}")
        assert s["te_run"] == te, f"{fam}: the TE run must keep the TE spec's own keys"
    moe = specs["mixtral"]["real"]
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in moe
    assert not any(k.endswith("mlp.linear_fc1.layer_norm_weight") for k in moe)
    mixed = specs["qwen3_moe_dense0"]["real"]  # layer 0 dense: norm fused into fc1 in both
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in mixed
    assert "decoder.layers.1.pre_mlp_layernorm.weight" in mixed


@pytest.mark.dist
def test_tp_split_dims_match_the_te_spec(specs):
    from dapo_megatron.convert.rules import tp_split_dim
    from tests.contract.megatron_specs import TP_MODE

    checked = {fam: 0 for fam in FAMILIES}
    for fam, s in specs.items():
        for key, (cls, param) in s["te"].items():
            got = tp_split_dim(_canonical(key))
            if key.startswith(("embedding.", "output_layer.")):
                want = 0
            elif cls in TP_MODE and param in ("weight", "bias"):
                want = 0 if TP_MODE[cls] == "column" else 1
            else:
                want = None  # norms (also the fused layer_norm_weight), router, gate
            assert got == want, f"{fam} {key} ({cls}.{param}): split dim {got}, TE spec {want}"
            checked[fam] += 1
    assert set(specs) == set(FAMILIES) and min(checked.values()) >= 8, checked  # every family, every layer kind
    fc2 = specs["qwen2_moe"]["te"]["decoder.layers.0.mlp.experts.experts.linear_fc2.weight"]
    assert fc2[0] == "TERowParallelGroupedLinear"


@pytest.mark.dist
def test_te_self_attention_is_causal(specs):
    for fam, s in specs.items():
        assert all(s["causal"]), f"{fam}: a TE layer is not causal; the dense mask is needed"


def _expert_tp_worker(rank, world, dirs):
    """Load HF weights at tp=2 (expert TP 2) with expert weights marked as TE marks them,
    export them back, and read megatron's own TP axes from the sharded state dict."""
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from transformers import AutoConfig

    from dapo_megatron.convert import load_hf_state_dict
    from dapo_megatron.convert.load import canonical_name
    from dapo_megatron.convert.rules import tp_split_dim
    from dapo_megatron.convert.export import export_hf_weights
    from dapo_megatron.policy.model import build_model
    from dapo_megatron.policy.parallel import destroy_parallel, init_parallel

    init_parallel(tp=2)
    out = {}
    for fam, d in dirs.items():
        chunks = build_model(AutoConfig.from_pretrained(d))
        model = chunks[0]
        marked = 0
        for name, param in model.named_parameters():
            if ".mlp.experts." in name:
                # transformer_engine 2.20.2 grouped_linear.py / linear.py with parallel_mode
                # None (megatron's explicit_expert_comm): dim 0 for fc1 and fc2 alike.
                param.tensor_model_parallel, param.partition_dim = True, 0
                marked += 1
        load_hf_state_dict(chunks, read_hf_dir(d))
        got = {}
        for bucket in export_hf_weights(chunks, bucket_bytes=1 << 20, dst=0):
            got.update({n: t.clone().numpy() for n, t in bucket})
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        axes = {}
        for sh in nested_values(sharded):
            if not isinstance(sh, ShardedTensor) or sh.key.endswith("_extra_state"):
                continue
            glob = sh.global_shape[sh.prepend_axis_num:]
            split = [i for i, (g, l) in enumerate(zip(glob, sh.local_shape)) if g != l]
            axes[sh.key] = (split[0] if split else None, tp_split_dim(_canonical(sh.key)))
        out[fam] = dict(got=got, marked=marked, axes=axes)
    destroy_parallel()
    return out


@pytest.mark.dist
def test_expert_tp2_with_te_partition_attributes_loads_and_exports(tmp_path):
    dirs = {}
    for fam in ("qwen3_moe", "qwen2_moe"):
        dirs[fam] = str(tmp_path / fam)
        make_hf_model(fam, dirs[fam], seed=5)
    results = run_distributed(_expert_tp_worker, 2, dirs)
    for fam, r in results[0].items():
        assert r["marked"] > 0
        ref = read_hf_dir(dirs[fam])
        assert sorted(r["got"]) == sorted(ref)
        for name, t in ref.items():
            assert torch.equal(torch.from_numpy(r["got"][name]), t), f"{fam} {name} differs after export"
        down = [k for k in r["axes"] if k.endswith("experts.experts.linear_fc2.weight")]
        assert down, "no expert fc2 in the sharded state dict"
        for key, (megatron_axis, ours) in r["axes"].items():
            assert megatron_axis == ours, f"{fam} {key}: megatron splits dim {megatron_axis}, we {ours}"


def _checkpoint_worker(rank, world, hf_dir, out):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from transformers import AutoConfig

    from dapo_megatron.convert_hf import hf_to_megatron, verify
    from dapo_megatron.convert.spec_keys import checkpoint_keys, extra_state_from_model
    from dapo_megatron.policy.checkpoint import load_checkpoint
    from dapo_megatron.policy.model import build_model
    from dapo_megatron.policy.parallel import init_parallel

    hf_to_megatron(hf_dir, out)
    stored = checkpoint_keys(out)
    diff = verify(hf_dir, out)
    init_parallel()

    def with_te_object():
        model = build_model(AutoConfig.from_pretrained(hf_dir))[0]
        sharded = model.sharded_state_dict()
        # What a TE module's sharded_state_dict adds for its FP8 metadata: an _extra_state
        # ShardedObject (utils.py, make_sharded_object_for_checkpoint); the local spec's
        # attention has none, so a converted checkpoint lacks it.
        key = "decoder.layers.0.self_attention.core_attention._extra_state"
        sharded[key] = ShardedObject(key, torch.zeros(0), (1,), (0,), replica_id=0)
        return model, sharded

    _, sharded = with_te_object()
    try:
        dist_checkpointing.load(sharded, out)
        plain_load = "loaded"
    except BaseException as e:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        plain_load = str(e)
    _, sharded = with_te_object()
    served = extra_state_from_model(sharded, out)
    loaded = dist_checkpointing.load(sharded, out)
    model = build_model(AutoConfig.from_pretrained(hf_dir))
    load_checkpoint(out, model)  # the trainer's model.load path (policy/checkpoint.py)
    return dict(stored=sorted(stored), diff=diff, plain_load=plain_load, served=served,
                kept=key_in(loaded, "decoder.layers.0.self_attention.core_attention._extra_state"))


def key_in(d, key):
    return key in d


@pytest.mark.dist
def test_converted_moe_checkpoint_has_te_keys_and_loads_under_te_metadata(tmp_path):
    hf_dir = str(tmp_path / "hf")
    make_hf_model("qwen3_moe", hf_dir, seed=7)
    r = run_distributed(_checkpoint_worker, 1, hf_dir, str(tmp_path / "mcore"))[0]
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in r["stored"]
    assert not any(k.endswith("mlp.linear_fc1.layer_norm_weight") for k in r["stored"])
    assert r["diff"] < 1e-4  # the converted checkpoint still gives HF's logits
    # without the fix: what the GPU run hit loading a converted checkpoint into TE modules
    assert "Missing key in checkpoint state_dict" in r["plain_load"]
    assert r["served"] == ["decoder.layers.0.self_attention.core_attention._extra_state"]
    assert r["kept"]
