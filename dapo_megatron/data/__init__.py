"""Prompt data: readers, templates, sampling, and the integer-answer transformation.

- `datasets`: `load_prompt_dataset` -> `PromptExample`s from jsonl/parquet (DAPO-Math-17K,
  AIME-style, plain {problem, answer}); `rowio` reads rows and reports bad ones by line.
- `templates`: the DAPO-Math-17K prompt (`dapo_prompt`).
- `sampler`: `PromptSampler`, seeded epoch shuffles with exact resume.
- `transform` (+ `latex_answer`, `closed_form`, `answer_forms`): free-form answers to
  integer answers, as tools/transform_dataset.py runs it.
- `synthetic`, `tokenizer`: the embedded arithmetic task and tokenizers.
"""
