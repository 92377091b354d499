"""The Megatron-core policy.

- compat.py      the CPU execution layer (switched on only without CUDA)
- parallel.py    torch.distributed + parallel_state from (tp, pp, ep, cp)
- model.py       GPTModel from an HF config (Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral)
- logprobs.py    vocab-parallel log-probs and entropy
- microbatch.py  token-budget micro-batches balanced over DP ranks
- train.py       `PolicyTrainer`: old log-probs, the DAPO train step, save/load, export
- optimizer.py, checkpoint.py, offload.py, export.py
"""

from dapo_megatron.policy.compat import eager_jit_fusers_without_cuda

eager_jit_fusers_without_cuda()  # before any policy module imports megatron (compat.py)
