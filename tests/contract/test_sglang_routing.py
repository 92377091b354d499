"""Routed experts over SGLang 0.5.23's wire, held against SGLang's own code on CPU: the
request flag as GenerateReqInput parses it, the server flag as its argument parser reads
it, and the answer encoded the way its tokenizer manager encodes it and decoded by its own
extract_routed_experts_from_meta_info. Skips only where sglang 0.5.23 cannot be imported."""

from __future__ import annotations

import json

import pytest
import torch

from dapo_megatron.rollout.protocol import SamplingParams
from dapo_megatron.rollout.sglang_api import SGLangConfig, build_generate_payload, launch_command, to_samples
from tests import sglang_cpu

REASON = sglang_cpu.load()
pytestmark = pytest.mark.skipif(bool(REASON), reason=str(REASON))

LAYERS, TOP_K = 3, 2


def test_request_and_server_flags_are_what_sglang_reads():
    import argparse

    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.server_args import ServerArgs
    import pydantic

    params = SamplingParams(n=2, max_new_tokens=4, return_routed_experts=True)
    body = build_generate_payload([[1, 2, 3], [4]], params, ["p", "q"])
    assert generate_contract_error(json.loads(json.dumps(body))) is None
    req = pydantic.TypeAdapter(GenerateReqInput).validate_python(json.loads(json.dumps(body)))
    req.normalize_batch_and_arguments()
    assert req.return_routed_experts is True and req.routed_experts_start_len == 0
    # Without the flag nothing is asked for.
    plain = build_generate_payload([[1]], SamplingParams(), ["p"])
    assert "return_routed_experts" not in plain

    cmd = launch_command(SGLangConfig(model_path="m", routed_experts_layout=(LAYERS, TOP_K)), 1)
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    args = parser.parse_args(cmd[3:])
    assert args.enable_return_routed_experts is True
    assert "--enable-return-routed-experts" not in launch_command(SGLangConfig(model_path="m"), 1)


def _answer(rid, prompt, tokens, routes):
    """One /generate output as the tokenizer manager writes it: meta_info["routed_experts"]
    is base64 of the int32 bytes (srt/managers/tokenizer_manager.py, the BatchTokenIDOutput
    branch; the detokenizer's _b64_encode_per_request does the same)."""
    import pybase64

    encoded = pybase64.b64encode(routes.to(torch.int32).numpy().tobytes()).decode("utf-8")
    return {"text": "", "output_ids": tokens, "meta_info": {
        "id": rid, "finish_reason": {"type": "length", "length": len(tokens)},
        "output_token_logprobs": [[-0.5, t, None] for t in tokens], "routed_experts": encoded}}


def test_routed_experts_parse_as_sglang_decodes_them():
    from sglang.srt.state_capturer.routed_experts import extract_routed_experts_from_meta_info

    g = torch.Generator().manual_seed(0)
    prompts, tokens = [[5, 6, 7], [9]], [[1, 2], [3, 4, 8]]
    routes = [torch.randint(0, 200, (len(p) + len(t) - 1, LAYERS, TOP_K), generator=g)
              for p, t in zip(prompts, tokens)]
    response = [_answer(f"{rid}/0", p, t, r) for rid, p, t, r in zip("pq", prompts, tokens, routes)]
    params = SamplingParams(n=1, max_new_tokens=3, return_routed_experts=True)
    samples = to_samples(response, prompts, params, ["p", "q"], 0, False, (LAYERS, TOP_K))
    for group, answer, want in zip(samples, response, routes):
        got = group[0].routed_experts
        assert got.dtype == torch.uint8
        theirs = torch.from_numpy(extract_routed_experts_from_meta_info(answer).copy())
        assert torch.equal(got.long().flatten(), theirs.long())
        assert torch.equal(got.long(), want)
    # A wrong row count (e.g. a server started with another start_len) is refused, by rid.
    short = [_answer("p/0", prompts[0], tokens[0], routes[0][1:]), response[1]]
    with pytest.raises(ValueError, match="p/0: routed_experts hold"):
        to_samples(short, prompts, params, ["p", "q"], 0, False, (LAYERS, TOP_K))
    with pytest.raises(ValueError, match="routed_experts_layout"):
        to_samples(response, prompts, params, ["p", "q"], 0, False)
