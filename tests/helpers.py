"""Rewards for the script tests, passed as --reward=tests.helpers:ClassName (rewards.get_reward imports them).
Each scores like the `brightness` reward, so a run with one of them trains exactly like a brightness run
until the call it is told to misbehave on (calls are counted per process: one call per sampling batch)."""
import os
import time

import torch

import rewards


class NanReward(rewards.Reward):
    """bad_calls {call number: "nan" | "inf" | "raise"}: that call returns a NaN or an inf score as a reward
    that does not check its output would, or raises FloatingPointError as Reward.__call__ does when its
    score_batch produced one."""

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, bad_calls=None):
        super().__init__(device, dtype, batch_size)
        self.bad_calls, self.calls = dict(bad_calls or {}), 0
        self.brightness = rewards.BrightnessReward()

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        scores, details = self.brightness(images, prompts, metadata)
        kind = self.bad_calls.get(self.calls)
        if kind == "nan":
            scores[0] = float("nan")
        elif kind == "inf":
            scores[-1] = float("inf")
        elif kind == "raise":
            raise FloatingPointError(f"{self.name} produced non-finite scores at [0]")
        return scores, details


class HangReward(rewards.Reward):
    """Brightness, except that call `hang_at` writes the file `marker` and never returns: the test then
    kills the process at a known point of the loop (its reward thread blocks the iteration)."""

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, hang_at=0, marker=""):
        super().__init__(device, dtype, batch_size)
        self.hang_at, self.marker, self.calls = hang_at, marker, 0
        self.brightness = rewards.BrightnessReward()

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        if self.calls == self.hang_at:
            with open(self.marker + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(self.marker + ".tmp", self.marker)
            while True:
                time.sleep(1)
        return self.brightness(images, prompts, metadata)
