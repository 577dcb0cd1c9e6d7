"""The diagnostics that docs/toy_results.md quotes: their formulas against float64 references and identities."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import eval_paired  # noqa: E402
import toy_grad_snr  # noqa: E402
import toy_lowfreq_grpo  # noqa: E402


def test_paired_differences(tmp_path):
    """benchmarks/eval_paired.py: the mean per-image difference and its 95% CI on the images both models share
    (same prompt, image index and seed), against numpy in float64; a missing scores file is a one-line error."""
    rng = np.random.default_rng(0)
    base, other = rng.random(40), rng.random(40)
    for name, values, extra in (("base", base, 0), ("student", other, 1)):  # the student has one image more
        os.makedirs(tmp_path / name / "bench")
        rows = [{"prompt_index": i // 2, "image_index": i % 2, "seed": 1000 + i, "m": float(v)}
                for i, v in enumerate(list(values) + [5.0] * extra)]
        (tmp_path / name / "bench" / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "benchmarks/eval_paired.py", f"--base={tmp_path / 'base'}", "--benchmark=bench",
                          "--metric=m", str(tmp_path / "student")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    diff = other - base
    ci = 1.96 * diff.std(ddof=1) / math.sqrt(40)
    assert f"| student | {other.mean():.3f} | {base.mean():.3f} | {diff.mean():+.3f} ± {ci:.3f} | 40 |" in out.stdout
    load = lambda name: eval_paired.load(str(tmp_path / name), "bench", "m")
    m, b, d, c, n = eval_paired.paired(load("base"), load("student"))
    assert (m, b, d, c, n) == pytest.approx((other.mean(), base.mean(), diff.mean(), ci, 40), abs=1e-12)
    out = subprocess.run([sys.executable, "benchmarks/eval_paired.py", f"--base={tmp_path / 'base'}", "--benchmark=nope",
                          "--metric=m", str(tmp_path / "student")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: no ") and len(out.stderr.strip().splitlines()) == 1



def test_gradient_agreement():
    """toy_grad_snr.agreement: identical estimates (up to a 1e-9 jitter, so that the noise is not zero) have
    cosine 1; for g = mu + noise its SNR estimate centres on |mu|^2 / (D sigma^2) (Monte Carlo, float64); pure
    noise has cosine ~0."""
    mu = torch.linspace(-1, 1, 50, dtype=torch.float64)
    G = mu.repeat(4, 1) + 1e-9 * torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert toy_grad_snr.agreement(G)[0] == pytest.approx(1.0, abs=1e-12)
    g = torch.Generator().manual_seed(1)
    sigma, truth = 0.5, mu.pow(2).sum().item() / (50 * 0.25)
    estimates = [toy_grad_snr.agreement(mu + sigma * torch.randn(4, 50, dtype=torch.float64, generator=g))[1] for _ in range(4000)]
    # the ratio of unbiased numerator and denominator is biased a little (E[1/v] > 1/E[v]); with 150 degrees of
    # freedom in v the bias is ~1.4%: the mean lands within 3% of the truth, a sign or factor error far outside
    assert np.mean(estimates) == pytest.approx(truth, rel=0.03)
    cos = toy_grad_snr.agreement(sigma * torch.randn(6, 100000, dtype=torch.float64, generator=g))[0]
    assert abs(cos) < 0.02  # pure noise in many dimensions: no agreement


def test_low_pass_is_an_orthogonal_projection():
    """toy_lowfreq_grpo.low_pass on the toy latent (12, 16, 16), space-to-depth factor 2, 4x4 blocks: P P = P,
    <P x, y> = <x, P y>, trace 3 x 8 x 8 = 192 (the rank), and it keeps block-constant images unchanged."""
    g = torch.Generator().manual_seed(0)
    P = lambda x: toy_lowfreq_grpo.low_pass(x, 2, 4)
    x, y = torch.randn(2, 12, 16, 16, dtype=torch.float64, generator=g), torch.randn(2, 12, 16, 16, dtype=torch.float64, generator=g)
    assert torch.allclose(P(P(x)), P(x), atol=1e-12)
    assert (P(x) * y).sum().item() == pytest.approx((x * P(y)).sum().item(), abs=1e-9)
    basis = torch.eye(12 * 16 * 16, dtype=torch.float64).view(-1, 12, 16, 16)
    assert torch.einsum("bchw,bchw->", P(basis), basis).item() == pytest.approx(192, abs=1e-9)
    blocks = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    latent = torch.nn.functional.pixel_unshuffle(blocks, 2)
    assert torch.allclose(P(latent), latent, atol=1e-12)


def test_caption_color_reward():
    """toy_color_reward.CaptionColor: the soft share of the caption's first colour, exp(-d^2 / (2 40^2)) per pixel
    (float64 reference): 1 for a picture all in that colour, the Gaussian of the distance for another colour."""
    import toy_color_reward
    import toyworld
    reward = toy_color_reward.CaptionColor()
    red, blue = toyworld.PALETTE["red"], toyworld.PALETTE["blue"]
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    images[0] = torch.tensor(red, dtype=torch.uint8)[:, None, None]
    images[1, :, :, :4] = torch.tensor(red, dtype=torch.uint8)[:, None, None]
    images[1, :, :, 4:] = torch.tensor(blue, dtype=torch.uint8)[:, None, None]
    scores, _ = reward(images, ["a photo of a red circle", "a photo of a red square and a blue circle"])
    d2 = sum((a - b) ** 2 for a, b in zip(red, blue))
    assert scores.tolist() == pytest.approx([1.0, 0.5 + 0.5 * math.exp(-d2 / 3200)], abs=1e-6)


def _caption_colors_reference(image, named):
    """CaptionColors in float64 loops: named = {colour: count}."""
    import toyworld
    h, w, _ = image.shape
    share = {c: 0.0 for c in toyworld.COLORS}
    clean = 0.0
    for y in range(h):
        for x in range(w):
            px = image[y, x].astype(np.float64)
            on = math.exp(-sum((px - toyworld.BACKGROUND) ** 2) / 1800)
            for c, rgb in toyworld.PALETTE.items():
                g = math.exp(-sum((px - np.array(rgb, np.float64)) ** 2) / 1800)
                share[c] += g / (h * w)
                on += g
            clean += min(on, 1.0) / (h * w)
    coverage = [min(1.0, share[c] / (0.04 * n)) * min(1.0, 0.2 * n / share[c]) for c, n in named.items()]
    purity = sum(share[c] for c in named) / sum(share.values())
    return float(np.mean(coverage)) * purity * clean ** 2


def test_caption_colors_reward():
    """toy_color_reward.CaptionColors against float64 loops, and its identities: a clean picture with each named
    colour at 10% of the area scores ~1, one named colour missing halves it, a tinted background lowers it."""
    import toy_color_reward
    import toyworld
    reward = toy_color_reward.CaptionColors()
    prompt = "a photo of a red square and a blue circle"
    image = np.empty((10, 10, 3), np.uint8)
    image[:] = toyworld.BACKGROUND
    image[0, :] = toyworld.PALETTE["red"]
    image[9, :] = toyworld.PALETTE["blue"]
    missing = image.copy()
    missing[9, :] = toyworld.BACKGROUND
    tinted = image.copy()
    tinted[1:9] = (200, 235, 200)
    noisy = np.random.default_rng(0).integers(0, 256, (10, 10, 3)).astype(np.uint8)
    batch = np.stack([image, missing, tinted, noisy])
    scores, _ = reward(torch.from_numpy(batch).permute(0, 3, 1, 2), [prompt] * 4)
    expected = [_caption_colors_reference(im, {"red": 1, "blue": 1}) for im in batch]
    assert scores.tolist() == pytest.approx(expected, abs=1e-5)
    assert scores[0] == pytest.approx(1.0, abs=1e-3)
    assert scores[1] == pytest.approx(0.5, abs=1e-3)
    assert scores[2] < 0.5 * scores[0]


def test_pass_at_k():
    """toy_room.pass_at_k, 1 - C(n - c, k) / C(n, k): for n = 6, every c and k, the share of all k-subsets of the n
    samples (c of them correct) that hold a correct one, exact; pass@1 = c / n, pass@n = 1[c > 0]; Codex's float64
    product form at n = 200; k > n raises. toy_room.room: a score of 1.0 is correct (text accuracy 0.67 is not),
    the stds are within-prompt with n - 1, float64."""
    import itertools
    from fractions import Fraction
    import toy_room
    n = 6
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            assert toy_room.pass_at_k(n, c, k) == float(Fraction(sum(any(s) for s in subsets), len(subsets)))
        assert toy_room.pass_at_k(n, c, 1) == c / n
        assert toy_room.pass_at_k(n, c, n) == float(c > 0)
    product = 1 - np.prod(1 - 32 / np.arange(200 - 3 + 1, 201, dtype=np.float64))
    assert toy_room.pass_at_k(200, 3, 32) == pytest.approx(product, rel=1e-12)
    for bad in ((6, 2, 7), (6, 7, 2), (6, 2, 0)):
        with pytest.raises(ValueError):
            toy_room.pass_at_k(*bad)
    strict = np.array([[1.0, 0.0, 0.0, 1.0], [2 / 3, 2 / 3, 1.0, 0.0]])
    dense = np.array([[0.9, 0.1, 0.2, 0.8], [0.5, 0.6, 0.7, 0.0]])
    values = toy_room.room(np.stack([strict, dense], -1), [2, 4])
    correct = (strict == 1.0).astype(np.float64)
    expected = [correct.mean(), (5 / 6 + 1 / 2) / 2, 1.0, dense.std(1, ddof=1).mean(), correct.std(1, ddof=1).mean()]
    assert values == pytest.approx(expected, abs=1e-12)
