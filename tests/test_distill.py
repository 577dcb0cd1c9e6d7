"""distill.py: the OPD objectives against float64 references, task routing, and the script end to end
(single process, 2-rank torchrun, kill-and-resume, bad input)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import model as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["composition", "text", "quality"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pixel-space pipeline (32 px, toy vocabulary) and three teachers whose velocities differ."""
    import toyworld
    root = tmp_path_factory.mktemp("distill")
    M.build_tiny_pipeline(str(root / "tiny"), num_layers=2, codec="pixel", pixel_factor=2, sample_size=16, patch_size=2,
                          words=toyworld.VOCAB_WORDS, clip_length=16)
    model = M.load_transformer(str(root / "tiny" / "transformer"))
    for i, name in enumerate(TASKS + ["anchor"]):
        M.add_adapter(model, name, rank=4, alpha=4, seed=i)
        g = torch.Generator().manual_seed(10 + i)
        for layer in model.lora_layers().values():
            if name in layer.lora_B:
                layer.lora_B[name].data.normal_(0, 0.3, generator=g)
        M.save_adapter(model, name, str(root / "teachers" / name))
    return root


def _tasks(root):
    rewards = {"composition": "toy_composition", "text": "toy_text", "quality": "toy_quality"}
    files = {"composition": "composition_train.jsonl", "text": "text_train.txt", "quality": "quality_train.txt"}
    return [{"name": n, "prompts": os.path.join(REPO, "toy", "prompts", files[n]), "teacher": str(root / "teachers" / n),
             "weight": w, "reward": rewards[n]} for n, w in zip(TASKS, (3.0, 1.0, 1.0))]


def _args(root, out, **over):
    args = {"model": str(root / "tiny"), "tasks": _tasks(root), "anchor": str(root / "teachers" / "anchor"), "out_dir": str(out),
            "group_size": 4, "groups_per_iter": 4, "batch_size": 8, "num_steps": 4, "iterations": 2, "save_every": 1,
            "grid_every": 100, "t5_length": 12, "lora_rank": 4, "lora_alpha": 4.0, "lr": 3e-3, "ema": False}
    args.update(over)
    return [f"--{k}={v!r}" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"--{k}={v}" for k, v in args.items()]


def _run(args, ranks=1, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}"]
    out = subprocess.run(launcher + ["distill.py"] + args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return out


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _pipe_and_inputs(world, n=6):
    pipe = M.load_pipeline(str(world / "tiny"), t5_length=12)
    for name in TASKS + ["anchor"]:
        M.load_adapter(pipe.transformer, name, str(world / "teachers" / name))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, 16, 16, generator=g)
    cond = pipe.text.encode([f"a sign that says \"{i}\"" for i in range(n)])
    neg = pipe.text.encode([""] * n)
    return pipe, x, cond, neg


# ---- the objectives -----------------------------------------------------------------------------------------


def test_uniform_weight_is_the_velocity_mse():
    g = torch.Generator().manual_seed(1)
    x, va, vb = torch.randn(3, 3, 2, 5, 5, generator=g, dtype=torch.float64)
    s, s_next, std = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64), torch.tensor([0.8, 0.4, 0.1], dtype=torch.float64), \
        torch.tensor([0.5, 0.7, 0.3], dtype=torch.float64)
    mean_a, mean_b = M.sde_mean(x, va, s, s_next, std), M.sde_mean(x, vb, s, s_next, std)
    mse = M.step_divergence(mean_a, mean_b, std * (s - s_next).sqrt(), s, s_next, std, weight="uniform")
    assert (mse - ((va - vb) ** 2).flatten(1).mean(1)).abs().max() <= 1e-12


def test_kl_advantages_by_hand():
    kl = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    steps = torch.tensor([[0, 1], [0, 1]])
    assert torch.equal(M.kl_advantages(kl, steps, -1.0, "none", clip=10.0), -kl)
    assert torch.equal(M.kl_advantages(kl, steps, -1.0, "none", clip=2.5), torch.tensor([[-1.0, -2.0], [-2.5, -2.5]]))
    per_t = M.kl_advantages(kl, steps, -1.0, "per_timestep")  # step 0: -1, -3 -> +1, -1 (std 1); step 1: -2, -6 (std 2)
    assert (per_t - torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) / (1 + torch.tensor([1e-4, 1e-4]) / torch.tensor([1.0, 2.0]))).abs().max() < 1e-4
    glob = M.kl_advantages(kl, steps, -1.0, "global")
    r = -kl.double()
    assert (glob.double() - (r - r.mean()) / (r.std(unbiased=False) + 1e-4)).abs().max() < 1e-6


def _float64_kl(model, adapter, teacher, x, s, s_next, cond, neg, g, std):
    """The closed-form KL in its velocity form, written independently: (|dt|/2) (1/std + std(1-s)/(2s))^2 ||dv||^2."""
    def velocity(name):
        with model.adapter(name):
            t = torch.full((len(x),), 1000 * s, dtype=torch.float64)
            vu = model(x, t, neg[0], neg[1])
            vc = model(x, t, cond[0], cond[1])
            return vu + g * (vc - vu)
    v_student = velocity(adapter)
    with torch.no_grad():
        v_teacher = velocity(teacher)
    dt = abs(s_next - s)
    w = (dt / 2) * (1 / std + std * (1 - s) / (2 * s)) ** 2
    return (w * ((v_student - v_teacher) ** 2).flatten(1).mean(1)).mean()


def test_gkd_gradient_equals_autograd_of_the_closed_form_kl(world):
    pipe, x, cond, neg = _pipe_and_inputs(world)
    model = pipe.transformer
    M.add_adapter(model, "student", rank=4, alpha=4, seed=7)
    for layer in model.lora_layers().values():
        if "student" in layer.lora_B:
            layer.lora_B["student"].data.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
            layer.lora_B["student"].requires_grad_(True)
    sigmas = M.sigma_schedule(4, pipe.shift)
    s, s_next, g = sigmas[1].item(), sigmas[2].item(), 4.5
    std = M.sde_std(torch.tensor(s), sigmas[1], 0.7).item()
    # ours: the path distill.py takes (float32)
    with model.adapter("student"):
        mean, step_std, _ = M.step_distribution(model, x, s, s_next, sigmas[1], 0.7, cond, neg, g)
    target = M.routed_mean(model, ["text"], torch.ones(len(x), 1), x, s, s_next, sigmas[1], 0.7, cond, neg, g)
    M.step_divergence(mean, target, step_std, s, s_next, torch.tensor(std), "exact", "exact").mean().backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # reference: float64 copy, velocity form, plain autograd
    model.zero_grad(set_to_none=True)
    model.double()
    ref = _float64_kl(model, "student", "text", x.double(), s, s_next, (cond[0].double(), cond[1].double()),
                      (neg[0].double(), neg[1].double()), g, std)
    ref.backward()
    assert ours, "the student got no gradient"
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert (ours[n].double() - p.grad).abs().max() <= 1e-4 * p.grad.abs().max() + 1e-9, n


def test_pg_at_ratio_one_is_the_score_function_gradient_weighted_by_minus_kl(world):
    pipe, x, cond, neg = _pipe_and_inputs(world)
    model = pipe.transformer
    M.add_adapter(model, "student", rank=4, alpha=4, seed=7)
    sigmas = M.sigma_schedule(4, pipe.shift)
    j = 1
    with torch.no_grad(), model.adapter("student"):
        mean, step_std, _ = M.step_distribution(model, x, sigmas[j], sigmas[j + 1], sigmas[1], 0.7, cond, neg, 4.5)
    x_next = mean + step_std * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    old = M.gaussian_log_prob(x_next, mean, step_std)
    target = M.routed_mean(model, ["composition"], torch.ones(len(x), 1), x, sigmas[j], sigmas[j + 1], sigmas[1], 0.7, cond, neg, 4.5)
    kl = M.transition_kl(mean, target, step_std, sigmas[j + 1] - sigmas[j])
    adv = M.kl_advantages(kl[:, None], torch.full((len(x), 1), j), -1.0, "none", clip=1e9)[:, 0]
    params = [p for p in model.parameters() if p.requires_grad]

    def log_prob(i=None):
        with model.adapter("student"):
            m, sd, _ = M.step_distribution(model, x, sigmas[j], sigmas[j + 1], sigmas[1], 0.7, cond, neg, 4.5)
        lp = M.gaussian_log_prob(x_next, m, sd)
        return lp if i is None else lp[i]
    lp = log_prob()
    assert torch.equal(lp.detach(), old)  # ratio exactly 1
    loss, _ = M.clipped_surrogate(lp, old, adv, 1e-4)
    ours = torch.autograd.grad(loss, params)
    # score function: d/dtheta of -mean(A_i log p_i) = mean(KL_i grad log p_i)
    expected = [torch.zeros_like(p) for p in params]
    for i in range(len(x)):
        for e, gi in zip(expected, torch.autograd.grad(log_prob(i), params)):
            e += kl[i] * gi / len(x)
    for a, b in zip(ours, expected):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-12


def test_routing_uses_each_samples_teacher_and_blends_softly(world):
    pipe, x, cond, neg = _pipe_and_inputs(world)
    model = pipe.transformer
    sigmas = M.sigma_schedule(4, pipe.shift)
    args = (sigmas[0], sigmas[1], sigmas[1], 0.7, cond, neg, 4.5)

    def alone(name, rows):
        with torch.no_grad(), model.adapter(name):
            return M.step_distribution(model, x[rows], sigmas[0], sigmas[1], sigmas[1], 0.7,
                                       (cond[0][rows], cond[1][rows]), (neg[0][rows], neg[1][rows]), 4.5)[0]
    task = torch.tensor([0, 1, 2, 0, 2, 1])
    one_hot = torch.nn.functional.one_hot(task, 3).double()
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    target = M.routed_mean(model, TASKS, one_hot, x, *args)
    hook.remove()
    assert calls == [4, 4, 4]  # one batched CFG forward per teacher, over its 2 states (doubled by CFG)
    for k, name in enumerate(TASKS):
        rows = (task == k).nonzero().flatten()
        assert (target[rows] - alone(name, rows)).abs().max() <= 1e-5
    others = [(target[task == k] - alone(TASKS[(k + 1) % 3], (task == k).nonzero().flatten())).abs().max() for k in range(3)]
    assert min(others) > 1e-3  # the teachers differ recognisably, so a wrong routing would show
    soft = torch.tensor([[0.5, 0.3, 0.2]]).double().expand(len(x), -1)
    blended = M.routed_mean(model, TASKS, soft, x, *args)
    every = range(len(x))
    expected = sum(w * alone(name, list(every)) for w, name in zip((0.5, 0.3, 0.2), TASKS))
    assert (blended - expected).abs().max() <= 1e-5


# ---- the script -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["pg", "gkd", "grpo_mix", "nft_mix"])
def test_script_runs_each_objective(world, tmp_path, objective):
    extra = {"gkd": {"supervise": "low_noise", "step_weight": "uniform", "noise_range": [0.0, 0.9]},
             "pg": {"pg_reward": "sampled"},
             "grpo_mix": {"shared_init_noise": True, "sde_window": True, "timestep_fraction": 0.5},
             "nft_mix": {"nft_levels": 2, "kl_beta": 0.01, "old_decay": [1, 0.5, 0.5], "iterations": 2}}.get(objective, {})
    _run(_args(world, tmp_path, objective=objective, **{"iterations": 1, **extra}))
    log = _log(tmp_path)
    sizes = log[0]["parameters"]
    if objective == "nft_mix":  # the student and its sampling policy; old follows the student by the schedule
        assert set(sizes) == {"base", "student", "old"} and log[-1]["kl_ref"] > 0
        step = lambda n, part: M.read_adapter(os.path.join(tmp_path, f"step_{n:06d}", part))[0]
        assert all(torch.equal(step(1, "old")[k][i], step(1, "adapter")[k][i]) for k in step(1, "old") for i in (0, 1))  # eta 0
        old, s1, s2 = step(2, "old"), step(1, "adapter"), step(2, "adapter")  # eta 0.5 after optimizer step 2
        for k in old:
            for i in (0, 1):
                assert (old[k][i] - (0.5 * s1[k][i] + 0.5 * s2[k][i])).abs().max() <= 1e-6
    elif objective == "grpo_mix":
        assert set(sizes) == {"base", "student"}
    else:  # one base: three teachers and the anchor are only adapters, each the size of the student
        assert set(sizes) == {"base", "student", "anchor", *(f"teacher_{t}" for t in TASKS)}
        assert len({v for k, v in sizes.items() if k != "base"}) == 1
        assert "composition/kl_teacher" in log[-1] and "composition/kl_anchor" in log[-1]
    assert log[-1]["iteration"] == extra.get("iterations", 1) and log[-1]["skipped"] == 0
    assert M.read_adapter(str(tmp_path))[0]


def test_two_ranks_equal_one_rank(world, tmp_path):
    _run(_args(world, tmp_path / "one", iterations=1))
    _run(_args(world, tmp_path / "two", iterations=1), ranks=2)
    a, _ = M.read_adapter(str(tmp_path / "one"))
    b, _ = M.read_adapter(str(tmp_path / "two"))
    scale = max(v[1].abs().max().item() for v in a.values())
    assert scale > 0
    for k in a:  # same samples, same batches; only the order of float reductions differs
        assert (a[k][0] - b[k][0]).abs().max() <= 1e-5 and (a[k][1] - b[k][1]).abs().max() <= 1e-4 * scale
    la, lb = _log(tmp_path / "one")[-1], _log(tmp_path / "two")[-1]
    assert abs(la["composition/kl_teacher"] - lb["composition/kl_teacher"]) <= 1e-6 * abs(la["composition/kl_teacher"])


@pytest.mark.parametrize("over,message", [
    ({"routing": {"nope": {"text": 1.0}}}, "unknown task 'nope'"),
    ({"routing": {"text": {"nope": 1.0}}}, "unknown teacher task 'nope'"),
    ({"routing": {"text": {"text": 0.0}}}, "sum to a positive number"),
    ({"objective": "ppo"}, "objective must be"),
    ({"pg_reward": "sampled", "step_weight": "uniform"}, "pg_reward must be"),
    ({"anchor": "/nowhere/adapter"}, "not found"),
])
def test_bad_input_fails_before_compute(world, tmp_path, over, message):
    out = _run(_args(world, tmp_path, **over), check=False)
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, last
    assert not os.path.exists(tmp_path / "log.jsonl")


def test_bad_task_files_and_weights(world, tmp_path):
    tasks = _tasks(world)
    tasks[0]["weight"] = -1.0
    out = _run(_args(world, tmp_path, tasks=tasks), check=False)
    assert "must be non-negative" in out.stderr.strip().splitlines()[-1]
    tasks = _tasks(world)
    tasks[1]["teacher"] = str(world / "tiny")  # not an adapter
    out = _run(_args(world, tmp_path, tasks=tasks), check=False)
    assert out.stderr.strip().splitlines()[-1].startswith("error:")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": "a photo of a circle", "task": "composition"}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    out = _run(_args(world, tmp_path, prompts=str(mixed)), check=False)
    assert "row 2 has no 'task' field" in out.stderr.strip().splitlines()[-1]
