"""HF checkpoint <-> Megatron distributed checkpoint (the logic behind tools/convert_hf.py).

This driver spawns ranks and builds models with policy/, so it sits above policy/; the
name/layout rules it applies live in convert/, which imports nothing above itself.

A converted checkpoint directory holds exactly ``model.sharded_state_dict()`` (prefix '' by
default) saved with ``megatron.core.dist_checkpointing`` (loadable under any TP/PP/EP), plus:
- ``hf_config.json``: the source config.json, byte for byte (written back verbatim);
- ``hf_extra/``: the other small files of the HF directory (tokenizer, generation config);
- ``dapo_convert.json``: architecture, dtype, vocab sizes, the HF tensor names and dtypes.

The trainer's checkpoints carry ``hf_config.json`` and ``hf_extra/`` too (``carry_hf_files``),
so ``megatron_to_hf`` turns any of them into a complete HF model (config.json,
generation_config.json, weights, tokenizer files) with no other input; without
``dapo_convert.json`` the weights are written in the dtype they were trained in.

Both directions stream: HF -> Megatron reads one tensor at a time into the (only) model
copy; Megatron -> HF exports one bucket at a time and writes it straight into the shards.
Output appears atomically (written to a temp dir beside it, renamed at the end; removed on
any error).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

import torch

from dapo_megatron.convert.arch import UnsupportedModelError, model_args_from_hf
from dapo_megatron.convert.hf_io import (
    CONFIG_NAME,
    EXTRA_DIR,
    META_NAME,
    CheckpointError,
    SafetensorsReader,
    ShardWriter,
    complete_hf_export,
    config_with_dtype,
    copy_extras,
)
from dapo_megatron.convert.rules import MissingTensorError, hf_names, hf_shapes
from dapo_megatron.dtypes import name_of, to_torch
from dapo_megatron.malloc import limit_malloc_retention
from dapo_megatron.ports import listening_store
from dapo_megatron.convert.spec_keys import extra_state_from_model

logger = logging.getLogger(__name__)

# Tensors some HF checkpoints carry that are not weights (recomputed by the model).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """A user-facing conversion failure; the message is one line naming file and tensor."""


class Progress:
    """One log line every few seconds: tensors, GB and ETA."""

    def __init__(self, what: str, total_tensors: int, total_bytes: int, every_s: float = 5.0):
        self.what, self.total_t, self.total_b = what, total_tensors, max(total_bytes, 1)
        self.done_t = self.done_b = 0
        self.start = self.last = time.monotonic()
        self.every = every_s

    def update(self, nbytes: int) -> None:
        self.done_t += 1
        self.done_b += nbytes
        now = time.monotonic()
        if now - self.last >= self.every or self.done_t == self.total_t:
            self.last = now
            frac = self.done_b / self.total_b
            eta = (now - self.start) * (1 - frac) / frac if frac > 0 else float("nan")
            logger.info("%s: %d/%d tensors, %.2f/%.2f GB, ETA %.0fs", self.what, self.done_t,
                        self.total_t, self.done_b / 1e9, self.total_b / 1e9, eta)


class _CountingReader:
    """Reader wrapper that reports progress and names the file in errors."""

    def __init__(self, reader: SafetensorsReader, progress: Progress):
        self.reader, self.progress, self.location = reader, progress, reader.location

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.reader:
            raise KeyError(name)
        t = self.reader[name]
        self.progress.update(t.numel() * t.element_size())
        return t

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        self.reader.read_into(name, out)
        self.progress.update(out.numel() * out.element_size())
        return out


def _read_config(path: str) -> tuple[bytes, dict]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return raw, json.loads(raw)
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except ValueError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def check_hf_checkpoint(hf_dir: str):
    """Parse config.json and the safetensors headers; check names and shapes against the
    config. Returns (config bytes, config dict, ModelArgs, reader)."""
    cfg_path = os.path.join(hf_dir, "config.json")
    raw, cfg = _read_config(cfg_path)
    try:
        args = model_args_from_hf(cfg)
    except UnsupportedModelError as e:
        raise ConversionError(f"{cfg_path}: {e}") from None
    except KeyError as e:
        raise ConversionError(f"{cfg_path}: missing field {e}") from None
    try:
        reader = SafetensorsReader(hf_dir)
    except CheckpointError as e:
        raise ConversionError(str(e)) from None
    shapes = hf_shapes(args)
    for name in hf_names(args):
        if name not in reader:
            raise ConversionError(f"{hf_dir}: tensor {name} missing (expected by {cfg_path})")
        if tuple(reader.shape(name)) != shapes[name]:
            raise ConversionError(
                f"{reader.file_of(name)}: tensor {name} has shape {list(reader.shape(name))} "
                f"but {cfg_path} implies {list(shapes[name])}")
    for name in reader.keys():
        if name in shapes or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and args.tie_word_embeddings:
            continue  # some tied checkpoints store the copy too
        raise ConversionError(
            f"{reader.file_of(name)}: tensor {name} is not part of a {args.architecture} with "
            f"this {cfg_path} (num_hidden_layers={args.num_layers}); config/weights mismatch")
    return raw, cfg, args, reader


def _own_storages(sharded: dict, model) -> None:
    """Give every ShardedTensor its own storage, freeing the parameter it was cut from.

    megatron's CPU save path clones each tensor that is a view of a larger storage (the
    SwiGLU factory splits linear_fc1 into gate/up views), all at once before writing
    (dist_checkpointing/strategies/filesystem_async.py:136 _clone_if_needed). Doing the
    copies here one parameter at a time and dropping the parameter's storage keeps the
    peak at one model (the model is not used after the save).
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    views: dict[int, list] = {}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            storage = sh.data.untyped_storage()
            if storage.nbytes() != sh.data.numel() * sh.data.element_size():
                views.setdefault(storage.data_ptr(), []).append(sh)
    for ptr, group in views.items():
        for sh in group:
            sh.data = sh.data.clone()
        if ptr in params:
            params[ptr].data = torch.empty(0, dtype=params[ptr].dtype)


def _model_dtype(reader: SafetensorsReader) -> torch.dtype:
    return reader.dtype("model.embed_tokens.weight")


def _spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, port, *args)`` on ``world`` local gloo ranks (1: in process, no
    port). The rendezvous store listens here before the ranks learn its port, so no other
    process can take the port in between (``ports.listening_store``)."""
    if world == 1:
        fn(0, 1, 0, *args)
        return
    store = listening_store(world)
    port = store.port
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    level = logging.getLogger().getEffectiveLevel()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, level, args))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if any(codes):
        raise ConversionError(f"conversion failed on a rank (exit codes {codes}); see its error above")


def _rank_main(fn, rank, world, port, level, args):
    import sys
    import warnings

    warnings.filterwarnings("ignore")
    logging.basicConfig(level=level, format="%(message)s")
    limit_malloc_retention()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        fn(rank, world, port, *args)
    except (ConversionError, CheckpointError) as e:
        print(f"convert_hf: error (rank {rank}): {e}", file=sys.stderr)
        sys.exit(1)


def _init(rank, world, port, tp, pp, ep):
    from dapo_megatron.policy.parallel import init_parallel

    init_parallel(tp=tp, pp=pp, ep=ep, rank=rank, world_size=world, master_addr="127.0.0.1",
                  master_port=port, store_hosted=True)


def _build(cfg: dict, dtype: torch.dtype):
    from dapo_megatron.policy.model import build_model

    # The weights come from the checkpoint: skip the random init (time, not memory).
    return build_model(cfg, params_dtype=dtype, use_te=False, perform_initialization=False)


def _to_megatron_rank(rank, world, port, hf_dir, tmp, layout):
    from megatron.core import dist_checkpointing

    from dapo_megatron.convert.load import load_hf_state_dict

    _init(rank, world, port, *layout)
    _, cfg, args, reader = check_hf_checkpoint(hf_dir)
    chunks = _build(cfg, _model_dtype(reader))
    progress = Progress("read HF" + (f" (rank {rank})" if world > 1 else ""),
                        len(hf_names(args)), reader.total_bytes())
    try:
        load_hf_state_dict(chunks, _CountingReader(reader, progress))
    except MissingTensorError as e:
        raise ConversionError(str(e)) from None
    logger.info("writing distributed checkpoint to %s", tmp)
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sharded = chunks[0].sharded_state_dict()
    apply_factories(sharded)
    _own_storages(sharded, chunks[0])
    dist_checkpointing.save(sharded, tmp)


def hf_to_megatron(hf_dir: str, out: str, *, tp: int = 1, pp: int = 1, ep: int = 1) -> None:
    """Convert the HF checkpoint in ``hf_dir`` into a Megatron dist checkpoint at ``out``."""
    raw, cfg, args, reader = check_hf_checkpoint(hf_dir)  # fail fast, before any output
    dtype = _model_dtype(reader)
    meta = {
        "format": "dapo-megatron/hf-dist-checkpoint/1",
        "architecture": args.architecture,
        "dtype": name_of(dtype),
        "vocab_size": args.vocab_size,
        "padded_vocab_size": args.padded_vocab_size(tp),
        "sharded_state_dict_prefix": "",
        "written_with_layout": {"tp": tp, "pp": pp, "ep": ep},
        "hf_tensors": {n: name_of(reader.dtype(n)) for n in hf_names(args)},
    }
    del reader

    def body(tmp):
        os.makedirs(tmp)
        _spawn(_to_megatron_rank, tp * pp * ep, hf_dir, tmp, (tp, pp, ep))
        with open(os.path.join(tmp, CONFIG_NAME), "wb") as f:
            f.write(raw)
        with open(os.path.join(tmp, META_NAME), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        copy_extras(hf_dir, os.path.join(tmp, EXTRA_DIR))

    _atomic_output(out, body)


def resolve_checkpoint_dir(path: str) -> str:
    """A dist checkpoint directory, or a directory of the trainer's ``step_<N>``
    checkpoints (a run's checkpoint dir): then the newest complete one."""
    if os.path.isfile(os.path.join(path, "metadata.json")) or not os.path.isdir(path):
        return path
    steps = []
    for name in os.listdir(path):
        m = re.match(r"^step_(\d+)$", name)
        if m and os.path.isfile(os.path.join(path, name, "metadata.json")):
            steps.append((int(m.group(1)), os.path.join(path, name)))
    if not steps:
        return path
    newest = max(steps)[1]
    logger.info("%s: using its newest checkpoint %s", path, os.path.basename(newest))
    return newest


def _atomic_output(out: str, body) -> None:
    out = os.path.abspath(out.rstrip("/"))
    if os.path.exists(out):
        raise ConversionError(f"{out}: already exists; remove it or choose another --out")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    try:
        body(tmp)
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_info(megatron_dir: str, hf_config: str | None, prefix: str | None):
    cfg_path = hf_config or os.path.join(megatron_dir, CONFIG_NAME)
    if not os.path.exists(os.path.join(megatron_dir, "metadata.json")):
        raise ConversionError(f"{megatron_dir}: not a megatron dist checkpoint (no metadata.json)")
    if not os.path.exists(cfg_path):
        raise ConversionError(
            f"{megatron_dir}: no {CONFIG_NAME} (checkpoints of tools/convert_hf.py and of the "
            "trainer carry one); give the model's HF config with --hf-config DIR/config.json")
    raw, cfg = _read_config(cfg_path)
    meta_path = os.path.join(megatron_dir, META_NAME)
    meta = {}
    if os.path.exists(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    try:
        model_args_from_hf(cfg)
    except UnsupportedModelError as e:
        raise ConversionError(f"{cfg_path}: {e}") from None
    prefix = meta.get("sharded_state_dict_prefix", "") if prefix is None else prefix
    return raw, cfg, meta, prefix


def _load_sharded(sharded: dict, megatron_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    try:
        return dist_checkpointing.load(sharded, megatron_dir)
    except Exception as e:  # noqa: BLE001 - megatron raises many types; report one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f"{megatron_dir}: cannot load checkpoint ({msg})") from None


def load_megatron_checkpoint(megatron_dir: str, *, dtype: torch.dtype | None = None,
                             hf_config: str | None = None, prefix: str | None = None):
    """Build the model (current parallel layout) and load a dist checkpoint into it.

    Returns (chunks, config bytes, meta). ``dtype`` defaults to the converted dtype.
    Call ``init_parallel`` first.
    """
    raw, cfg, meta, prefix = _checkpoint_info(megatron_dir, hf_config, prefix)
    chunks = _build(cfg, dtype or to_torch(meta.get("dtype", "float32")))
    model = chunks[0]
    sharded = model.sharded_state_dict(prefix=prefix)
    extra_state_from_model(sharded, megatron_dir)
    loaded = _load_sharded(sharded, megatron_dir)
    if prefix:
        loaded = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
    model.load_state_dict(loaded, strict=False)
    return chunks, raw, meta


def _load_with_one_copy(model, sharded: dict, megatron_dir: str, same_vocab: bool) -> None:
    """Load a dist checkpoint into ``model`` holding about one copy of the weights.

    ``dist_checkpointing.load`` reads the SwiGLU gate/up halves into views of linear_fc1 and
    then concatenates them into new tensors (a second copy of every fc1 before
    ``load_state_dict``). Here the factories are applied up front, each view gets a fresh
    (untouched, so not yet resident) tensor, the parameter's storage is released, and
    after the load each fc1 is rebuilt one at a time.
    """
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded)
    params = {p.untyped_storage().data_ptr(): p for p in model.parameters()}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor) and same_vocab and sh.allow_shape_mismatch:
            # Embedding/output rows: megatron zero-fills and loads them through a temporary
            # of the stored shape in case the padded vocab differs; ours equals the stored one.
            sh.allow_shape_mismatch = False
        if isinstance(sh, ShardedTensor) and sh.data is not None:
            storage = sh.data.untyped_storage()
            if storage.nbytes() != sh.data.numel() * sh.data.element_size():
                ptr = storage.data_ptr()
                sh.data = torch.empty_like(sh.data, memory_format=torch.contiguous_format)
                if ptr in params:
                    params.pop(ptr).data = torch.empty(0, dtype=sh.data.dtype)
    # The vocab-sized tensors are the largest single items, and torch's reader holds about
    # two temporaries per item; reading them first, before the rest is resident, keeps
    # those temporaries off the peak.
    big = [k for k in sharded if k.startswith(("embedding.", "output_layer."))]
    for keys in (big, [k for k in sharded if k not in big]):
        part = {k: sharded.pop(k) for k in keys}
        if not part:
            continue
        loaded = _load_sharded(part, megatron_dir)
        part.clear()
        plain = {}
        for key in list(loaded):
            value = loaded.pop(key)
            if isinstance(value, list):  # [gate, up] of one linear_fc1
                model.get_parameter(key).data = torch.cat(value)
                del value
            else:
                plain[key] = value
        model.load_state_dict(plain, strict=False)
        del plain, loaded


def _to_hf_rank(rank, world, port, megatron_dir, tmp, max_shard_bytes, hf_config, prefix):
    """Single process (TP=PP=EP=1): load the checkpoint once, stream HF tensors to disk."""
    from dapo_megatron.convert.load import iter_local_params
    from dapo_megatron.convert.rules import megatron_to_hf as to_hf

    _init(rank, world, port, 1, 1, 1)
    raw, cfg, meta, prefix = _checkpoint_info(megatron_dir, hf_config, prefix)
    dtype = to_torch(meta["dtype"]) if "dtype" in meta else _stored_dtype(megatron_dir)
    chunks = _build(cfg, dtype)
    model = chunks[0]
    args = model.model_args
    sharded = model.sharded_state_dict(prefix=prefix)
    if prefix:
        sharded = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sharded.items()}
    same_vocab = meta.get("padded_vocab_size") == model.padded_vocab_size
    extra_state_from_model(sharded, megatron_dir)
    _load_with_one_copy(model, sharded, megatron_dir, same_vocab)
    dtypes = meta.get("hf_tensors", {})
    shapes = hf_shapes(args)
    entries = [(n, to_torch(dtypes[n]) if n in dtypes else model.config.params_dtype,
                shapes[n]) for n in hf_names(args)]
    writer = ShardWriter(tmp, entries, max_shard_bytes)
    progress = Progress("write HF", len(entries), sum(
        torch.Size(s).numel() * d.itemsize for _, d, s in entries))
    params = {canon: p for _, canon, p in iter_local_params(model)}
    by_name = {n: d for n, d, _ in entries}
    from dapo_megatron.convert.rules import canonical_names

    for canon in canonical_names(args):
        for name, tensor in to_hf(args, canon, params[canon].detach()):
            tensor = tensor.to(by_name[name])
            writer.write(name, tensor)
            progress.update(tensor.numel() * tensor.element_size())
    writer.close()
    with open(os.path.join(tmp, "config.json"), "wb") as f:
        f.write(config_with_dtype(raw, {d for _, d, _ in entries}))


def _stored_dtype(megatron_dir: str) -> torch.dtype:
    """The dtype the model tensors were saved in (a trainer checkpoint has no
    dapo_convert.json): exporting in it keeps the trained weights exactly."""
    from megatron.core import dist_checkpointing

    for key, tensor in dist_checkpointing.load_tensors_metadata(megatron_dir).items():
        if key.startswith(("embedding.", "decoder.", "output_layer.")):
            return tensor.dtype
    return torch.float32


def megatron_to_hf(megatron_dir: str, out: str, *, max_shard_bytes: int = 5 * 1024**3,
                   hf_config: str | None = None, prefix: str | None = None,
                   tokenizer: str | None = None) -> None:
    """Write a complete HF model directory from a converted or trained dist checkpoint (or
    a run's checkpoint dir: its newest): safetensors shards, config.json,
    generation_config.json and the tokenizer files the checkpoint carries (``tokenizer``:
    a directory to take them from instead)."""
    megatron_dir = resolve_checkpoint_dir(megatron_dir)

    def body(tmp):
        os.makedirs(tmp)
        _spawn(_to_hf_rank, 1, megatron_dir, tmp, max_shard_bytes, hf_config, prefix)
        extra = os.path.join(megatron_dir, EXTRA_DIR)
        if os.path.isdir(extra):
            for name in sorted(os.listdir(extra)):
                shutil.copy2(os.path.join(extra, name), os.path.join(tmp, name))
        if tokenizer:
            if not os.path.isdir(tokenizer):
                raise ConversionError(f"--tokenizer {tokenizer}: not a directory")
            copy_extras(tokenizer, tmp)
        complete_hf_export(tmp)

    _atomic_output(out, body)


def fixed_prompt(vocab_size: int, length: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(20250317)
    return torch.randint(0, vocab_size, (1, length), generator=g)


def verify(hf_dir: str, megatron_dir: str, hf_config: str | None = None) -> float:
    """Max abs difference of fp32 logits on a fixed prompt: HF (transformers) vs Megatron
    (``hf_config``: as for ``megatron_to_hf``)."""
    from transformers import AutoModelForCausalLM

    from dapo_megatron.policy.model import causal_attention_mask, unwrap

    megatron_dir = resolve_checkpoint_dir(megatron_dir)
    _init(0, 1, 0, 1, 1, 1)
    chunks, _, _ = load_megatron_checkpoint(megatron_dir, dtype=torch.float32, hf_config=hf_config)
    model = unwrap(chunks[0]).eval()
    ids = fixed_prompt(model.model_args.vocab_size)
    s = ids.shape[1]
    with torch.no_grad():
        got = model(input_ids=ids, position_ids=None, attention_mask=causal_attention_mask(None, s))
        got = got[..., : model.model_args.vocab_size].float()
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        ref = hf(ids).logits.float()
    return float((got - ref).abs().max())


__all__ = [
    "ConversionError",
    "check_hf_checkpoint",
    "fixed_prompt",
    "hf_to_megatron",
    "limit_malloc_retention",
    "load_megatron_checkpoint",
    "megatron_to_hf",
    "resolve_checkpoint_dir",
    "verify",
]
