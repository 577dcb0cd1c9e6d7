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
    r = eval_paired.paired(load("base"), load("student"))
    assert (r["mean"], r["base"], r["diff"], r["ci"], r["n"]) == pytest.approx((other.mean(), base.mean(), diff.mean(), ci, 40), abs=1e-12)
    assert "tag_diff" not in r and "GenEval" not in out.stdout  # untagged rows: no GenEval overall
    out = subprocess.run([sys.executable, "benchmarks/eval_paired.py", f"--base={tmp_path / 'base'}", "--benchmark=nope",
                          "--metric=m", str(tmp_path / "student")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and out.stderr.strip().startswith("error: no ") and len(out.stderr.strip().splitlines()) == 1



def test_paired_geneval_overall(tmp_path):
    """eval_paired on tagged rows: GenEval's overall (the mean of the per-tag means) of each model and of the
    paired differences, var = sum_t var_t / T^2, against numpy in float64; --per_tag prints each tag's."""
    rng = np.random.default_rng(1)
    tags = ["counting"] * 6 + ["color_attr"] * 30
    base, other = (rng.random(36) < 0.3).astype(float), (rng.random(36) < 0.5).astype(float)
    for name, values in (("base", base), ("teacher", other)):
        os.makedirs(tmp_path / name / "bench")
        rows = [{"prompt_index": i, "image_index": 0, "seed": i, "tag": t, "m": float(v)} for i, (v, t) in enumerate(zip(values, tags))]
        (tmp_path / name / "bench" / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = subprocess.run([sys.executable, "benchmarks/eval_paired.py", f"--base={tmp_path / 'base'}", "--benchmark=bench",
                          "--metric=m", "--per_tag", str(tmp_path / "teacher")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    d = other - base
    parts = [d[:6], d[6:]]
    overall = (parts[0].mean() + parts[1].mean()) / 2
    ci = 1.96 * math.sqrt(sum(p.var(ddof=1) / len(p) for p in parts)) / 2
    tag_mean = lambda v: (v[:6].mean() + v[6:].mean()) / 2
    assert f"| {tag_mean(other):.3f} | {tag_mean(base):.3f} | {overall:+.3f} ± {ci:.3f} |" in out.stdout
    assert f"{parts[0].mean():+.3f} ± {1.96 * parts[0].std(ddof=1) / math.sqrt(6):.3f}" in out.stdout
    assert abs(overall - d.mean()) > 1e-3  # the two numbers differ: the check above is not the image mean
    r = eval_paired.paired(eval_paired.load(str(tmp_path / "base"), "bench", "m"), eval_paired.load(str(tmp_path / "teacher"), "bench", "m"))
    assert (r["tag_diff"], r["tag_ci"]) == pytest.approx((overall, ci), abs=1e-12)

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


def test_toy_world_paired_report(tmp_path, monkeypatch):
    """benchmarks/toy_world.paired_report, the table docs/toy_results.md quotes: per metric, the best single teacher
    is the one with the highest mean, and every model's row holds its mean and the per-image paired differences
    to the base and to that teacher (numpy, float64); on the tagged (composition) benchmark also GenEval's overall,
    the mean of the per-tag means, its best teacher picked on it."""
    import toy_world
    rng = np.random.default_rng(1)
    tag = lambda task, i: ("counting" if i < 4 else "color_attr") if task == "composition" else None
    models = ["base", "teacher_composition", "teacher_text", "teacher_quality", "student"]
    values = {}
    for task, (benchmark, metrics) in toy_world.METRICS.items():
        for m in models:
            offset = 0.3 if m == f"teacher_{task}" else 0.0  # each task's own teacher is its best
            values[task, m] = {metric: rng.random(12) + offset + 0.01 * k for k, metric in enumerate(metrics)}
            os.makedirs(tmp_path / "eval" / m / benchmark)
            rows = [{"prompt_index": i, "image_index": 0, "seed": i, **({"tag": tag(task, i)} if tag(task, i) else {}),
                     **{metric: float(values[task, m][metric][i]) for metric in metrics}} for i in range(12)]
            (tmp_path / "eval" / m / benchmark / "scores.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(toy_world, "OUT", str(tmp_path))
    monkeypatch.setattr(toy_world, "MODELS", {m: "" for m in models})
    table = toy_world.paired_report().splitlines()
    assert open(tmp_path / "paired.md").read().splitlines() == table
    composition_metrics = len(toy_world.METRICS["composition"][1])
    assert len(table) == 2 + (sum(len(metrics) for _, metrics in toy_world.METRICS.values()) + composition_metrics) * len(models)
    ci = lambda d: 1.96 * d.std(ddof=1) / math.sqrt(len(d))
    for task, (_, metrics) in toy_world.METRICS.items():
        best = f"teacher_{task}"
        for metric in metrics:
            s, b, t = values[task, "student"][metric], values[task, "base"][metric], values[task, best][metric]
            row = (f"| student | {metric} | 12 | {s.mean():.3f} | {(s - b).mean():+.3f} ± {ci(s - b):.3f} | {best} | "
                   f"{(s - t).mean():+.3f} ± {ci(s - t):.3f} |")
            assert row in table
            assert f"| {best} | {metric} | 12 | {t.mean():.3f} | {(t - b).mean():+.3f} ± {ci(t - b):.3f} | {best} |  |" in table
            assert f"| base | {metric} | 12 | {b.mean():.3f} |  | {best} |" in "\n".join(table)
    tag_mean = lambda v: (v[:4].mean() + v[4:].mean()) / 2
    tag_ci = lambda d: 1.96 * math.sqrt(d[:4].var(ddof=1) / 4 + d[4:].var(ddof=1) / 8) / 2
    metric = toy_world.METRICS["composition"][1][0]
    s, b, t = (values["composition", m][metric] for m in ("student", "base", "teacher_composition"))
    assert (f"| student | {metric} (GenEval overall) | 12 | {tag_mean(s):.3f} | {tag_mean(s - b):+.3f} ± {tag_ci(s - b):.3f} | "
            f"teacher_composition | {tag_mean(s - t):+.3f} ± {tag_ci(s - t):.3f} |") in table


def test_toy_world_training_report(tmp_path, monkeypatch):
    """benchmarks/toy_world.training_report: per run and task, the means of the first and the last 5 iterations
    of the logged reward and KLs (a resume line in the log is not an iteration; a key a run does not log is blank)."""
    import toy_world
    rng = np.random.default_rng(2)
    values = rng.random((12, 3))
    os.makedirs(tmp_path / "run")
    lines = [{"iteration": i + 1, "loss": 0.0, "composition/reward": values[i, 0], "composition/kl_teacher": values[i, 1],
              "text/reward": values[i, 2]} for i in range(12)]
    lines.insert(6, {"iteration": 6, "resumed_from": "step_6", "changed": {}})
    (tmp_path / "run" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    monkeypatch.setattr(toy_world, "OUT", str(tmp_path))
    table = toy_world.training_report(["run"]).splitlines()
    cell = lambda v: f"{v[:5].mean():.4f} -> {v[-5:].mean():.4f}"
    assert f"| run | composition | {cell(values[:, 0])} | {cell(values[:, 1])} |  |" in table
    assert f"| run | text | {cell(values[:, 2])} |  |  |" in table and "| run | quality |  |  |  |" in table
    assert open(tmp_path / "training.md").read().splitlines() == table
