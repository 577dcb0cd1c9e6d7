"""
A diagnostic reward for docs/toy_results.md ("Recalibrating the teachers"): prompt-aware but low-frequency.

  PYTHONPATH=benchmarks python train_teacher.py --reward=toy_color_reward:CaptionColor \
      --prompts=runs/toy/cal2/colors_train.jsonl --out_dir=runs/toy/cal2/color

The share of the picture in the caption's first colour, softly (each pixel counts exp(-d^2 / (2 * 40^2)) by
its RGB distance d to that palette colour). Like brightness it asks for a change of the picture as a whole,
but which change depends on the caption: if GRPO climbs this and not the task rewards, what blocks the task
teachers is the fine structure their rewards read (shapes, counts, glyphs), not that they are prompt-specific.
"""
import numpy as np
import torch

import rewards
import toyworld


class CaptionColor(rewards.Reward):
    def __call__(self, images, prompts, metadata=None):
        pixels = rewards.to_uint8(images).permute(0, 2, 3, 1).numpy().astype(np.float64)
        scores = []
        for image, prompt, meta in zip(pixels, prompts, metadata or [None] * len(prompts)):
            meta = meta or toyworld.parse_prompt(prompt)
            color = np.array(toyworld.PALETTE[next(c["color"] for c in meta["include"] if "color" in c)], np.float64)
            d2 = ((image - color) ** 2).sum(-1)
            scores.append(np.exp(-d2 / (2 * 40.0 ** 2)).mean())
        return torch.tensor(scores, dtype=torch.float32), {}
