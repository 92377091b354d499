"""The routed experts of an HF MoE model, read off its routers while the engine generates.

transformers 5.x MoE blocks (Qwen3-MoE, Qwen2-MoE, Mixtral) route through a
``*TopKRouter`` module whose forward returns ``(router_logits, router_scores,
router_indices)``, indices ``[tokens, top_k]`` from ``torch.topk`` of the softmax
(transformers/models/qwen3_moe/modeling_qwen3_moe.py, Qwen3MoeTopKRouter.forward). A
forward hook on each router keeps the indices the experts were actually run with; nothing
is recomputed, so what is recorded is exactly what the engine used.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _router_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> that layer's top-k router (dense layers have none)."""
    routers = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter"):
            match = _LAYER.search(name)
            if match is None:
                raise ValueError(f"MoE router {name!r}: cannot tell its decoder layer")
            routers[int(match.group(1))] = module
    return routers


class RouterTap:
    """Records the top-k expert ids of every routed layer of ``model``, per forward.

    ``take(batch, seq)`` returns what the last forward routed as ``[batch, seq, layers,
    top_k]`` int64 (layers = the config's ``num_hidden_layers``; dense layers' rows are 0)
    and forgets it. Recording is on only after ``enable(True)``; otherwise the hooks return
    at once.
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = _router_modules(model)
        config: Any = model.config
        self.num_layers = int(getattr(config, "num_hidden_layers"))
        self.top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
        self.recording = False
        self._seen: dict[int, torch.Tensor] = {}
        for layer, router in self.routers.items():
            router.register_forward_hook(self._hook(layer))

    @property
    def is_moe(self) -> bool:
        return bool(self.routers)

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            if self.recording:
                self._seen[layer] = output[2].detach()
        return hook

    def enable(self, on: bool) -> None:
        self.recording = on
        self._seen.clear()

    def take(self, batch: int, seq: int) -> torch.Tensor:
        """``[batch, seq, layers, top_k]`` int64 of the last forward over ``batch x seq``."""
        out = torch.zeros(batch, seq, self.num_layers, self.top_k, dtype=torch.long)
        for layer in self.routers:
            ids = self._seen.get(layer)
            if ids is None or ids.shape != (batch * seq, self.top_k):
                raise RuntimeError(
                    f"MoE layer {layer}: expected routed experts for {batch}x{seq} tokens, got "
                    f"{None if ids is None else tuple(ids.shape)}")
            out[:, :, layer] = ids.view(batch, seq, self.top_k).cpu()
        self._seen.clear()
        return out
