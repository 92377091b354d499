"""The frozen reference policy of the KL term: the initial weights, kept on the policy ranks.

GRPO-style KL regularisation (``algo.kl_coef > 0``) needs log pi_ref of every response
token, with pi_ref the policy RL started from. The reference is a second set of the
policy's model chunks, built by the same ``build_model`` call (so every rank holds exactly
its own TP / PP / EP shard, "same layout") without DDP or optimizer, filled with a copy of
the policy's weights when the policy is built (``model.hf_dir`` / ``model.load`` / the
seeded initialisation) and never updated. A resumed run rebuilds it the same way, from the
same source, so it needs no checkpoint of its own.

With ``offload`` (GPU only) the reference's parameters live in host memory between steps
and come to the GPU only around its forward pass (``onloaded``), so it costs no GPU memory
during rollout and the update. On CPU both are no-ops.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["ReferencePolicy"]


class ReferencePolicy:
    """Frozen model chunks with the policy's layout.

    Args:
        model_chunks: this rank's GPTModel chunks (not DDP-wrapped), as ``build_model``
            returns them with ``wrap_ddp=False``.
        offload: keep the parameters in host memory between uses (GPU only).
    """

    def __init__(self, model_chunks: list, *, offload: bool = False) -> None:
        self.model = model_chunks
        for chunk in self.model:
            chunk.eval()
            for param in chunk.parameters():
                param.requires_grad_(False)
        self.offload = offload and torch.cuda.is_available()
        self._device = None

    def copy_from(self, policy_chunks: list) -> None:
        """Take the policy's current weights (parameter by parameter, same names), then
        move to host memory if offloading."""
        from dapo_megatron.policy.model import unwrap

        self._move("cuda" if self.offload else None)
        for mine, theirs in zip(self.model, policy_chunks, strict=True):
            source = dict(unwrap(theirs).named_parameters())
            target = dict(unwrap(mine).named_parameters())
            if source.keys() != target.keys():
                missing = sorted(source.keys() ^ target.keys())[:5]
                raise RuntimeError(f"reference and policy chunks differ in parameters: {missing}")
            with torch.no_grad():
                for name, param in target.items():
                    param.copy_(source[name])
        self._move("cpu" if self.offload else None)

    @contextlib.contextmanager
    def onloaded(self):
        """The reference's parameters on the GPU for the duration (no-op without offload)."""
        self._move("cuda" if self.offload else None)
        try:
            yield self.model
        finally:
            self._move("cpu" if self.offload else None)

    def _move(self, device: str | None) -> None:
        if device is None or device == self._device:
            return
        for chunk in self.model:
            for param in chunk.parameters():
                if device == "cpu":  # pinned, so the next onload can copy asynchronously
                    host = torch.empty(param.shape, dtype=param.dtype, pin_memory=True)
                    param.data = host.copy_(param.data)
                else:
                    param.data = param.data.to(device, non_blocking=True)
        if device == "cpu":
            torch.cuda.empty_cache()
        else:
            torch.cuda.synchronize()
        self._device = device
