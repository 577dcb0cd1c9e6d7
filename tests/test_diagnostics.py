"""The diagnostics that docs/toy_results.md quotes: their formulas against float64 references and identities."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import eval_paired  # noqa: E402


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
