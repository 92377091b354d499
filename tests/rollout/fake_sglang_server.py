"""A stand-in for SGLang 0.5.23's HTTP server on CPU, built on SGLang's own pieces.

Everything that decides whether a request is accepted is SGLang's code, run here:
/generate bodies go through the JSON contract gate (srt/entrypoints/api_contract.py), the
GenerateReqInput dataclass with normalize_batch_and_arguments, and SamplingParams.verify;
control bodies are parsed into their io_struct classes the way FastAPI does (pydantic,
through sglang's own schema hook); weight updates, release and resume run in SGLang's
SchedulerWeightUpdaterManager (srt/managers/scheduler_components/weight_updater.py: the
session guard, the idle assertion, the tag bookkeeping); tensor payloads are opened by
MultiprocessingSerializer.deserialize (SafeUnpickler), one per TP rank, and unpacked by
FlattenedTensorBucket. Rejections answer as http_server.py does (HTTP 400).

What is ours is the model: token k of a sample is
(sum(input_ids) + 7 k + sampling_seed + weight_version) % 50 with log-prob -(token+1)/100,
and a weight named "reject" fails to load, like a name the model lacks. Every request is
appended as a JSON line to --log. If the file --die-marker exists when a /generate
arrives, the server deletes it and exits mid-request (os._exit), like a crashed scheduler.

    python fake_sglang_server.py --port P --log events.jsonl [--tp-size N] [--die-marker F] [--step-delay S]
"""

import argparse
import json
import os
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests import sglang_cpu  # noqa: E402

VOCAB = 50
STATE = {"version": 0, "aborted": set(), "live": set(), "running": 0}
LOCK = threading.Lock()


def log(args, event):
    with LOCK, open(args.log, "a") as f:
        f.write(json.dumps(event) + "\n")


def generate(args, body):
    """As SGLang, a rid is known from its request's arrival until it finishes: an abort
    reaches it while queued or running (tokenizer_manager.py, abort_request looks it up in
    rid_to_state) and is forgotten with it, so a later request may reuse the rid."""
    with LOCK:
        STATE["live"].update(body["rid"])
    try:
        return _generate(args, body)
    finally:
        with LOCK:
            STATE["live"].difference_update(body["rid"])
            STATE["aborted"].difference_update(body["rid"])


def _generate(args, body):
    outs = []
    for ids, sp, rid in zip(body["input_ids"], body["sampling_params"], body["rid"]):
        tokens, reason = [], {"type": "length", "length": sp["max_new_tokens"]}
        for k in range(sp["max_new_tokens"]):
            with LOCK:
                aborted = rid in STATE["aborted"]
            if aborted:
                reason = {"type": "abort", "message": "Abort request " + rid}
                break
            tok = (sum(ids) + 7 * k + sp.get("sampling_seed", 0) + STATE["version"]) % VOCAB
            tokens.append(tok)
            if tok in sp.get("stop_token_ids", []):
                reason = {"type": "stop", "matched": tok}
                break
            time.sleep(args.step_delay)
        outs.append({
            "text": "",
            "output_ids": tokens,
            "meta_info": {
                "id": rid,
                "finish_reason": reason,
                "prompt_tokens": len(ids),
                "completion_tokens": len(tokens),
                "output_token_logprobs": [[-(t + 1) / 100, t, None] for t in tokens],
            },
        })
    return outs


class CharTokenizer:
    """The server's tokenizer, as SamplingParams.normalize uses it (stop-string lengths)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def check_generate(body):
    """SGLang's admission of a /generate body: None, or the error it answers with."""
    import pydantic
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams

    error = generate_contract_error(body)
    if error is not None:
        return error
    try:
        obj = pydantic.TypeAdapter(GenerateReqInput).validate_python(body)
        obj.normalize_batch_and_arguments()
        for sp in body["sampling_params"]:
            params = SamplingParams(**sp)
            params.normalize(CharTokenizer())
            params.verify(VOCAB)
    except Exception as err:  # noqa: BLE001 - SGLang answers these with HTTP 400
        return f"{type(err).__name__}: {err}"
    return None


class Weights:
    """SGLang's scheduler-side weight manager over a model that records what it loads."""

    def __init__(self, tp_size):
        import torch
        import torch.distributed as dist
        from sglang.srt.disaggregation.utils import DisaggregationMode
        from sglang.srt.managers.scheduler_components import weight_updater as wu
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        # The runtime context SGLang's launcher publishes: one TP group (gloo, world 1,
        # since one process plays every rank) and the weight cache off.
        store = dist.HashStore()
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        wu.get_parallel = lambda: types.SimpleNamespace(tp_group=types.SimpleNamespace(cpu_group=None))
        wu.get_model = lambda: types.SimpleNamespace(weight_cache_mode="off")
        self.loaded = []

        def deserialize_own_rank(payloads):
            if len(payloads) != tp_size:
                raise ValueError(f"{len(payloads)} payloads for tp_size {tp_size}")
            # Every rank opens its own payload in its own scheduler; here all in turn.
            return [MultiprocessingSerializer.deserialize(p) for p in payloads][0]

        def update_weights_from_tensor(named_tensors, load_format=None):
            if load_format != "flattened_bucket":
                return False, f"the stand-in model takes flattened_bucket, not {load_format!r}"
            bucket = FlattenedTensorBucket(flattened_tensor=named_tensors["flattened_tensor"],
                                           metadata=named_tensors["metadata"])
            names = [n for n, _ in bucket.reconstruct_tensors()]
            if "reject" in names:
                return False, "Unknown weight name: reject"
            self.loaded.append(names)
            return True, "Success"

        runner = types.SimpleNamespace(weight_updater=types.SimpleNamespace(
            begin_weight_update=lambda: None,
            end_weight_update=lambda run_post_load: None,
            update_weights_from_tensor=update_weights_from_tensor,
            load_weights_from_distributed=lambda weights: (True, "Success")))
        model = torch.nn.Linear(2, 2)
        model.register_buffer("rotary", torch.ones(2))
        target = types.SimpleNamespace(
            receive_weights_from_distributed=lambda **kw: kw)
        tp_worker = types.SimpleNamespace(
            weight_update_runners=lambda: [("target", runner)],
            deserialize_own_rank=deserialize_own_rank,
            init_weights_update_group=lambda req: (True, "Succeeded to initialize group."),
            model_runner=types.SimpleNamespace(model=model, weight_updater=target))

        def record_version(new_version):
            if new_version is not None:
                STATE["version"] = int(new_version)

        scheduler = types.SimpleNamespace(_engine_paused=False, disaggregation_mode=DisaggregationMode.NULL,
                                          record_weight_version_change=record_version)
        idle = lambda ignore_waiting=False: STATE["running"] == 0  # noqa: E731
        self.manager = wu.SchedulerWeightUpdaterManager(
            tp_worker=tp_worker, draft_worker=None,
            memory_saver_adapter=types.SimpleNamespace(pause=lambda tag: None, resume=lambda tag: None),
            flush_cache=lambda empty_cache=False: idle(), is_fully_idle=idle, scheduler=scheduler)

    def handle(self, path, body):
        """(HTTP status, answer) as http_server.py gives them."""
        import pydantic
        from sglang.srt.managers import io_struct as io

        routes = {
            "/begin_weight_update": (io.BeginWeightUpdateReqInput, self.manager.begin_weight_update),
            "/end_weight_update": (io.EndWeightUpdateReqInput, self.manager.end_weight_update),
            "/update_weights_from_tensor": (io.UpdateWeightsFromTensorReqInput,
                                            self.manager.update_weights_from_tensor),
            "/update_weights_from_distributed": (io.UpdateWeightsFromDistributedReqInput,
                                                 self.manager.update_weights_from_distributed),
            "/init_weights_update_group": (io.InitWeightsUpdateGroupReqInput,
                                           self.manager.init_weights_update_group),
            "/release_memory_occupation": (io.ReleaseMemoryOccupationReqInput,
                                           self.manager.release_memory_occupation),
            "/resume_memory_occupation": (io.ResumeMemoryOccupationReqInput,
                                          self.manager.resume_memory_occupation),
        }
        cls, method = routes[path]
        try:
            req = pydantic.TypeAdapter(cls).validate_python(body)
        except pydantic.ValidationError as err:
            return 422, {"detail": str(err)}  # FastAPI's answer to a body it cannot parse
        try:
            out = method(req)
        except Exception as err:  # noqa: BLE001 - http_server.py: _create_error_response
            return 400, {"error": {"message": f"{type(err).__name__}: {err}"}}
        if hasattr(out, "success"):
            return (200 if out.success else 400), {"success": out.success, "message": out.message}
        return 200, None


def make_handler(args, weights):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, obj, code=200):
            data = b"" if obj is None else json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            log(args, {"path": self.path, "pid": os.getpid()})
            if self.path == "/health":
                # Generation on /health is on by default in 0.5.23; the stand-in cannot run
                # one, so it insists the engine turned it off as SGLangEngine must.
                if os.environ.get("SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION", "true").lower() not in (
                        "false", "0", "no", "n"):
                    self.reply({"error": "/health would generate: start with "
                                         "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false"}, 500)
                    return
                self.reply(None)
            elif self.path == "/health_generate":
                if weights.manager.offload_tags:
                    self.reply({"error": "generation with released memory"}, 500)
                    return
                self.reply(None)
            elif self.path == "/flush_cache":
                self.reply(None)
            elif self.path == "/get_weight_version":
                self.reply({"weight_version": str(STATE["version"])})
            else:
                self.reply({"error": "not found"}, 404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            event = {"path": self.path, "pid": os.getpid()}
            if self.path == "/generate":
                event["body"] = body
                log(args, event)
                if args.die_marker and os.path.exists(args.die_marker):
                    os.remove(args.die_marker)
                    os._exit(3)
                error = check_generate(body)
                if error is not None:
                    self.reply({"error": error}, 400)
                    return
                if weights.manager.offload_tags or weights.manager._session is not None:
                    self.reply({"error": "generation while memory is released or weights update"}, 500)
                    return
                with LOCK:
                    STATE["running"] += 1
                try:
                    self.reply(generate(args, body))
                finally:
                    with LOCK:
                        STATE["running"] -= 1
            elif self.path == "/abort_request":
                event["rid"] = body.get("rid")
                log(args, event)
                with LOCK:
                    if body.get("rid") in STATE["live"]:
                        STATE["aborted"].add(body.get("rid"))
                self.reply(None)
            elif self.path in ("/begin_weight_update", "/end_weight_update",
                               "/update_weights_from_tensor", "/update_weights_from_distributed",
                               "/init_weights_update_group", "/release_memory_occupation",
                               "/resume_memory_occupation"):
                before = len(weights.loaded)
                with LOCK:
                    code, answer = weights.handle(self.path, body)
                if self.path == "/update_weights_from_tensor":
                    event.update(names=[n for b in weights.loaded[before:] for n in b],
                                 flush_cache=body.get("flush_cache"), load_format=body.get("load_format"),
                                 weight_version=body.get("weight_version"),
                                 ranks=len(body.get("serialized_named_tensors", [])))
                else:
                    event["body"] = body
                event["status"] = code
                log(args, event)
                self.reply(answer, code)
            else:
                self.reply({"error": "not found"}, 404)

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--die-marker", default="")
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    reason = sglang_cpu.load()
    if reason:
        sys.exit(f"fake_sglang_server: {reason}")
    weights = Weights(args.tp_size)
    ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args, weights)).serve_forever()


if __name__ == "__main__":
    main()
