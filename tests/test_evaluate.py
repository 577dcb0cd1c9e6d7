"""evaluate.py end to end on a tiny pipeline with the toy rewards: the outputs, 1 rank = 2 ranks, resuming,
the GenEval aggregation and its CI on hand-made per-image results, and the one-line errors."""
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, ranks=1, env=None):
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    return subprocess.run(launcher + ["evaluate.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def ok(args, **kw):
    out = run(args, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pixel-space pipeline (32x32 RGB images, so the toy rewards apply), two random adapters, two small
    benchmarks: 12 GenEval-style rows (+2 duplicated rows that must count once) x 2 images, 5 text prompts."""
    tmp = tmp_path_factory.mktemp("evaluate")
    base = M.build_tiny_pipeline(str(tmp / "tiny"), codec="pixel", pixel_factor=2, sample_size=16, patch_size=2,
                                 words=toyworld.VOCAB_WORDS, clip_length=16, num_layers=2)
    pipe = M.load_pipeline(base, "cpu", torch.float32, t5_length=12)
    for i, name in enumerate(["a", "b"]):
        M.add_adapter(pipe.transformer, name, 4, 4.0, seed=i)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():  # B = 0 would make the adapters no-ops
            for p in pipe.transformer.adapter_parameters(name):
                if p.dim() == 3:
                    p.normal_(0, 0.3, generator=g)
        M.save_adapter(pipe.transformer, name, str(tmp / f"adapter_{name}"))
    rows = open(os.path.join(ROOT, "toy/prompts/composition_test.jsonl")).read().splitlines()[:12]
    (tmp / "comp.jsonl").write_text("\n".join(rows + rows[:2]) + "\n")
    (tmp / "text.txt").write_text("\n".join(open(os.path.join(ROOT, "toy/prompts/text_test.txt")).read().splitlines()[:5]) + "\n")
    benchmarks = {"comp": {"prompts": str(tmp / "comp.jsonl"), "rewards": ["toy_composition_strict", "brightness"],
                           "images_per_prompt": 2, "aggregate": "geneval"},
                  "text": {"prompts": str(tmp / "text.txt"), "rewards": ["toy_text_accuracy", "brightness"]}}
    # brightness (the mean pixel) moves with every pixel: equal numbers mean equal images, not two zeros
    args = [f"--model={base}", f"--models={{'base': '', 'a': '{tmp / 'adapter_a'}', 'b': '{tmp / 'adapter_b'}'}}",
            f"--benchmarks={benchmarks!r}", "--num_steps=2", "--batch_size=5", "--grid_prompts=4"]
    return dict(tmp=tmp, args=args, base=base)


@pytest.fixture(scope="module")
def single(world):
    out_dir = world["tmp"] / "one"
    ok(world["args"] + [f"--out_dir={out_dir}"])
    return out_dir


def pngs(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
                  if f.endswith(".png") and not f.startswith("grid_"))


def test_end_to_end(single):
    results = json.load(open(single / "results.json"))
    assert list(results["results"]) == ["base", "a", "b"]
    expected_n = {"comp": 12 * 2, "text": 5}  # the duplicated rows are one prompt each
    for name, per_model in results["results"].items():
        for bench, metrics in per_model.items():
            for metric, m in metrics.items():
                assert m["n"] == expected_n[bench] and math.isfinite(m["value"]) and math.isfinite(m["ci95"]) and m["ci95"] >= 0
            if bench == "comp":
                per_tag = metrics["brightness"]["per_tag"]
                assert sum(t["n"] for t in per_tag.values()) == 24
                assert metrics["brightness"]["value"] == pytest.approx(np.mean([t["value"] for t in per_tag.values()]))
    assert results["benchmarks"]["comp"]["num_prompts"] == 12
    assert results["run"]["generated"] == 3 * 29 and results["run"]["reused"] == 0
    # the models differ (the adapters act), so the table is not trivially equal
    assert len({results["results"][m]["comp"]["brightness"]["value"] for m in ("base", "a", "b")}) == 3
    files = pngs(single)
    assert len(files) == 3 * 29 and "a/comp/00011_01.png" in files and "b/text/00004_00.png" in files
    assert Image.open(single / "a/comp/00011_01.png").size == (32, 32)
    scores = [json.loads(line) for line in open(single / "base/comp/scores.jsonl")]
    assert len(scores) == 24 and {"prompt_index", "image_index", "seed", "tag", "brightness", "toy_composition_strict"} <= set(scores[0])
    table = open(single / "results.md").read()
    assert "| base |" in table and "| b |" in table and "±" in table and "(n=24)" in table and "40 steps" not in table
    assert "2 steps, CFG 4.5" in table and "mean of the per-tag accuracies" in table
    for bench in ("comp", "text"):
        grid = Image.open(single / f"grid_{bench}.png")
        assert grid.width > 3 * 128 and grid.height > 4 * 128  # 3 model columns x 4 prompt rows, 128 px cells


def test_two_ranks_equal_one(world, single):
    out_dir = world["tmp"] / "two"
    ok(world["args"] + [f"--out_dir={out_dir}"], ranks=2)
    one, two = json.load(open(single / "results.json")), json.load(open(out_dir / "results.json"))
    assert two["run"]["world_size"] == 2 and two["results"] == one["results"]  # exactly, not approximately
    assert open(out_dir / "a/comp/scores.jsonl").read() == open(single / "a/comp/scores.jsonl").read()


def test_resume_reuses_images(world, single):
    out_dir = world["tmp"] / "resume"
    shutil.copytree(single, out_dir)
    before = {f: os.stat(out_dir / f).st_mtime_ns for f in pngs(out_dir)}
    out = ok(world["args"] + [f"--out_dir={out_dir}"])
    assert "0 images generated, 87 reused" in out.stdout
    assert {f: os.stat(out_dir / f).st_mtime_ns for f in pngs(out_dir)} == before
    first = json.load(open(single / "results.json"))["results"]
    assert json.load(open(out_dir / "results.json"))["results"] == first
    # one lost image: its whole batch runs again (same composition, so the same pixels); only that file is written
    os.remove(out_dir / "a/comp/00003_01.png")
    out = ok(world["args"] + [f"--out_dir={out_dir}"])
    assert "1 images generated, 86 reused" in out.stdout
    assert json.load(open(out_dir / "results.json"))["results"] == first
    # images made with another sampler setting are never mixed in
    out = run(world["args"] + [f"--out_dir={out_dir}", "--num_steps=3"])
    assert out.returncode != 0 and "num_steps: 2 there, 3 now" in out.stderr and "Traceback" not in out.stderr


FAKE_REWARDS = '''
import torch
from rewards import Reward, RewardWeightsUnavailable

class Lookup(Reward):
    """The hand-made per-image result stored in each prompt's metadata row."""
    def __call__(self, images, prompts, metadata=None):
        return torch.tensor([float(m["result"]) for m in metadata]), {"echo": [m["result"] for m in metadata]}

class Unavailable(Reward):
    def _load(self):
        raise RewardWeightsUnavailable("the test reward's weights are nowhere")
'''
HAND_MADE = {"single_object": [1, 1, 1, 0], "two_object": [1, 0], "counting": [0, 0, 0], "colors": [1],
             "position": [1, 1, 0, 0, 1], "color_attr": [1, 0, 1, 0, 1, 0]}


def test_geneval_aggregation_and_ci(world):
    tmp = world["tmp"]
    (tmp / "fake_rewards.py").write_text(FAKE_REWARDS)
    rows = [{"tag": tag, "prompt": f"a photo of a circle number {tag} {i}", "result": r}
            for tag, results in HAND_MADE.items() for i, r in enumerate(results)]
    (tmp / "hand.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = lambda aggregate: {"prompts": str(tmp / "hand.jsonl"), "aggregate": aggregate,
                               "rewards": ["fake_rewards:Lookup", "fake_rewards:Unavailable"]}
    benchmarks = {"ge": bench("geneval"), "flat": bench("mean")}
    out = ok([f"--model={world['base']}", "--models={'base': ''}", "--num_steps=1", f"--benchmarks={benchmarks!r}",
              "--skip_unavailable=True", f"--out_dir={tmp / 'hand'}"], env={"PYTHONPATH": str(tmp)})
    assert "warning: reward 'fake_rewards:Unavailable' skipped" in out.stdout
    results = json.load(open(tmp / "hand/results.json"))
    assert results["benchmarks"]["ge"]["skipped_rewards"] == ["fake_rewards:Unavailable"]
    ge = results["results"]["base"]["ge"]["fake_rewards:Lookup"]
    assert list(results["results"]["base"]["ge"]) == ["fake_rewards:Lookup"]
    # per tag: accuracy and 1.96 sqrt(s^2 / n) with the sample variance s^2 (none for a single image)
    expected = {"single_object": (0.75, 0.0625), "two_object": (0.5, 0.25), "counting": (0.0, 0.0), "colors": (1.0, 0.0),
                "position": (0.6, 0.06), "color_attr": (0.5, 0.05)}  # (mean, var of the mean)
    assert list(ge["per_tag"]) == list(expected)  # GenEval's tag order
    for tag, (mean, var) in expected.items():
        assert ge["per_tag"][tag]["n"] == len(HAND_MADE[tag])
        assert ge["per_tag"][tag]["value"] == pytest.approx(mean, abs=1e-12)
        assert ge["per_tag"][tag]["ci95"] == pytest.approx(1.96 * math.sqrt(var), abs=1e-12)
    # overall: the unweighted mean of the six tags (not the 11/21 image mean); var = sum var_t / 36 = 0.4225 / 36
    assert ge["value"] == pytest.approx(3.35 / 6, abs=1e-12) and ge["image_mean"] == pytest.approx(11 / 21, abs=1e-12)
    assert ge["ci95"] == pytest.approx(1.96 * 0.65 / 6, abs=1e-12) and ge["n"] == 21
    flat = results["results"]["base"]["flat"]["fake_rewards:Lookup"]
    s2 = (11 * (1 - 11 / 21) ** 2 + 10 * (11 / 21) ** 2) / 20
    assert flat["value"] == pytest.approx(11 / 21, abs=1e-12) and flat["ci95"] == pytest.approx(1.96 * math.sqrt(s2 / 21), abs=1e-12)
    assert "per_tag" not in flat
    table = open(tmp / "hand/results.md").read()
    assert f"| base | 0.558 ± 0.212 | {flat['value']:.3f} ± {flat['ci95']:.3f} |" in table and "Not scored (weights unavailable)" in table
    row = json.loads(open(tmp / "hand/base/ge/scores.jsonl").readline())
    assert row["fake_rewards:Lookup/echo"] == row["fake_rewards:Lookup"] == 1


@pytest.mark.parametrize("args,message", [
    (["--select=toy_composition,nope"], "unknown benchmark 'nope'"),
    (["--benchmarks={'x': {'prompts': 'data/nope.jsonl', 'rewards': ['toy_composition']}}"],
     "benchmark 'x': prompt file data/nope.jsonl not found (the benchmark prompt sets are not in the repository"),
    (["--benchmarks={'x': {'prompts': 'toy/prompts/text_test.txt', 'rewards': ['fake_rewards:Unavailable']}}"],
     "the test reward's weights are nowhere (or pass --skip_unavailable=True"),
    (["--benchmarks={'x': {'prompts': 'toy/prompts/text_test.txt', 'rewards': ['no_such_reward']}}"], "unknown reward 'no_such_reward'"),
])
def test_errors_are_one_line(world, args, message):
    (world["tmp"] / "fake_rewards.py").write_text(FAKE_REWARDS)
    out = run(args + ["--models={'base': ''}"], env={"PYTHONPATH": str(world["tmp"])})
    assert out.returncode != 0 and out.stderr.strip().startswith("error: ") and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_missing_adapter(world):
    out = run([f"--model={world['base']}", "--models={'ghost': '/nonexistent/adapter'}", f"--out_dir={world['tmp'] / 'ghost'}",
               "--select=text"] + world["args"][2:3])
    assert out.returncode != 0 and "error: model 'ghost': adapter '/nonexistent/adapter' not found" in out.stderr
    assert "Traceback" not in out.stderr
