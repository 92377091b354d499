"""Module-level score functions for RewardPool tests (workers import them by name).

They wrap the real ``compute_score`` and misbehave on marker responses, so the pool's
timeout and crash handling can be driven deterministically.
"""

import os
import time

from dapo_megatron.reward import compute_score

HANG = "HANG-FOREVER"
CRASH = "CRASH-NOW"


def hang_or_crash(response, ground_truth, **kwargs):
    if response == HANG:
        time.sleep(3600)
    if response == CRASH:
        os._exit(3)
    return compute_score(response, ground_truth, **kwargs)
