"""What survives what (docs/robustness.md): resume never loses data and never lies, kill-and-resume is bitwise
the uninterrupted run, and every bad input or corrupt file is a one-line `error: PATH: what; what to do`.
Tiny pixel-space pipelines, a few seconds per script run."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import model as M
import rewards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1"}
TIMING = ("images_per_s", "seconds_sampling", "seconds_reward", "seconds_training", "seconds_labels")
PROMPTS = ["a red circle", "two blue squares", "a green triangle above a square", "the word cat", "a yellow square",
           "three red triangles", "a blue circle left of a green square", 'a sign that says "42"']
# one sampling batch of 4 groups x 2 images per iteration, 4 of the 8 prompts each time: a prompt first met in
# iteration 3 is encoded with other prompts than in the uninterrupted run (the cache starts empty on resume)
TEACHER = dict(reward="brightness", resolution=16, t5_length=8, group_size=2, groups_per_iter=4, batch_size=8,
               optimizer_steps_per_iter=1, num_steps=4, iterations=4, save_every=1, keep=10, grid_every=100,
               lora_rank=4, lora_alpha=4.0, lr=3e-3, ema=True, ema_every=1)
TASKS = ["composition", "text", "quality"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny pipeline with the toy vocabulary, a prompt file, and three teachers plus an anchor for distill.py."""
    import toyworld
    root = tmp_path_factory.mktemp("robust")
    M.build_tiny_pipeline(str(root / "tiny"), num_layers=2, codec="pixel", pixel_factor=2, sample_size=8,
                          words=toyworld.VOCAB_WORDS, clip_length=16)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    model = M.load_transformer(str(root / "tiny" / "transformer"))
    for i, name in enumerate(TASKS + ["anchor"]):
        M.add_adapter(model, name, rank=4, alpha=4, seed=i)
        g = torch.Generator().manual_seed(10 + i)
        for layer in model.lora_layers().values():
            if name in layer.lora_B:
                layer.lora_B[name].data.normal_(0, 0.3, generator=g)
        M.save_adapter(model, name, str(root / "teachers" / name))
    return root


def _flags(args):
    return [f"--{k}={v!r}" if isinstance(v, (list, dict)) or (isinstance(v, str) and v and not v[0].isalnum() and "/" not in v)
            else f"--{k}={v}" for k, v in args.items()]


def _teacher_args(world, out, **over):
    return _flags({**TEACHER, "model": str(world / "tiny"), "prompts": str(world / "prompts.txt"), "out_dir": str(out), **over})


def _distill_args(world, out, **over):
    # every task draws from the same 8 prompts: they recur across iterations in other company (see PROMPTS)
    tasks = [{"name": n, "prompts": str(world / "prompts.txt"), "teacher": str(world / "teachers" / n), "weight": w,
              "reward": "brightness"} for n, w in zip(TASKS, (3.0, 1.0, 1.0))]
    args = {"model": str(world / "tiny"), "tasks": tasks, "anchor": str(world / "teachers" / "anchor"), "out_dir": str(out),
            "resolution": 16, "group_size": 2, "groups_per_iter": 4, "batch_size": 8, "num_steps": 4, "iterations": 4,
            "save_every": 1, "keep": 10, "grid_every": 100, "t5_length": 8, "lora_rank": 4, "lora_alpha": 4.0, "lr": 3e-3,
            "ema": True, "ema_every": 1, "eval_images": 0, "supervise_k": 2}
    return _flags({**args, **over})


def _run(script, args, check=True):
    out = subprocess.run([sys.executable, script] + args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    if check and out.returncode:
        raise AssertionError(out.stderr[-3000:])
    return out


def _one_line_error(out, *parts):
    """The run failed with exactly one line on stderr, `error: ...`, containing every part."""
    assert out.returncode == 1, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and lines and lines[-1].startswith("error: "), out.stderr[-2000:]
    for part in parts:
        assert part in lines[-1], (part, lines[-1])
    return lines[-1]


def _log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def _strip(log):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log if "resumed_from" not in r]


def _same_adapter(a, b):
    a, b = M.read_adapter(str(a))[0], M.read_adapter(str(b))[0]
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) for k in a)


def _until_killed(script, args, hang, marker):
    """Run `script` under tests/faults.py, wait until it hangs at `hang`, SIGKILL it there."""
    proc = subprocess.Popen([sys.executable, os.path.join("tests", "faults.py"), hang, marker, script] + args, cwd=REPO,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err[-2000:]  # killed at the hang, not finished or crashed
    os.remove(marker)


# ---- exactness: kill and resume is bitwise the uninterrupted run -----------------------------------------------


@pytest.fixture(scope="module")
def references(world, tmp_path_factory):
    """The uninterrupted runs, made on demand: {(script, ema): out_dir}."""
    made = {}

    def get(script, ema):
        if (script, ema) not in made:
            out = tmp_path_factory.mktemp(f"ref_{script[:-3]}_{ema}")
            args = (_teacher_args if script == "train_teacher.py" else _distill_args)(world, out, ema=ema)
            _run(script, args)
            made[script, ema] = out
        return made[script, ema]
    return get


@pytest.mark.parametrize("script,ema", [("train_teacher.py", False), ("distill.py", True)])  # model.py saves both
def test_kill_and_resume_is_bitwise(world, references, tmp_path, script, ema):
    """Killed (SIGKILL) in iteration 3's sampling, after the checkpoint of iteration 2; resumed and killed inside
    the save of iteration 3 (its adapter written, trainer_state.pt not yet: a step_000003.tmpPID/ folder);
    resumed to the end. The adapter, its EMA and the log equal the uninterrupted run's bit for bit: each prompt is
    encoded alone, so its embedding does not depend on what was cached before the kill (the cache is not saved)."""
    reference = references(script, ema)
    out, marker = tmp_path / "run", str(tmp_path / "hung")
    args = (_teacher_args if script == "train_teacher.py" else _distill_args)(world, out, ema=ema)
    _until_killed(script, args, "rollout:3", marker)  # one sampling batch per iteration
    assert M.latest_checkpoint(str(out)).endswith("step_000002")
    _until_killed(script, args + ["--resume=True"], "save:1", marker)  # the resumed run's first save: iteration 3's
    assert M.latest_checkpoint(str(out)).endswith("step_000002")
    assert [d for d in os.listdir(out) if d.startswith("step_000003.tmp")]  # the killed save's leftover ...
    done = _run(script, args + ["--resume=True"])
    assert "resume: removed step_000003.tmp" in done.stdout and f"resume: from {out}/step_000002 at iteration 2" in done.stdout
    assert not [d for d in os.listdir(out) if ".tmp" in d]  # ... is gone
    final = M.latest_checkpoint(str(out))
    assert final.endswith("step_000004")
    assert _same_adapter(final, os.path.join(reference, "step_000004"))
    if ema:
        assert _same_adapter(os.path.join(final, "ema"), os.path.join(reference, "step_000004", "ema"))
    assert _strip(_log(out)) == _strip(_log(reference)) and not [r for r in _log(out) if "resumed_from" in r]


# ---- resume semantics --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished 2-iteration train_teacher.py run: step_000001/, step_000002/, log.jsonl."""
    out = tmp_path_factory.mktemp("finished") / "run"
    _run("train_teacher.py", _teacher_args(world, out, iterations=2))
    return out


def _copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)  # copy2: the files' mtimes are kept
    return out


def test_resume_takes_the_newest_checkpoint_whatever_latest_says(world, finished, tmp_path):
    """`latest` names a folder that does not exist and a killed save left step_000003.tmp123/: the run resumes from
    step_000002 (and says so), keeps the log's first two lines, rewrites neither checkpoint, removes the leftover."""
    out = _copy(finished, tmp_path)
    (out / "latest").write_text("step_000007")
    (out / "step_000003.tmp123").mkdir()
    (out / "step_000003.tmp123" / "adapter").mkdir()
    before = {p: os.stat(out / p).st_mtime_ns for p in ("step_000001/trainer_state.pt", "step_000002/trainer_state.pt")}
    done = _run("train_teacher.py", _teacher_args(world, out, iterations=3, resume=True))
    assert f"resume: from {out}/step_000002 at iteration 2" in done.stdout and "latest names 'step_000007'" in done.stdout
    assert {p: os.stat(out / p).st_mtime_ns for p in before} == before
    assert not (out / "step_000003.tmp123").exists() and (out / "latest").read_text() == "step_000003"
    log = _log(out)
    assert log[:2] == _log(finished) and [r["iteration"] for r in log] == [1, 2, 2, 3]
    assert log[2] == {"iteration": 2, "resumed_from": "step_000002", "changed": {"iterations": [2, 3]}}


def test_changed_lr_is_applied_and_logged_and_rank_refused(world, finished, tmp_path):
    out = _copy(finished, tmp_path)
    refused = _run("train_teacher.py", _teacher_args(world, out, iterations=3, resume=True, lora_rank=16), check=False)
    _one_line_error(refused, f"{out}/step_000002/config.json", "lora_rank was 4", "is 16 now", "cannot change on resume")
    assert _log(out) == _log(finished) and sorted(os.listdir(out)) == sorted(os.listdir(finished))  # nothing touched
    refused = _run("train_teacher.py", _teacher_args(world, out, resume=True, ema=False), check=False)
    _one_line_error(refused, "ema was True", "cannot change on resume")
    _run("train_teacher.py", _teacher_args(world, out, iterations=3, resume=True, lr=1e-2))
    state = torch.load(out / "step_000003" / "trainer_state.pt", weights_only=True)
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {1e-2}  # the optimizer really uses the new lr
    config = json.load(open(out / "step_000003" / "config.json"))
    assert config["lr"] == 1e-2 and config["lora_rank"] == 4 and M.read_adapter(str(out))[0]
    log = _log(out)
    assert log[2] == {"iteration": 2, "resumed_from": "step_000002", "changed": {"lr": [3e-3, 1e-2], "iterations": [2, 3]}}
    assert [r.get("lr") for r in log] == [3e-3, 3e-3, None, 1e-2]


def test_resume_into_an_empty_out_dir_says_it_starts_fresh(world, tmp_path):
    done = _run("train_teacher.py", _teacher_args(world, tmp_path / "new", iterations=1, resume=True))
    assert f"resume: {tmp_path / 'new'} does not exist: starting fresh at iteration 0" in done.stdout
    assert [r["iteration"] for r in _log(tmp_path / "new")] == [1]


def test_a_new_run_never_deletes_an_old_one(world, finished, tmp_path):
    """resume=False into a folder that holds a run: refused before the model loads, nothing deleted or truncated."""
    out = _copy(finished, tmp_path)
    for script, args in (("train_teacher.py", _teacher_args(world, out)), ("distill.py", _distill_args(world, out))):
        _one_line_error(_run(script, args, check=False), f"{out}: already holds a run", "--resume=True")
        assert _log(out) == _log(finished) and sorted(os.listdir(out)) == sorted(os.listdir(finished))


def test_resume_from_a_damaged_checkpoint_names_it(world, finished, tmp_path):
    """A truncated trainer_state.pt in the newest checkpoint: a one-line error naming it and the way out."""
    out = _copy(finished, tmp_path)
    state = out / "step_000002" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    _one_line_error(_run("train_teacher.py", _teacher_args(world, out, iterations=3, resume=True), check=False),
                    f"{state}: not a readable torch file", f"delete {out}/step_000002 to resume from {out}/step_000001")


def test_jsonl_log_keeps_or_refuses(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(4)) + '{"iteration": 4, "los')
    with pytest.raises(M.UserError, match="another run's log is there"):
        M.JsonlLog(str(path), resume=False)
    M.JsonlLog(str(path), resume=True, resume_at=2, key="iteration")  # the lines after 2 go, and the half line
    assert [json.loads(l)["iteration"] for l in path.read_text().splitlines()] == [0, 1, 2]
    M.JsonlLog(str(path), resume=True, resume_at=0, key="iteration")  # no checkpoint: the run starts over
    assert path.read_text() == ""


# ---- one-line errors for every corrupt file ------------------------------------------------------------------------


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


@pytest.fixture
def files(world, tmp_path):
    """Copies of the tiny pipeline and an adapter to damage."""
    shutil.copytree(world / "tiny", tmp_path / "tiny")
    shutil.copytree(world / "teachers" / "text", tmp_path / "adapter")
    return tmp_path


@pytest.mark.parametrize("damage,message", [
    ("truncate", "not a readable .safetensors file, truncated or corrupt"),
    ("garbage", "not a readable .safetensors file, truncated or corrupt"),
    ("config", "adapter_config.json:[0-9]+: not valid JSON"),
    ("config_values", "adapter_config.json: not a LoRA config"),
    ("shapes", "not a LoRA pair"),
])
def test_a_corrupt_adapter_is_a_one_line_error(files, damage, message):
    folder = files / "adapter"
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if damage == "truncate":
        _truncate(weights)
    elif damage == "garbage":
        weights.write_bytes(b"\x00\xff" * 300)
    elif damage == "config":
        config.write_text(config.read_text()[:40])
    elif damage == "config_values":
        config.write_text(json.dumps({**json.load(open(config)), "lora_alpha": "eight"}))
    else:
        from safetensors.torch import save_file
        save_file({"base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 16, 2),
                   "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(16, 4)}, str(weights))
    with pytest.raises(M.UserError, match=message) as err:
        M.read_adapter(str(folder))
    assert str(err.value).startswith(str(folder)) and "\n" not in str(err.value)


def test_corrupt_pipeline_files_are_one_line_errors(files):
    tiny = files / "tiny"
    weights = tiny / "transformer" / "diffusion_pytorch_model.safetensors"
    _truncate(weights)
    with pytest.raises(M.UserError, match=f"{weights}: not a readable .safetensors file"):
        M.load_transformer(str(tiny / "transformer"))
    (tiny / "transformer" / "config.json").write_text("{'not': json}")
    with pytest.raises(M.UserError, match="transformer/config.json:1: not valid JSON"):
        M.load_transformer(str(tiny / "transformer"))
    _truncate(tiny / "text_encoder" / "model.safetensors")
    with pytest.raises(M.UserError, match=f"{tiny / 'text_encoder'}: cannot load the text encoder"):
        M.load_text_encoders(str(tiny))
    (tiny / "scheduler" / "scheduler_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(M.UserError, match="scheduler_config.json:1: not UTF-8 text"):
        M.read_json(str(tiny / "scheduler" / "scheduler_config.json"))


def test_truncated_trainer_state_is_a_one_line_error(tmp_path):
    path = tmp_path / "trainer_state.pt"
    torch.save({"iteration": 3, "optimizer": {"state": {}, "param_groups": []}}, path)
    _truncate(path)
    with pytest.raises(M.UserError, match=f"{path}: not a readable torch file, truncated or corrupt"):
        M.read_torch(str(path))


@pytest.fixture(scope="module")
def broken(world, tmp_path_factory):
    """A truncated and a garbage adapter file, for the scripts' adapter inputs."""
    root = tmp_path_factory.mktemp("broken")
    for name in ("truncated", "garbage"):
        shutil.copytree(world / "teachers" / "text", root / name)
    _truncate(root / "truncated" / "adapter_model.safetensors")
    (root / "garbage" / "adapter_model.safetensors").write_bytes(b"garbage" * 50)
    return root


@pytest.mark.parametrize("case", ["init_adapter", "anchor", "student_init", "merge", "evaluate"])
def test_every_adapter_input_of_the_scripts_checks_its_file(world, broken, tmp_path, case):
    truncated, garbage = str(broken / "truncated"), str(broken / "garbage")
    if case == "init_adapter":
        out = _run("train_teacher.py", _teacher_args(world, tmp_path / "o", init_adapter=truncated), check=False)
    elif case in ("anchor", "student_init"):
        out = _run("distill.py", _distill_args(world, tmp_path / "o", **{case: truncated}), check=False)
    elif case == "merge":
        teachers = [{"name": "a", "adapter": str(world / "teachers" / "text"), "weight": 1.0},
                    {"name": "b", "adapter": truncated, "weight": 1.0}]
        out = _run("cold_start.py", _flags({"mode": "merge", "teachers": teachers, "out_dir": str(tmp_path / "o")}), check=False)
    else:
        out = _run("evaluate.py", _flags({"model": str(world / "tiny"), "models": {"base": "", "bad": garbage},
                                          "out_dir": str(tmp_path / "o"), "t5_length": 8}), check=False)
    _one_line_error(out, "not a readable .safetensors file, truncated or corrupt", "adapter_model.safetensors")
    assert not os.path.exists(tmp_path / "o" / "log.jsonl") and not os.path.exists(tmp_path / "o" / "adapter")


# ---- bad settings and inputs: checked before the model loads ----------------------------------------------------


def test_bad_dtype_and_out_dir_fail_before_the_model_loads(world, tmp_path):
    """--model points nowhere: an error about dtype or out_dir proves it came before the model was looked at."""
    nowhere = str(tmp_path / "no_model")
    _one_line_error(_run("train_teacher.py", _teacher_args(world, tmp_path / "o", dtype="float33", model=nowhere), check=False),
                    "--dtype='float33' is not a floating-point torch dtype")
    (tmp_path / "a_file").write_text("x")
    for script, args in (("train_teacher.py", _teacher_args(world, tmp_path / "a_file", model=nowhere)),
                         ("distill.py", _distill_args(world, tmp_path / "a_file", model=nowhere)),
                         ("evaluate.py", _flags({"model": nowhere, "out_dir": str(tmp_path / "a_file")}))):
        _one_line_error(_run(script, args, check=False), f"{tmp_path / 'a_file'}: --out_dir is an existing file")


@pytest.mark.parametrize("kind,message", [("short", "returned scores of shape (7,)"), ("matrix", "shape (8, 1)"),
                                          ("text", "not numbers"), ("bare", "returned Tensor")])
def test_a_malformed_custom_reward_is_a_one_line_error(kind, message):
    reward = rewards.get_reward("tests.faults:BadReward", kind=kind)
    images = torch.zeros(8, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(M.UserError, match=re.escape(message)) as err:
        reward(images, ["a"] * 8)
    assert "tests.faults:BadReward" in str(err.value) and "one float score per image" in str(err.value)


def test_a_short_reward_stops_a_run_with_one_line(world, tmp_path):
    out = _run("train_teacher.py", _teacher_args(world, tmp_path / "o", reward="tests.faults:BadReward",
                                                 reward_kwargs={"kind": "short"}), check=False)
    _one_line_error(out, "reward 'tests.faults:BadReward' returned scores of shape (7,) and dtype torch.float32 for 8 images")


def test_onnx_adapter_format_fails_before_the_merge(world, tmp_path):
    teachers = [{"name": n, "adapter": str(world / "teachers" / n), "weight": 1.0} for n in TASKS]
    out = _run("cold_start.py", _flags({"mode": "merge", "teachers": teachers, "out_dir": str(tmp_path / "o"),
                                        "adapter_format": "onnx"}), check=False)
    _one_line_error(out, "adapter_format must be peft or diffusers, got 'onnx'")
    assert not os.path.exists(tmp_path / "o")


def test_a_non_utf8_prompt_file_names_file_and_line(world, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red circle\ntwo blue squares\n".encode() + "caf\u00e9 sign\n".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{path}:3: not UTF-8 text \\(byte 0xe9 at column 4\\)"):
        rewards.load_prompts(str(path))
    _one_line_error(_run("train_teacher.py", _teacher_args(world, tmp_path / "o", prompts=str(path)), check=False),
                    f"{path}:3: not UTF-8 text")


@pytest.mark.parametrize("script", ["train_teacher.py", "distill.py", "cold_start.py", "evaluate.py"])
def test_help_prints_the_docstring_and_every_setting(script):
    out = _run(script, ["--help"])
    assert out.returncode == 0 and not out.stderr.strip()
    first = open(os.path.join(REPO, script)).read().split('"""')[1].strip().splitlines()[0]
    assert out.stdout.startswith(first)
    assert "--out_dir=" in out.stdout and "--dtype='bfloat16'   [toy: 'float32']" in out.stdout  # default, then the preset's
    assert "--PRESETS" not in out.stdout
    if script == "train_teacher.py":
        assert "--lr=0.0003   [toy: 0.003]" in out.stdout and "# G images per prompt" in out.stdout
    out = _run(script, ["--preset=nope"], check=False)
    _one_line_error(out, "unknown preset 'nope'")


# ---- 2 ranks against 1: the floating-point floor -----------------------------------------------------------------


def _max_rel_diff(a, b, i, step):
    a, b = (M.read_adapter(os.path.join(str(x), f"step_{step:06d}"))[0] for x in (a, b))
    return max((a[k][i] - b[k][i]).abs().max().item() for k in a) / max(a[k][i].abs().max().item() for k in a)


def test_two_ranks_differ_from_one_only_by_float_rounding(world, tmp_path):
    """4 iterations at the same global batch: 2 ranks x batch 2 against 1 rank x batch 2: the same prompts, seeds
    and optimizer steps; only the order of float reductions differs (the all-reduce of gradients instead of
    accumulating them in turn). After iteration 1 the 2-rank adapter is the 1-rank one up to float32 rounding:
    <= 1e-5 of max|B| (measured 6e-6); a rank that trained on its own gradient alone would be O(1) off.
    From iteration 2 on each run samples from its own, 1e-7-different policy, and the difference is chaotic: the
    advantages divide reward differences by the group's reward std, and Adam divides each gradient element by its
    own running magnitude, so an element whose gradient is near zero can flip sign and move by up to lr.
    Measured on this world: 4e-6, 4e-6, 5e-5 of max|B| after iterations 2, 3, 4 (a 1-rank run rebatched from
    batch 2 to 4, with no second rank to blame, moved by 8e-6); on tests/test_train_teacher.py's world 1.1e-3
    after iterations 2-4. So the bound after 4 iterations is 3e-3 of max|B|: ranks that drew different prompts
    or seeds, or stopped syncing, move the adapter by O(1) of max|B|."""
    common = dict(group_size=2, groups_per_iter=4, optimizer_steps_per_iter=2, iterations=4)
    one, two = tmp_path / "one", tmp_path / "two"
    _run("train_teacher.py", _teacher_args(world, one, batch_size=2, **common))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_teacher.py"]
    out = subprocess.run(torchrun + _teacher_args(world, two, batch_size=2, **common), cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for i in (0, 1):  # A and B
        ranks = [_max_rel_diff(one, two, i, step) for step in (1, 2, 3, 4)]
        assert ranks[0] <= 1e-5, ranks
        assert max(ranks) <= 3e-3, ranks
