"""A stand-in for SGLang's HTTP server, for tests without a GPU: a real process on loopback.

It speaks the subset of the API that SGLangEngine uses, with SGLang's request and
response shapes, and generates deterministic tokens: token k of a sample is
(sum(input_ids) + 7 k + sampling_seed + weight_version) % 50 with log-prob -(token+1)/100.
Every request is appended as a JSON line to --log, so a test can see what reached the
server across restarts. If the file --die-marker exists when a /generate arrives, the
server deletes it and exits mid-request (os._exit), like a crashed scheduler.

    python fake_sglang_server.py --port P --log events.jsonl [--die-marker F] [--step-delay S]
"""

import argparse
import base64
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"version": 0, "aborted": set()}
LOCK = threading.Lock()


def log(args, event):
    with LOCK, open(args.log, "a") as f:
        f.write(json.dumps(event) + "\n")


def generate(args, body):
    outs = []
    for ids, sp, rid in zip(body["input_ids"], body["sampling_params"], body["rid"]):
        tokens, reason = [], {"type": "length", "length": sp["max_new_tokens"]}
        for k in range(sp["max_new_tokens"]):
            with LOCK:
                aborted = rid in STATE["aborted"]
            if aborted:
                reason = {"type": "abort", "message": "Abort request " + rid}
                break
            tok = (sum(ids) + 7 * k + sp.get("sampling_seed", 0) + STATE["version"]) % 50
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


def make_handler(args):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, obj, code=200):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            log(args, {"path": self.path, "pid": os.getpid()})
            if self.path in ("/health", "/health_generate", "/flush_cache"):
                self.reply({})
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
                self.reply(generate(args, body))
            elif self.path == "/update_weights_from_tensor":
                # The tests' serializer: base64(JSON [[name, values], ...]) (SGLang's is a
                # ForkingPickler of CUDA IPC handles, which needs a GPU).
                named = json.loads(base64.b64decode(body["serialized_named_tensors"][0]))
                event.update(names=[n for n, _ in named], flush_cache=body["flush_cache"],
                             weight_version=body["weight_version"],
                             ranks=len(body["serialized_named_tensors"]))
                log(args, event)
                if "reject" in event["names"]:  # what SGLang answers for a name it lacks
                    self.reply({"success": False, "message": "Unknown weight name: reject"}, 400)
                    return
                STATE["version"] = int(body["weight_version"])
                self.reply({"success": True, "message": "Succeeded to update parameter online."})
            elif self.path == "/abort_request":
                event["rid"] = body["rid"]
                log(args, event)
                with LOCK:
                    STATE["aborted"].add(body["rid"])
                self.reply({})
            elif self.path in ("/init_weights_update_group", "/update_weights_from_distributed"):
                event["body"] = body
                log(args, event)
                if "weight_version" in body:
                    STATE["version"] = int(body["weight_version"])
                self.reply({"success": True, "message": ""})
            elif self.path in ("/release_memory_occupation", "/resume_memory_occupation"):
                event["body"] = body
                log(args, event)
                self.reply({})
            else:
                self.reply({"error": "not found"}, 404)

    return Handler


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--die-marker", default="")
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args)).serve_forever()


if __name__ == "__main__":
    main()
