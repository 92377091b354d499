"""init_parallel with one rank binds no rendezvous port (runs started side by side cannot race)."""

import os
import socket
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_single_rank_starts_while_its_port_is_taken():
    # The port a free_port() answer named, already bound by another process by the time the rank
    # starts: what two runs on one machine met (EADDRINUSE). One rank needs no TCP store.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = textwrap.dedent(f"""
            import torch, torch.distributed as dist
            from megatron.core import parallel_state
            from dapo_megatron.policy.parallel import init_parallel
            layout = init_parallel(1, 1, 1, rank=0, world_size=1, master_addr="127.0.0.1",
                                   master_port={port}, device="cpu")
            t = torch.ones(2)
            dist.all_reduce(t, group=parallel_state.get_tensor_model_parallel_group())
            print("ok", dist.get_world_size(), layout.dp, t.tolist())
        """)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "ok 1 1 [1.0, 1.0]"
