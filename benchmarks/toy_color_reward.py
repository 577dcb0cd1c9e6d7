"""
Two diagnostic rewards for docs/toy_results.md: prompt-aware but low-frequency.

  PYTHONPATH=benchmarks python train_teacher.py --reward=toy_color_reward:CaptionColor \
      --prompts=runs/toy/cal2/colors_train.jsonl --out_dir=runs/toy/cal2/color
  PYTHONPATH=benchmarks python train_teacher.py --reward=toy_color_reward:CaptionColors \
      --prompts=runs/toy/cal3/colorattr_train.jsonl --out_dir=runs/toy/cal3/colors

CaptionColor ("Recalibrating the teachers"): the share of the picture in the caption's first colour, softly
(each pixel counts exp(-d^2 / (2 * 40^2)) by its RGB distance d to that palette colour). Like brightness it
asks for a change of the picture as a whole, but which change depends on the caption: if GRPO climbs this and
not the task rewards, what blocks the task teachers is the fine structure their rewards read (shapes, counts,
glyphs), not that they are prompt-specific.

CaptionColors ("Where the outcome is decided"): the same idea with the whole-picture tint taken away: every
named colour's share must lie in a plausible range for its count, other colours and off-palette pixels cost.
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


class CaptionColors(rewards.Reward):
    """Every colour the caption names, softly and saturating: per named colour (count n) its soft share
    (sigma 30 in RGB) scored by a ramp that is 1 between n * 4% and n * 20% of the picture; times the share
    of the ink in named colours (purity), times the share of pixels that are exactly the background or a
    palette colour, squared (a tinted or noisy background scores low). Low-frequency and caption-dependent
    like CaptionColor, but with no gain from tinting the picture."""
    def __call__(self, images, prompts, metadata=None):
        pixels = rewards.to_uint8(images).permute(0, 2, 3, 1).numpy().astype(np.float64)
        palette = np.array(list(toyworld.PALETTE.values()), np.float64)
        background = np.array(toyworld.BACKGROUND, np.float64)
        scores = []
        for image, prompt, meta in zip(pixels, prompts, metadata or [None] * len(prompts)):
            meta = meta or toyworld.parse_prompt(prompt)
            w = np.exp(-((image[..., None, :] - palette) ** 2).sum(-1) / (2 * 30.0 ** 2))  # (H, W, K)
            w_bg = np.exp(-((image - background) ** 2).sum(-1) / (2 * 30.0 ** 2))
            share = w.mean(axis=(0, 1))
            named = {}
            for clause in meta["include"]:
                if "color" in clause:
                    named[clause["color"]] = named.get(clause["color"], 0) + clause["count"]
            own = {c: share[toyworld.COLORS.index(c)] for c in named}
            coverage = [min(1.0, own[c] / (0.04 * n)) * min(1.0, 0.2 * n / max(own[c], 1e-9)) for c, n in named.items()]
            ink = share.sum()
            purity = sum(own.values()) / ink if ink > 1e-9 else 0.0
            clean = np.clip(w_bg + w.sum(-1), 0, 1).mean()
            scores.append(float(np.mean(coverage)) * purity * clean ** 2 if named else 0.0)
        return torch.tensor(scores, dtype=torch.float32), {}
