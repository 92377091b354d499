"""What a run trains and evaluates on: prompts, references and the tokenizer.

Either the user's files (DAPO-Math-17K-style jsonl/parquet, data.train_path / eval_path)
with an HF tokenizer, or an embedded task (data.synthetic_task) with its character tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging

from dapo_megatron.config import ConfigError, DapoConfig
from dapo_megatron.data.datasets import PromptExample, PromptFields, drop_long_prompts, load_prompt_dataset
from dapo_megatron.data.synthetic import arithmetic_splits, chain_splits
from dapo_megatron.data.templates import user_message
from dapo_megatron.data.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Task:
    train: list[PromptExample]
    eval: list[PromptExample]
    tokenizer: Tokenizer
    # An embedded task: its train examples carry metadata["solution"], the worked solution
    # that tools/make_warm_start.py trains on.
    embedded: bool = False


def load_task(cfg: DapoConfig) -> Task:
    d = cfg.data
    if not d.train_path:
        if d.synthetic_task == "chains":
            train, eval_ = chain_splits(d.synthetic_min_steps, d.synthetic_max_steps,
                                        d.synthetic_eval_size, d.synthetic_train_size)
        else:
            train, eval_ = arithmetic_splits(d.synthetic_max_addend, d.synthetic_max_factor,
                                             d.synthetic_eval_size, d.synthetic_train_size)
        to_example = lambda i, p, src: PromptExample(  # noqa: E731
            messages=user_message(p.prompt), ground_truth=p.answer, data_source=src, index=i,
            metadata={"solution": p.solution},
        )
        name = d.synthetic_task
        train_ex = [to_example(i, p, name) for i, p in enumerate(train)]
        eval_ex = [to_example(i, p, f"{name}-heldout") for i, p in enumerate(eval_)]
        tokenizer = load_tokenizer(d.tokenizer or "char")
        if d.eval_path:  # an eval file replaces the held-out split
            eval_ex = _load_file(cfg, "data.eval_path", tokenizer)
        _check_size(cfg, "data.synthetic_train_size", train_ex)
        return Task(train_ex, eval_ex, tokenizer, embedded=True)

    tok_path = d.tokenizer or cfg.model.hf_dir
    if not tok_path:
        raise ValueError("data.tokenizer: a dataset from data.train_path needs an HF tokenizer "
                         "(set data.tokenizer or model.hf_dir)")
    tokenizer = load_tokenizer(tok_path, cfg.model.hf_dir)
    train = _load_file(cfg, "data.train_path", tokenizer)
    _check_size(cfg, "data.train_path", train)
    eval_ex = _load_file(cfg, "data.eval_path", tokenizer) if d.eval_path else []
    return Task(train, eval_ex, tokenizer)


def _load_file(cfg: DapoConfig, key: str, tokenizer: Tokenizer) -> list[PromptExample]:
    """The usable prompts of the file named by `key`; any reason the file cannot be used is
    a ConfigError naming `key` (raised here, before any actor starts)."""
    d = cfg.data
    path = getattr(d, key.split(".")[1])
    fields = PromptFields(prompt_key=d.prompt_key, question_key=d.question_key, answer_key=d.answer_key,
                          data_source_key=d.data_source_key)
    try:
        examples = load_prompt_dataset(path, fields, d.template).examples
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, pyarrow's errors for a corrupt file
        raise ConfigError(f"{key}: cannot use {path}: {type(e).__name__}: {e}") from None
    limit = cfg.rollout.max_prompt_length
    lengths = {id(e): len(tokenizer.encode_prompt(e.messages)) for e in examples}
    kept, _ = drop_long_prompts(examples, lambda e: lengths[id(e)], limit)
    if not kept:
        raise ConfigError(f"{key}: all {len(examples)} prompts of {path} are longer than "
                          f"rollout.max_prompt_length={limit} tokens (the shortest has "
                          f"{min(lengths.values())}); "
                          "raise rollout.max_prompt_length")
    return kept


def _check_size(cfg: DapoConfig, key: str, train: list) -> None:
    """A generation round takes rollout.gen_batch_size distinct prompts; fewer would silently
    repeat prompts within the round."""
    need = cfg.rollout.gen_batch_size
    if len(train) < need:
        raise ConfigError(f"{key}: {len(train)} usable training prompts, fewer than rollout.gen_batch_size="
                          f"{need} (a round would repeat prompts); add data or lower rollout.gen_batch_size "
                          f"(and trainer.train_batch_size)")
