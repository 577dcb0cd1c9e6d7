"""train_teacher.py end to end on a tiny pixel-space pipeline: the first-step ratio, 2-rank torchrun against
one process, kill-and-resume against an uninterrupted run, bad input, and the output files. (The GRPO loss
against float64, the advantages by hand and the transition KL are tested in test_model.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
TIMING = ("images_per_s", "seconds_sampling", "seconds_reward", "seconds_training")
# 4 prompts x 2 images, sampled and trained in batches of 2: 4 batches per iteration, 2 optimizer steps of
# 2 batches each, so the second step's batches are scored by an already-updated policy.
CONFIG = dict(reward="brightness", resolution=16, t5_length=8, group_size=2, groups_per_iter=4, batch_size=2,
              optimizer_steps_per_iter=2, num_steps=4, iterations=4, save_every=1, keep=10, grid_every=100,
              lora_rank=4, lora_alpha=4.0, lr=3e-3, ema=True, ema_every=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    M.build_tiny_pipeline(str(root / "tiny"), num_layers=2, codec="pixel", pixel_factor=2, sample_size=8)
    (root / "prompts.txt").write_text("a red circle\ntwo blue squares\na green triangle above a square\n\nthe word cat\n")
    return root


def _args(world, out, **over):
    args = dict(CONFIG, model=str(world / "tiny"), prompts=str(world / "prompts.txt"), out_dir=str(out))
    args.update(over)
    return [f"--{k}={v}" for k, v in args.items()]


def _run(args, ranks=1, check=True):
    launcher = [sys.executable] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
    out = subprocess.run(launcher + ["train_teacher.py"] + args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return out


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _adapter(folder):
    state, _ = M.read_adapter(str(folder))
    return state


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The uninterrupted single-process run every other run is compared with (a checkpoint per iteration)."""
    out = tmp_path_factory.mktemp("reference")
    _run(_args(world, out))
    return out


def test_first_inner_step_ratio_is_exactly_one(reference):
    log = _log(reference)
    assert [r["iteration"] for r in log] == [1, 2, 3, 4]
    for record in log:
        # the first batch of each iteration is re-scored before any optimizer step: bitwise the sampling policy
        assert record["first_ratio_mean"] == 1.0 and record["first_ratio_max"] == 1.0
        # the second optimizer step's batches see the first step's update: the ratio does move off 1
        assert record["ratio_max"] > 1.0 or record["ratio_min"] < 1.0
        assert record["optimizer_step"] == 2 * record["iteration"] and record["skipped"] == 0


def test_output_adapter_is_peft_and_ema_is_written(world, reference):
    final = M.latest_checkpoint(str(reference))
    assert final.endswith("step_000004")
    files = sorted(os.listdir(os.path.join(final, "adapter")))
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.load(open(os.path.join(final, "adapter", "adapter_config.json")))
    assert config["r"] == 4 and config["lora_alpha"] == 4.0 and config["base_model_name_or_path"] == str(world / "tiny")
    adapter = _adapter(final)  # M.read_adapter: the peft files, official module names
    model = M.load_transformer(str(world / "tiny" / "transformer"))
    targets = [k for k in M.official_modules(model) if M._matches(k, M.DEFAULT_LORA_TARGETS)]
    assert sorted(adapter) == sorted(targets)
    assert all(A.shape[0] == 4 and scale == 1.0 for A, _, scale in adapter.values())
    assert max(B.abs().max().item() for _, B, _ in adapter.values()) > 0  # trained: B starts at zero
    M.set_adapter_state(model, "policy", adapter)  # fits the network it was trained on
    ema = _adapter(os.path.join(final, "ema"))
    assert ema.keys() == adapter.keys() and not _same(ema, adapter)


def test_two_ranks_equal_one_rank(world, reference, tmp_path):
    """One full iteration (2 optimizer steps) under torchrun (gloo, FSDP2): each rank samples and trains one
    of every two batches; gradients are averaged over ranks. Same samples, same batches, so the adapter
    equals the single-process one up to the order of float reductions, which Adam's normalisation amplifies
    where a gradient is near 0. Tolerance, of the update W1 - W0 (A and B separately): 1e-5 in Frobenius
    norm over all layers, 1e-4 of the largest update elementwise (measured: 3e-6 and 4e-5)."""
    _run(_args(world, tmp_path, iterations=1), ranks=2)
    one, two = _adapter(os.path.join(reference, "step_000001")), _adapter(os.path.join(tmp_path, "step_000001"))
    model = M.load_transformer(str(world / "tiny" / "transformer"))
    M.add_adapter(model, "init", rank=4, alpha=4.0, seed=0)  # the script's initial adapter (seed 0)
    init = M.adapter_state(model, "init")
    assert one.keys() == two.keys() == init.keys()
    for i in (0, 1):  # A and B
        update = torch.cat([(one[k][i] - init[k][i]).flatten() for k in one])
        diff = torch.cat([(one[k][i] - two[k][i]).flatten() for k in one])
        assert update.abs().max() > 1e-4  # both really trained
        assert diff.norm() <= 1e-5 * update.norm() and diff.abs().max() <= 1e-4 * update.abs().max(), (i, diff.abs().max())
    a, b = _log(reference)[0], _log(tmp_path)[0]
    assert abs(a["reward_mean"] - b["reward_mean"]) <= 1e-6 and b["first_ratio_mean"] == b["first_ratio_max"] == 1.0


def _checkpoint_is_complete(folder):
    assert sorted(os.listdir(folder)) == ["adapter", "config.json", "ema", "trainer_state.pt"]
    _adapter(os.path.join(folder, "adapter")), _adapter(os.path.join(folder, "ema"))
    json.load(open(os.path.join(folder, "config.json")))
    return torch.load(os.path.join(folder, "trainer_state.pt"), weights_only=True)


def _run_until_killed(args, hang_at, marker):
    """Start the run with a reward that blocks on call `hang_at`, wait for it there, SIGKILL it."""
    args = args + ["--reward=tests.helpers:HangReward", f"--reward_kwargs={{'hang_at': {hang_at}, 'marker': '{marker}'}}"]
    proc = subprocess.Popen([sys.executable, "train_teacher.py"] + args, cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]  # killed at the hang, not finished or crashed
    os.remove(marker)


def test_kill_and_resume_equals_uninterrupted(world, reference, tmp_path):
    """Killed twice (SIGKILL, the run is given no chance to clean up), resumed with --resume=True each time:
    the final adapter, EMA and log equal the uninterrupted run's. 4 reward calls per iteration."""
    out, marker = tmp_path / "run", str(tmp_path / "hung")
    args = _args(world, out, save_every=2)
    # killed in iteration 2, before the first checkpoint: nothing to resume from, the run starts over
    _run_until_killed(args, hang_at=7, marker=marker)
    assert M.latest_checkpoint(str(out)) is None and len(_log(out)) == 1
    # killed in iteration 4, after the checkpoint of iteration 2 and the log line of iteration 3
    _run_until_killed(args + ["--resume=True"], hang_at=13, marker=marker)
    latest = M.latest_checkpoint(str(out))
    assert latest.endswith("step_000002") and [r["iteration"] for r in _log(out)] == [1, 2, 3]
    assert _checkpoint_is_complete(latest)["iteration"] == 2
    assert not [d for d in os.listdir(out) if d.startswith("step_") and ".tmp" in d]  # no half-written save left
    _run(args + ["--resume=True"])
    final = M.latest_checkpoint(str(out))
    assert final.endswith("step_000004")
    assert _same(_adapter(final), _adapter(os.path.join(reference, "step_000004")))
    assert _same(_adapter(os.path.join(final, "ema")), _adapter(os.path.join(reference, "step_000004", "ema")))
    strip = lambda log: [{k: v for k, v in r.items() if k not in TIMING} for r in log if "resumed_from" not in r]  # reward changed
    assert strip(_log(out)) == strip(_log(reference))  # iteration 3's line from before the kill is not repeated


def test_nonfinite_rewards_skip_the_iteration(world, reference, tmp_path):
    """NaN and inf scores in iteration 2, a reward that raises FloatingPointError in iteration 4 (the last):
    each iteration skipped with a warning and counted, no optimizer step, checkpoints still on schedule."""
    bad = {5: "nan", 6: "inf", 15: "raise"}  # reward calls 4k+1 .. 4k+4 belong to iteration k + 1
    out = _run(_args(world, tmp_path, reward="tests.helpers:NanReward", reward_kwargs=repr({"bad_calls": bad})))
    for iteration in (2, 4):
        assert f"warning: non-finite rewards in iteration {iteration}; skipped it" in out.stderr
    assert "Traceback" not in out.stderr
    log = _log(tmp_path)
    assert [r["skipped"] for r in log] == [0, 1, 1, 2]
    assert [r["optimizer_step"] for r in log] == [2, 2, 4, 4]
    step = lambda n, part="": _adapter(os.path.join(tmp_path, f"step_{n:06d}", part))
    assert _same(step(1), _adapter(os.path.join(reference, "step_000001")))
    assert _same(step(2), step(1)) and _same(step(2, "ema"), step(1, "ema"))  # iteration 2 changed nothing
    assert not _same(step(3), step(2))  # iteration 3 trained
    assert _same(step(4), step(3)) and _same(step(4, "ema"), step(3, "ema"))  # the skipped last iteration saved
    assert M.latest_checkpoint(str(tmp_path)).endswith("step_000004")


def _wrong_adapter(folder):
    """An adapter for a wider network: its lora_A does not fit the tiny model's 16-wide to_q."""
    M.write_adapter({"transformer_blocks.0.attn.to_q": (torch.zeros(4, 32), torch.zeros(16, 4), 1.0)}, str(folder))
    return str(folder)


BAD_INPUT = {  # case: (overrides, the message on stderr's last line)
    "reward": (dict(reward="nope"), "unknown reward 'nope'"),
    "empty": (dict(prompts="empty.txt"), "no prompts (the file is empty)"),
    "csv": (dict(prompts="prompts.csv"), "prompt files are .txt (one prompt per line) or .jsonl"),
    "jsonl": (dict(prompts="bad.jsonl"), "bad.jsonl:2: not a JSON object"),
    "group": (dict(group_size=3), "group_size 3 does not divide the sampling batch"),  # 12 images in steps of 2
    "split": (dict(group_size=4, groups_per_iter=1), "each optimizer step must see whole groups"),  # 2 steps of 2
    "adapter": (dict(init_adapter="wide"), "do not fit a 16->16 layer"),
}


@pytest.fixture(scope="module")
def bad_runs(world, tmp_path_factory):
    """Every bad-input run, started at once (they are independent): {case: (CompletedProcess-like, out_dir)}."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.txt").write_text("\n  \n")
    (root / "prompts.csv").write_text("prompt\na red circle\n")
    (root / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": "two squares",\n')
    # an adapter for a wider network: its lora_A does not fit the tiny model's 16-wide to_q
    M.write_adapter({"transformer_blocks.0.attn.to_q": (torch.zeros(4, 32), torch.zeros(16, 4), 1.0)}, str(root / "wide"))
    procs = {}
    for case, (over, _) in BAD_INPUT.items():
        over = {k: (str(root / v) if k in ("prompts", "init_adapter") else v) for k, v in over.items()}
        procs[case] = subprocess.Popen([sys.executable, "train_teacher.py"] + _args(world, root / case, **over), cwd=REPO,
                                       env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return {case: (p, p.communicate(timeout=300)[1], root / case) for case, p in procs.items()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_one_line_error(bad_runs, case):
    proc, stderr, out_dir = bad_runs[case]
    assert proc.returncode != 0
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and BAD_INPUT[case][1] in last, last
    assert not os.path.exists(out_dir)  # nothing written


# ---- DiffusionNFT (--objective=nft): the same loop, the forward-process loss, the sampling policy "old" ----
# Each image its own starting noise (the ODE would draw a group's images alike from a shared one),
# 2 noise levels of the sampling grid per image, a velocity penalty (so the base runs too), and an old-policy
# schedule that is 0 for the first optimizer step and then rises: both branches of nft_decay are exercised.
NFT = dict(objective="nft", shared_init_noise=False, nft_levels=2, kl_beta=0.01, old_decay=[3, 0.25, 0.5], lr=1e-2)


@pytest.fixture(scope="module")
def reference_nft(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference_nft")
    _run(_args(world, out, **NFT))
    return out


def test_nft_checkpoint_holds_the_sampling_policy(world, reference_nft):
    """Each checkpoint has the sampling policy as its own adapter folder; it follows the trained adapter by the
    schedule: after iteration k (2k optimizer steps) old <- eta old + (1 - eta) theta with eta = nft_decay(2k)."""
    log = _log(reference_nft)
    assert [r["iteration"] for r in log] == [1, 2, 3, 4] and [r["optimizer_step"] for r in log] == [2, 4, 6, 8]
    assert [r["old_decay"] for r in log] == [0.0, 0.25, 0.5, 0.5] and all(0 <= r["r_mean"] <= 1 for r in log)
    assert "first_ratio_mean" not in log[0] and log[0]["kl"] > 0 and log[0]["nft_weighting"] == "adaptive"
    step = lambda n, part: _adapter(os.path.join(reference_nft, f"step_{n:06d}", part))
    assert sorted(os.listdir(os.path.join(reference_nft, "step_000001"))) == ["adapter", "config.json", "ema", "old", "trainer_state.pt"]
    assert _same(step(1, "old"), step(1, "adapter"))  # eta 0: the sampling policy is the trained one
    for n, eta in ((2, 0.25), (3, 0.5)):
        old, prev, theta = step(n, "old"), step(n - 1, "old"), step(n, "adapter")
        for k in old:
            for i in (0, 1):
                assert (old[k][i] - (eta * prev[k][i] + (1 - eta) * theta[k][i])).abs().max() <= 1e-6
        assert not _same(old, theta)


def test_nft_kill_and_resume_equals_uninterrupted(world, reference_nft, tmp_path):
    """Killed in iteration 4 after the checkpoint of iteration 2, resumed: adapter, EMA, sampling policy and log
    equal the uninterrupted run's bit for bit."""
    out, marker = tmp_path / "run", str(tmp_path / "hung")
    args = _args(world, out, save_every=2, **NFT)
    _run_until_killed(args, hang_at=13, marker=marker)
    assert M.latest_checkpoint(str(out)).endswith("step_000002")
    _run(args + ["--resume=True"])
    final, ref = M.latest_checkpoint(str(out)), os.path.join(reference_nft, "step_000004")
    for part in ("adapter", "ema", "old"):
        assert _same(_adapter(os.path.join(final, part)), _adapter(os.path.join(ref, part))), part
    strip = lambda log: [{k: v for k, v in r.items() if k not in TIMING} for r in log if "reward_mean" in r]
    assert strip(_log(out)) == strip(_log(reference_nft))


def test_nft_two_ranks_equal_one_rank(world, reference_nft, tmp_path):
    """As test_two_ranks_equal_one_rank, for the NFT loss: the same images, noise and levels on either layout."""
    _run(_args(world, tmp_path, iterations=1, **NFT), ranks=2)
    one, two = _adapter(os.path.join(reference_nft, "step_000001")), _adapter(os.path.join(tmp_path, "step_000001"))
    for i in (0, 1):
        scale = max(t[i].abs().max() for t in one.values())
        assert max((one[k][i] - two[k][i]).abs().max() for k in one) <= 1e-4 * scale
    assert abs(_log(reference_nft)[0]["reward_mean"] - _log(tmp_path)[0]["reward_mean"]) <= 1e-6


def test_nft_nonfinite_rewards_never_step(world, reference_nft, tmp_path):
    """A NaN score in iteration 2: no optimizer step and no update of the sampling policy in that iteration."""
    out = _run(_args(world, tmp_path, reward="tests.helpers:NanReward", reward_kwargs=repr({"bad_calls": {5: "nan"}}), **NFT))
    assert "warning: non-finite rewards in iteration 2; skipped it" in out.stderr
    log = _log(tmp_path)
    assert [r["optimizer_step"] for r in log] == [2, 2, 4, 6]
    step = lambda n, part: _adapter(os.path.join(tmp_path, f"step_{n:06d}", part))
    assert _same(step(1, "adapter"), _adapter(os.path.join(reference_nft, "step_000001", "adapter")))
    for part in ("adapter", "old", "ema"):
        assert _same(step(2, part), step(1, part)), part
    assert not _same(step(3, "adapter"), step(2, "adapter"))
