"""Faults for tests/test_robustness.py: rewards that return malformed output, and a runner that starts a stage
script and makes it hang at a chosen point so the test can SIGKILL it there, without changing the script's
settings (so a resumed run's config equals the uninterrupted one's):

  python tests/faults.py HANG MARKER SCRIPT [--key=value ...]

HANG is "rollout:N" (the N-th call of model.rollout: sampling, after the checkpoints before it) or
"save:N" (the N-th torch.save: inside the N-th checkpoint's save, after its adapter files were written and
before trainer_state.pt: the folder is still step_N.tmpPID). On reaching it the runner writes MARKER and sleeps.
"""
import os
import runpy
import sys
import time

import torch

import rewards


class BadReward(rewards.Reward):
    """Brightness scores, returned wrong: kind "short" (one score too few), "matrix" (shape (B, 1)), "text"
    (strings), "bare" (the scores without the details dict)."""

    def __init__(self, device="cpu", dtype=torch.float32, batch_size=None, kind="short"):
        super().__init__(device, dtype, batch_size)
        self.kind, self.brightness = kind, rewards.BrightnessReward()

    def __call__(self, images, prompts, metadata=None):
        scores, details = self.brightness(images, prompts, metadata)
        if self.kind == "short":
            return scores[:-1], details
        if self.kind == "matrix":
            return scores[:, None], details
        if self.kind == "text":
            return [f"{s:.2f}" for s in scores.tolist()], details
        return scores


def _hang(marker):
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(marker + ".tmp", marker)
    while True:
        time.sleep(1)


def main():
    hang, marker, script, *args = sys.argv[1:]
    what, count = hang.split(":")
    count, calls = int(count), [0]
    import model
    if what == "rollout":
        original = model.rollout

        def rollout(*a, **k):
            calls[0] += 1
            if calls[0] == count:
                _hang(marker)
            return original(*a, **k)
        model.rollout = rollout
    elif what == "save":
        original = torch.save

        def save(*a, **k):
            calls[0] += 1
            if calls[0] == count:
                _hang(marker)
            return original(*a, **k)
        torch.save = save
    else:
        raise SystemExit(f"unknown hang point {hang!r}")
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
