"""Custom rewards that tests/test_reward.py sends to RewardScorer's worker processes.

A worker imports this module when it unpickles one of these functions, and that import counts
against the item's timeout (1.5 s in the tests). So the module imports nothing the worker has not
already imported (relift_jax.grading); the test module itself imports pytest and numpy, which on a
loaded machine can take longer than the timeout, scoring a good item 0.
"""
from __future__ import annotations

import os
import time

from relift_jax.grading import math_reward


def hang_on_marker(response: str, ground_truth: str, *, require_think_close: bool = True) -> float:
    """Hangs forever on the marker response (a deterministic stand-in for a sympy hang)."""
    if "HANG" in response:
        while True:
            time.sleep(60)
    return math_reward(response, ground_truth, require_think_close=require_think_close)


def exit_on_marker(response: str, ground_truth: str, *, require_think_close: bool = True) -> float:
    """Kills its own process on the marker (a stand-in for a segfault in a C extension)."""
    if "CRASH" in response:
        os._exit(3)
    return math_reward(response, ground_truth, require_think_close=require_think_close)


def raise_on_marker(response: str, ground_truth: str, *, require_think_close: bool = True) -> float:
    """Raises on the marker (a buggy custom reward)."""
    if "BOOM" in response:
        raise ValueError("boom from a custom reward")
    return 1.0


def length_reward(response: str, ground_truth: str, *, require_think_close: bool = True) -> float:
    """A custom non-binary reward used to check that custom rewards plug in."""
    return 0.5 if len(response) > len(ground_truth) else 0.25


def fifths_reward(response: str, ground_truth: str, *, require_think_close: bool = True) -> float:
    """A reward a random model earns about one time in five: 1 iff the text's code points sum to a
    multiple of 5 (deterministic; tests/test_demos.py needs some teacher answers accepted)."""
    return 1.0 if sum(map(ord, response)) % 5 == 0 else 0.0
