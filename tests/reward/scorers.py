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


CRASH_ONCE = "CRASH-ONCE:"  # followed by a marker file path: crash unless the file exists


def crash_once(response, ground_truth, **kwargs):
    """Crash the worker the first time a response is seen (a transient fault: OOM kill)."""
    if isinstance(response, str) and response.startswith(CRASH_ONCE):
        marker, _, text = response[len(CRASH_ONCE):].partition("|")
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)
        response = text
    return compute_score(response, ground_truth, **kwargs)
