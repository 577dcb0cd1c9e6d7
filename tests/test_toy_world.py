"""Every stage on the committed toy world (toy/base, toy/teachers, toy/prompts), shortened: the same presets
a user runs with no arguments, with fewer iterations and images so the whole file takes about a minute."""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as M
import rewards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["composition", "text", "quality"]


def _run(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    out = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_the_committed_toy_world_loads():
    pipe = M.load_pipeline(os.path.join(REPO, "toy", "base"), t5_length=12)
    assert pipe.latent_shape(32) == (12, 16, 16) and pipe.transformer.config["dual_attention_layers"] == [0, 1]
    for folder in TASKS + [f"grpo/{task}" for task in TASKS]:  # the NFT teachers, then the Flow-GRPO ones (toy/teachers/README.md)
        state, _ = M.read_adapter(os.path.join(REPO, "toy", "teachers", folder))
        assert any(B.abs().max() > 0 for _, B, _ in state.values())  # trained, not a fresh adapter
    for task, ext in zip(TASKS, ("jsonl", "txt", "txt")):
        for split in ("train", "test"):
            prompts, _ = rewards.load_prompts(os.path.join(REPO, "toy", "prompts", f"{task}_{split}.{ext}"))
            assert prompts


def test_teacher_stage(tmp_path):
    _run("train_teacher.py", f"--out_dir={tmp_path}", "--groups_per_iter=2", "--batch_size=16", "--iterations=1",
         "--steps_per_iter=1")
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert log[-1]["first_ratio_mean"] == 1.0 and 0 <= log[-1]["reward_mean"] <= 1
    _run("train_teacher.py", "--preset=toy_nft", f"--out_dir={tmp_path / 'nft'}", "--groups_per_iter=2", "--batch_size=8",
         "--iterations=1", "--nft_levels=1")
    log = [json.loads(line) for line in open(tmp_path / "nft" / "log.jsonl")]
    assert 0 <= log[-1]["reward_mean"] <= 1 and log[-1]["optimizer_step"] == 2
    assert log[-1]["old_decay"] == pytest.approx(M.nft_decay(2), abs=1e-9)  # the preset's schedule after 2 steps


def test_cold_start_stages(tmp_path):
    _run("cold_start.py", f"--out_dir={tmp_path / 'sft'}", f"--data_dir={tmp_path / 'data'}", "--samples_per_teacher=8",
         "--shard_size=8", "--sample_steps=4", "--steps=2", "--batch_size=8", "--save_every=2", "--grid_every=2")
    assert M.read_adapter(str(tmp_path / "sft"))[0]
    _run("cold_start.py", "--mode=merge", f"--out_dir={tmp_path / 'merge'}")
    merged, _ = M.read_adapter(str(tmp_path / "merge" / "adapter"))
    teachers = [M.read_adapter(os.path.join(REPO, "toy", "teachers", t))[0] for t in TASKS]
    w = torch.tensor([3.0, 1.0, 1.0]) / 5
    for module, delta in M.adapter_delta(merged).items():  # the exact merge: the 3:1:1 average of the deltas
        expected = sum(wk * M.adapter_delta({module: t[module]})[module] for wk, t in zip(w.double(), teachers))
        assert (delta - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("objective", ["pg", "grpo_mix", "nft_mix"])
def test_distill_stage(tmp_path, objective):
    out = _run("distill.py", f"--out_dir={tmp_path}", f"--objective={objective}", "--groups_per_iter=2", "--batch_size=16",
               "--iterations=1", "--supervise_k=1", "--eval_images=8", "--eval_steps=4",
               *(["--nft_levels=2"] if objective == "nft_mix" else []))
    assert "| composition (toy_composition_strict) | 8 |" in out  # the student next to its teachers, per task
    summary = json.load(open(tmp_path / "summary.json"))
    assert set(summary["student"]) == set(TASKS)
    student, base = summary["per_image"]["student"]["text"], summary["per_image"]["base"]["text"]
    assert len(student) == len(base) == 8 and summary["student"]["text"] == pytest.approx(sum(student) / 8)
    mean, ci, _ = M.mean_ci([s - b for s, b in zip(student, base)])  # the printed paired difference
    assert f"{mean:+.3f} ± {ci:.3f} |" in next(line for line in out.splitlines() if line.startswith("| text ("))
    tags = [m["tag"] for m in rewards.load_prompts(os.path.join(REPO, "toy", "prompts", "composition_test.jsonl"))[1][:8]]  # GenEval's overall row
    student, base = summary["per_image"]["student"]["composition"], summary["per_image"]["base"]["composition"]
    row = next(line for line in out.splitlines() if line.startswith("| composition (toy_composition_strict, GenEval overall) | 8 |"))
    assert "{:+.3f} ± {:.3f} |".format(*M.tag_mean_ci([s - b for s, b in zip(student, base)], tags)[:2]) in row
    if objective == "pg":  # each teacher on its own task only
        assert set(summary["teacher"]) == set(TASKS) and len(summary["per_image"]["teacher"]["quality"]) == 8


def test_evaluate_stage(tmp_path):
    _run("evaluate.py", f"--out_dir={tmp_path}", "--max_prompts=2", "--num_steps=4",
         "--models={'base': '', 'teacher_text': 'toy/teachers/text'}")
    results = json.load(open(tmp_path / "results.json"))
    assert os.path.isfile(tmp_path / "results.md") and os.path.isfile(tmp_path / "grid_toy_composition.png")
    assert set(results["results"]) == {"base", "teacher_text"}
