"""The rollout engine protocol: what every engine (embedded, SGLang) takes and returns.

Log-prob convention (the train/inference mismatch check depends on it):

- ``Sample.logprobs[t]`` is ``log p(token_t)`` under the exact distribution the token was
  drawn from: fp32 logits of the model, divided by ``temperature``, truncated by ``top_k``
  then ``top_p`` (see ``dapo_megatron.rollout.sampling``), renormalised. With DAPO's
  training settings (temperature 1, top_p 1, top_k -1) this is the plain model
  log-probability, i.e. what the trainer computes as ``old_logprobs``.
- ``Sample.raw_logprobs[t]`` (only when ``SamplingParams.return_raw_logprobs``) is
  ``log_softmax(logits)[token_t]`` at temperature 1 without truncation: the unscaled model's
  log-probability, the quantity to hold against the Megatron policy whatever the sampling
  settings were.

A sample's ``token_ids`` hold every generated token, including the EOS / stop token that
ended it (the trainer learns to stop), and ``len(logprobs) == len(token_ids)``.
Samples carry the ``weight_version`` they were generated under; engines apply weight
updates only between generate calls, so one call never mixes versions.

Routed experts (MoE models, only when ``SamplingParams.return_routed_experts``):
``Sample.routed_experts[p, l, :]`` are the top-k expert ids layer ``l``'s router chose when
the engine ran position ``p`` of prompt + response, for p in [0, prompt_len + T - 1): the
last generated token is never run through the model, so it has no routing. This is SGLang
0.5.23's layout (srt/managers/io_struct.py, ``routed_experts_start_len`` = 0: rows cover
``[0, seqlen - 1)``; layers are all ``num_hidden_layers``, rows of dense layers are
meaningless). Ids are stored in the smallest integer dtype that holds them
(``compact_expert_ids``).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Protocol, runtime_checkable

import torch

FINISH_REASONS = ("stop", "length", "abort")

# One bucket of a weight sync: HF-named full tensors, e.g. [("model.embed_tokens.weight", t)].
WeightBucket = list[tuple[str, torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample G responses per prompt.

    n: responses per prompt (DAPO's G).
    temperature: > 0; logits are divided by it before truncation.
    top_p: in (0, 1]; nucleus truncation after top_k (1.0 = off).
    top_k: keep the k most likely tokens (-1 = off).
    max_new_tokens: generated-token budget; hitting it gives finish_reason "length".
    stop_token_ids: generation stops after emitting any of these (EOS goes here).
    stop_strings: generation stops once the decoded response contains one (needs a decoder).
    seed: base seed; sample j of prompt i draws from a stream seeded by (seed, i, j), so a
        round is reproducible whatever the batching or the number of engines.
    return_raw_logprobs: also return temperature-1, untruncated log-probs (raw_logprobs).
    return_logprobs: False lets an engine skip log-probs (Sample.logprobs may then be []):
        evaluation at top_p < 1 on SGLang, whose log-probs ignore truncation, needs it.
    return_routed_experts: also return each position's routed experts (MoE routing replay,
        ``algo.routing_replay``; module doc).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    return_raw_logprobs: bool = False
    return_logprobs: bool = True
    return_routed_experts: bool = False

    def __post_init__(self) -> None:
        # Lists are accepted for convenience and frozen to tuples (hashable, picklable).
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(str(s) for s in self.stop_strings))
        if self.n < 1:
            raise ValueError(f"SamplingParams.n must be >= 1, got {self.n}")
        if not (self.temperature > 0.0 and self.temperature < float("inf")):
            raise ValueError(
                f"SamplingParams.temperature must be a finite number > 0, got {self.temperature}"
                " (greedy decoding: use top_k=1)"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )

    @property
    def truncates(self) -> bool:
        """True when top_p / top_k change the distribution the tokens are drawn from."""
        return self.top_p < 1.0 or self.top_k != -1


@dataclasses.dataclass
class Sample:
    """One generated response.

    token_ids: [T] generated tokens (prompt excluded), stop/EOS token included.
    logprobs: [T] fp32 log-probs of token_ids under the sampling distribution (module doc);
        [] only when the request set return_logprobs=False.
    finish_reason: "stop" (stop token / string), "length" (max_new_tokens) or "abort".
    prompt_index: index of the prompt in the generate() call's list.
    request_id: the prompt's request id (shared by its n samples; abort() takes it).
    sample_index: j in 0..n-1 within the prompt's group.
    weight_version: the engine's weight_version when the sample was generated.
    raw_logprobs: [T] temperature-1 untruncated log-probs, or None if not requested.
    routed_experts: [prompt_len + T - 1, layers, top_k] integer tensor of expert ids (module
        doc), or None if not requested or the model has no experts.
    token_versions: [T] the weight version each token was drawn under, for a response
        continued over several versions (partial rollouts, rollout/partial.py); None: every
        token is at weight_version.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    prompt_index: int
    request_id: str
    sample_index: int = 0
    weight_version: int = 0
    raw_logprobs: list[float] | None = None
    routed_experts: torch.Tensor | None = None
    token_versions: list[int] | None = None

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(
                f"Sample.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}"
            )
        if self.logprobs and len(self.logprobs) != len(self.token_ids):
            raise ValueError(
                f"Sample {self.request_id}/{self.sample_index}: {len(self.token_ids)} tokens but "
                f"{len(self.logprobs)} logprobs"
            )


def compact_expert_ids(ids: torch.Tensor) -> torch.Tensor:
    """Expert ids in the smallest dtype that holds them: uint8 below 256 experts (every
    shipped MoE: Qwen3-235B-A22B has 128), else int16. They cross Ray with every sample."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 32767):
        raise ValueError(f"expert ids must lie in [0, 32767], got [{int(ids.min())}, "
                         f"{int(ids.max())}]")
    small = ids.numel() == 0 or int(ids.max()) < 256
    return ids.to(torch.uint8 if small else torch.int16)


@dataclasses.dataclass(frozen=True)
class Resume:
    """Continue one sample of a request from its partial response (partial rollouts).

    The engine generates sample ``sample_index`` of the request as if ``token_ids`` had
    already been drawn: the prompt plus ``token_ids`` is the prefix, ``max_new_tokens``
    counts the whole response (prefix included), and the sample draws from its own random
    stream, the one of ``(seed, stream_id, sample_index)`` at token position
    ``len(token_ids)``. With the weights it started under, a continued response therefore
    equals the uninterrupted one. The returned Sample holds the new tokens only.
    """

    sample_index: int
    token_ids: tuple[int, ...]
    seed: int
    stream_id: str


def default_request_ids(num_prompts: int, prefix: str = "req") -> list[str]:
    """Request ids "req-0" .. for callers that do not name their requests."""
    return [f"{prefix}-{i}" for i in range(num_prompts)]


@runtime_checkable
class RolloutEngine(Protocol):
    """What the manager and controller call on any engine (in-process or behind Ray)."""

    weight_version: int

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_ids: list[str] | None = None,
        resume: list[list[Resume] | None] | None = None,
    ) -> list[list[Sample]]:
        """Sample params.n responses for each token-id prompt; result[i] has n Samples.

        resume[i], when given and not None, replaces prompt i's n fresh samples by the
        continuations it lists (result[i] then has one Sample per Resume, in its order).
        Engines that cannot continue a response raise NotImplementedError."""
        ...

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """A whole sync from one caller: begin_weight_update, every bucket, end_weight_update."""
        ...

    def begin_weight_update(self, version: int) -> None:
        """Open a weight-update session (SGLang 0.5.23 refuses tensor updates outside one):
        the engine serves nothing until end_weight_update; buckets may come from several
        senders (policy ranks) in any order."""
        ...

    def load_weight_bucket(self, bucket: WeightBucket) -> None:
        """Load one bucket of HF-named full tensors inside the session."""
        ...

    def end_weight_update(self) -> None:
        """Close the session: every parameter arrived, weight_version = the session's version."""
        ...

    def release_memory(self) -> None:
        """Free accelerator memory (weights, KV cache) for the train phase."""
        ...

    def resume_memory(self, tags: list[str] | None = None) -> None:
        """Re-acquire what release_memory freed: tags ["weights"] before a sync, ["kv_cache"]
        after it (None: everything)."""
        ...

    def abort(self, request_ids: list[str]) -> None:
        """Stop the named requests at their next decode step.

        The running generate call returns their samples with finish_reason "abort" and the
        tokens generated so far (the manager counts those as generated: they were paid
        for). An id whose generate has not started yet must still be aborted when it does.
        Called from another thread (or a concurrent actor call) while generate runs.
        """
        ...

    def health(self) -> bool:
        """True if the engine can serve a generate call now."""
        ...

    def shutdown(self) -> None:
        """Release every resource; the engine is unusable afterwards."""
        ...
