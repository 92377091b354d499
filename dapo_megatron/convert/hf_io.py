"""Streaming safetensors I/O for HF checkpoints.

``SafetensorsReader`` parses the headers of a checkpoint directory (``*.safetensors.index.json``
or plain ``*.safetensors`` files), validates them against the file sizes, and reads one
tensor at a time with plain file reads into a fresh tensor. It does not mmap: a mapped
file's touched pages count as resident memory until it is unmapped, which would double the
peak memory of a conversion. ``ShardWriter`` writes tensors straight to disk in the order
announced up front, so no shard is ever assembled in memory.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from typing import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, truncated or does not match its config."""


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


class SafetensorsReader:
    """Lazy, validated ``name -> tensor`` view of an HF checkpoint directory."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self.location = hf_dir
        self._entries: dict[str, tuple[str, torch.dtype, tuple, int, int]] = {}
        index = os.path.join(hf_dir, INDEX_NAME)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index}: unreadable index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(f for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{hf_dir}: no *.safetensors files")
        for fname in files:
            path = os.path.join(hf_dir, fname)
            if not os.path.exists(path):
                raise CheckpointError(f"{index}: lists {fname}, which does not exist")
            for name, entry in self._parse_header(path).items():
                if name in self._entries:
                    raise CheckpointError(f"{path}: tensor {name} also in {self._entries[name][0]}")
                self._entries[name] = entry
        if weight_map is not None:
            for name, fname in weight_map.items():
                got = self._entries.get(name)
                if got is None or os.path.basename(got[0]) != fname:
                    raise CheckpointError(
                        f"{os.path.join(hf_dir, fname)}: tensor {name} listed in the index "
                        "is not in this file")

    @staticmethod
    def _parse_header(path: str) -> dict:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
            try:
                header = json.loads(f.read(n))
            except (ValueError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
        data_start = 8 + n
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name}: corrupt header entry {info!r}") from None
            nbytes = _numel(shape) * dtype.itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(
                    f"{path}: tensor {name}: header says {end - begin} bytes but shape "
                    f"{list(shape)} {info['dtype']} needs {nbytes}")
            if data_start + end > size:
                raise CheckpointError(
                    f"{path}: tensor {name}: file truncated ({size} bytes, tensor ends at "
                    f"{data_start + end})")
            entries[name] = (path, dtype, shape, data_start + begin, nbytes)
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def file_of(self, name: str) -> str:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple:
        return self._entries[name][2]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def nbytes(self, name: str) -> int:
        return self._entries[name][4]

    def total_bytes(self) -> int:
        return sum(e[4] for e in self._entries.values())

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            _, dtype, shape, _, _ = self._entries[name]
        except KeyError:
            raise KeyError(name) from None
        return self.read_into(name, torch.empty(shape, dtype=dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor ``name`` straight into ``out`` (contiguous, same dtype and shape)."""
        path, dtype, shape, offset, nbytes = self._entries[name]
        if out.dtype != dtype or tuple(out.shape) != shape or not out.is_contiguous():
            raise ValueError(f"read_into {name}: target {out.dtype} {list(out.shape)} does not "
                             f"match {dtype} {list(shape)}")
        if nbytes:
            buf = out.reshape(-1).view(torch.uint8).numpy()
            with open(path, "rb") as f:
                f.seek(offset)
                got = f.readinto(memoryview(buf))
            if got != nbytes:
                raise CheckpointError(f"{path}: tensor {name}: short read ({got} of {nbytes} bytes)")
        return out


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardWriter:
    """Write HF safetensors shards tensor by tensor, in the order given by ``entries``.

    ``entries``: [(name, dtype, shape)] of every tensor, in write order. Shards are cut at
    ``max_shard_bytes`` (HF's convention: a tensor larger than that gets a shard of its
    own); the index is written when there is more than one shard.
    """

    def __init__(self, out_dir: str, entries: Iterable[tuple[str, torch.dtype, tuple]],
                 max_shard_bytes: int = 5 * 1024**3, metadata: dict | None = None):
        self.out_dir = out_dir
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple]]] = [[]]
        size = 0
        for name, dtype, shape in entries:
            nbytes = _numel(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, dtype, tuple(shape)))
            size += nbytes
        self.files = _shard_names(len(shards))
        self._plan = [(self.files[i], e) for i, shard in enumerate(shards) for e in shard]
        self._shards = shards
        self._pos = 0
        self._fh = None
        self._file_idx = -1

    def _open(self, idx: int) -> None:
        if self._fh is not None:
            self._fh.close()
        header, offset = {"__metadata__": self.metadata}, 0
        for name, dtype, shape in self._shards[idx]:
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        self._fh = open(os.path.join(self.out_dir, self.files[idx]), "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._file_idx = idx

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._plan):
            raise CheckpointError(f"ShardWriter: unexpected tensor {name}")
        fname, (want, dtype, shape) = self._plan[self._pos]
        if name != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"ShardWriter: got {name} {tensor.dtype} {list(tensor.shape)}, expected {want} "
                f"{dtype} {list(shape)}")
        idx = self.files.index(fname)
        if idx != self._file_idx:
            self._open(idx)
        if tensor.numel():
            data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._fh.write(memoryview(data))
        self._pos += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._pos != len(self._plan):
            raise CheckpointError(
                f"ShardWriter: {len(self._plan) - self._pos} tensors never written "
                f"(next: {self._plan[self._pos][1][0]})")
        if len(self.files) > 1:
            total = sum(_numel(s) * d.itemsize for _, (_, d, s) in self._plan)
            index = {"metadata": {"total_size": total},
                     "weight_map": {e[0]: f for f, e in self._plan}}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")


# The side files of a Megatron checkpoint that make it convertible back to HF on its own
# (written by tools/convert_hf.py and by the trainer's checkpoints).
META_NAME = "dapo_convert.json"  # architecture, dtype, vocab sizes, HF tensor names/dtypes
CONFIG_NAME = "hf_config.json"  # the HF config.json
EXTRA_DIR = "hf_extra"  # tokenizer files, generation_config.json, other small files
_EXTRA_MAX_BYTES = 64 * 1024**2
# What AutoTokenizer reads; an export with none of them is not a usable HF model
# (transformers 5 silently builds an empty tokenizer from such a directory).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def config_with_dtype(raw: bytes, dtypes: set) -> bytes:
    """config.json for weights written in ``dtypes``: the source bytes unchanged, unless
    they name another dtype (``dtype``, or ``torch_dtype`` before transformers 4.56): then
    that field is corrected, since from_pretrained's default dtype follows it (a policy
    trained in fp32 from a bf16 model would otherwise load back rounded to bf16)."""
    if len(dtypes) != 1 or next(iter(dtypes)) not in _TORCH_DTYPE_NAMES:
        return raw
    name = _TORCH_DTYPE_NAMES[next(iter(dtypes))]
    cfg = json.loads(raw)
    keys = [k for k in ("dtype", "torch_dtype") if k in cfg and cfg[k] != name]
    if not keys:
        return raw
    for k in keys:
        cfg[k] = name
    return (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode()


def complete_hf_export(out_dir: str) -> None:
    """Make ``out_dir`` (weights + config.json) a complete HF model directory: a
    generation_config.json from config.json's special token ids when none was carried
    (what transformers' GenerationConfig.from_model_config takes), and a warning when no
    tokenizer files are there."""
    gen_path = os.path.join(out_dir, "generation_config.json")
    if not os.path.exists(gen_path):
        with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
               if cfg.get(k) is not None}
        with open(gen_path, "w", encoding="utf-8") as f:
            json.dump({"_from_model_config": True, **gen}, f, indent=2, sort_keys=True)
            f.write("\n")
    if not any(os.path.exists(os.path.join(out_dir, n)) for n in TOKENIZER_FILES):
        logger.warning("%s: no tokenizer files (the checkpoint carries none, e.g. a run with the "
                       "embedded character tokenizer); AutoTokenizer cannot load this model. "
                       "Pass --tokenizer DIR to copy them from the model's HF directory", out_dir)


def copy_extras(src: str, dst: str) -> None:
    """Small non-weight files (tokenizer, generation config) travel with the weights."""
    skip = {"config.json", "model.safetensors.index.json", CONFIG_NAME, META_NAME}
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (name in skip or name.endswith((".safetensors", ".bin", ".pt", ".distcp"))
                or not os.path.isfile(path) or os.path.getsize(path) > _EXTRA_MAX_BYTES):
            continue
        os.makedirs(dst, exist_ok=True)
        shutil.copy2(path, os.path.join(dst, name))


def carry_hf_files(ckpt_dir: str, hf_config: dict, source_dirs) -> None:
    """Make a trainer checkpoint convertible back to HF on its own: ``hf_config.json`` (the
    config the run trained: the source config.json byte for byte when it is that one) and
    ``hf_extra/`` (tokenizer, generation config) from ``source_dirs`` (HF model or
    tokenizer directories; None entries skipped, later ones win)."""
    sources = [d for d in dict.fromkeys(source_dirs) if d and os.path.isdir(d)]
    raw = None
    for d in sources:
        path = os.path.join(d, "config.json")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                candidate = f.read()
            try:
                same = json.loads(candidate) == hf_config
            except ValueError:
                same = False
            if same:
                raw = candidate
                break
    if raw is None:
        raw = (json.dumps(hf_config, indent=2, sort_keys=True) + "\n").encode()
    with open(os.path.join(ckpt_dir, CONFIG_NAME), "wb") as f:
        f.write(raw)
    for d in sources:
        copy_extras(d, os.path.join(ckpt_dir, EXTRA_DIR))


__all__ = ["CONFIG_NAME", "EXTRA_DIR", "META_NAME", "CheckpointError", "DTYPES", "SafetensorsReader", "ShardWriter", "TOKENIZER_FILES",
           "carry_hf_files", "complete_hf_export", "config_with_dtype", "copy_extras"]
