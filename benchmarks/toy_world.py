"""
The toy world's whole pipeline after the base model, measured: the numbers in docs/toy_results.md.

  python benchmarks/toy_world.py                 # the pipeline on the shipped teachers (under an hour on 2 CPU cores), resumable
  python benchmarks/toy_world.py --ship          # ... first retrain the teachers that fit an hour, ship them to toy/teachers/
  python benchmarks/toy_world.py --ship --only=teachers   # only that: retrain and ship the teachers, then stop
  python benchmarks/toy_world.py --only=eval     # re-evaluate what exists
  python benchmarks/toy_world.py --only=report   # the paired differences (to the base, to the best teacher) and the
                                                 # training logs' summary (OUT/training.md) again
  python benchmarks/toy_world.py --longer        # after it: two of its runs resumed to 60 iterations, pg sampled
                                                 # without MAR, gkd from the merge x 2 seeds (OUT/eval_longer; ~50 min)

Every stage is a plain run of a stage script with the flags printed here, so each number can be
reproduced by hand. A finished stage is skipped (delete runs/toy/bench/<stage> to redo it); one killed part-way
resumes from its newest checkpoint.
  1. three single-reward DiffusionNFT teachers on the base (composition, text, quality): shipped in toy/teachers/
     (TEACHERS: each one's command and measured minutes); --ship retrains them, shortest first, while they fit an hour
  2. the student's two initialisations: SFT on the teachers' samples, and the exact merge of their LoRAs
  3. the task-reward baselines GRPO-Mix and NFT-Mix (rewards 3:1:1), and Flow-OPD: pg (closed-form and sampled
     per-step rewards) and gkd, with and without MAR, from SFT or the merge, and DanceOPD's variant
     (gkd, plain velocity MSE, one low-noise state per rollout)
  4. evaluate.py on every model: held-out prompts, strict metrics, 95% CIs, comparison grids; then per model and
     metric the paired difference to the base and to the best single teacher (OUT/paired.md), and per run and
     task the training reward and the KLs to the teacher and the anchor, first and last 5 iterations (OUT/training.md)
"""
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402  (the repository root is not on the path of a script in benchmarks/)
OUT = "runs/toy/bench"
ship, longer = "--ship" in sys.argv, "--longer" in sys.argv
only = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")), "")
HOUR = 60.0  # minutes of teacher training --ship may spend

TASKS = {"composition": "toy/prompts/composition_train_testmix.jsonl", "text": "toy/prompts/text_train.txt",
         "quality": "toy/prompts/quality_train.txt"}
# the shipped teachers: folder, train_teacher.py flags, minutes measured alone on the 2 cores (docs/toy_results.md)
TEACHERS = {
    "composition": ("toy/teachers/composition", ["--preset=toy_nft", f"--prompts={TASKS['composition']}",
                                                     "--reward=toy_composition", "--iterations=100"], 16.7),
    "text": ("toy/teachers/text", ["--preset=toy_nft", f"--prompts={TASKS['text']}", "--reward=toy_text",
                                       "--iterations=120"], 20.0),
    "quality": ("toy/teachers/quality", ["--preset=toy_nft", f"--prompts={TASKS['quality']}", "--reward=toy_quality"], 6.4),
}
TEACHER = {t: folder for t, (folder, _, _) in TEACHERS.items()}
teacher_tasks = [{"name": t, "prompts": p, "teacher": TEACHER[t], "weight": w, "reward": f"toy_{t}"}
                 for (t, p), w in zip(TASKS.items(), (3.0, 1.0, 1.0))]
# 20 iterations of 64 samples (distill.py's toy default) for every run after the teachers: equal budgets
distill_common = [f"--tasks={teacher_tasks!r}", f"--anchor={TEACHER['quality']}", "--eval_images=0", "--iterations=20"]
cold_teachers = f"--teachers={[{**t, 'adapter': t['teacher']} for t in teacher_tasks]!r}"  # cold_start.py's form
sft, merge = [f"--student_init={OUT}/sft"], [f"--student_init={OUT}/merge/adapter"]
dance = ["--objective=gkd", "--step_weight=uniform", "--supervise=low_noise"]

STAGES = [  # (name, script, flags); every run writes to OUT/name
    ("sft", "cold_start.py", [cold_teachers, f"--data_dir={OUT}/sft_data"]),
    ("merge", "cold_start.py", ["--mode=merge", cold_teachers]),
    ("grpo_mix", "distill.py", [*distill_common, "--objective=grpo_mix", "--kl_beta=0.02", "--lr=3e-3",  # the GRPO teachers' recipe
                                "--shared_init_noise=True", "--timestep_fraction=0.5", "--sde_window=True", "--supervise=all"]),
    ("nft_mix", "distill.py", [*distill_common, "--objective=nft_mix", "--shared_init_noise=False",  # the NFT teachers' recipe
                               "--timestep_fraction=0.99", "--batch_size=32", "--optimizer_steps_per_iter=2"]),
    ("opd_pg_mar", "distill.py", [*distill_common, *sft]),
    ("opd_pg_nomar", "distill.py", [*distill_common, *sft, "--beta_mar=0.0"]),
    ("opd_pg_mar_merge", "distill.py", [*distill_common, *merge]),
    ("opd_pg_nomar_merge", "distill.py", [*distill_common, *merge, "--beta_mar=0.0"]),
    ("opd_pg_sampled_mar", "distill.py", [*distill_common, *sft, "--pg_reward=sampled"]),
    ("opd_gkd_mar", "distill.py", [*distill_common, *sft, "--objective=gkd"]),
    ("dance_mar", "distill.py", [*distill_common, *sft, *dance]),
]
# --longer: Flow-OPD as the paper runs it (pg + MAR from a cold start, here the merge) and the stronger task-reward
# baseline, each resumed from its 20-iteration run to 3x the budget (constant lr: the 20-iteration checkpoint is
# the same run); does the student close on its teachers with more samples?
LONGER, LONGER_ITERATIONS = ["opd_pg_mar_merge", "nft_mix"], 60
# ... and new runs (name, flags, iterations): does pg's sampled per-step reward move the student toward its teachers
# without MAR (training.md: the KLs)? and gkd, the objective that does, from the merge for 60 iterations, twice
every20 = ["--save_every=20", "--keep=10"]
EXTRA = [("opd_pg_sampled_nomar", [*sft, "--pg_reward=sampled", "--beta_mar=0.0"], 20),
         ("opd_gkd_mar_merge_60", [*merge, "--objective=gkd", *every20], 60),
         ("opd_gkd_mar_merge_60_seed1", [*merge, "--objective=gkd", *every20, "--seed=1"], 60)]  # its replicate
MODELS = {"base": "", **{f"teacher_{t}": TEACHER[t] for t in TASKS}, "sft": f"{OUT}/sft", "merge": f"{OUT}/merge/adapter",
          **{s: f"{OUT}/{s}" for s, script, _ in STAGES if script == "distill.py"}}


def run(name, script, flags):
    """One stage, skipped when it finished before (its stage_done.json); a stage killed part-way resumes from its
    newest checkpoint (--resume=True; the merge has none and reruns)."""
    out = f"{OUT}/{name}"
    if os.path.isfile(f"{out}/stage_done.json"):
        print(f"[skip] {name}: {out} finished")
        return 0.0
    resume = [] if "--mode=merge" in flags else ["--resume=True"]
    command = [sys.executable, script, f"--out_dir={out}", *flags, *resume]
    print("[run]", " ".join(command[1:]), flush=True)
    t0 = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    seconds = time.time() - t0
    json.dump({"seconds": seconds, "command": command[1:]}, open(f"{out}/stage_done.json", "w"), indent=2)
    return seconds


def retrain_teachers(seconds):
    """--ship: retrain the teachers, shortest first, while their measured minutes fit HOUR; ship each to toy/teachers/."""
    spent = 0.0
    for t, (folder, flags, minutes) in sorted(TEACHERS.items(), key=lambda kv: kv[1][2]):
        if spent + minutes > HOUR:
            print(f"[disk] teacher {t}: {folder} (its {minutes:.0f} min do not fit the hour after {spent:.0f}; "
                  f"retrain by hand: python train_teacher.py {' '.join(flags)})")
            continue
        spent += minutes
        seconds[f"teacher_{t}"] = seconds.get(f"teacher_{t}", 0.0) + run(f"teacher_{t}", "train_teacher.py", flags)
        shutil.copytree(os.path.join(M.latest_checkpoint(f"{OUT}/teacher_{t}"), "adapter"), folder + ".new")
        shutil.rmtree(folder, ignore_errors=True)  # the shipped one goes only once its replacement is complete
        os.rename(folder + ".new", folder)
        print(f"[ship] teacher {t}: {OUT}/teacher_{t} -> {folder}")


METRICS = {"composition": ("toy_composition", ["toy_composition_strict", "toy_composition"]),
           "text": ("toy_text", ["toy_text_accuracy", "toy_text_strict", "toy_text"]),
           "quality": ("toy_quality", ["toy_quality_strict", "toy_quality"])}


def paired_report(models=None, eval_dir=None, path=None):
    """Per model and metric, the per-image paired difference (same prompt, same starting noise) to the base and
    to the best single teacher of that metric (the teacher with the highest mean on it), +- the 95% CI; to
    `path` (default: the pipeline's models, OUT/eval, OUT/paired.md)."""
    from eval_paired import load, paired  # benchmarks/eval_paired.py, next to this script
    models, eval_dir, path = models or MODELS, eval_dir or f"{OUT}/eval", path or f"{OUT}/paired.md"
    folder = lambda m: f"{eval_dir}/{m}"
    lines = ["| model | metric | n | mean | − base (95% CI) | best teacher | − best teacher (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    teachers = [f"teacher_{t}" for t in TASKS]
    for task, (benchmark, metrics) in METRICS.items():
        for metric in metrics:
            scores = {m: load(folder(m), benchmark, metric) for m in models}
            # per image, and on a tagged benchmark also GenEval's overall (the mean of the per-tag means)
            for kind, (mean_key, diff_key, ci_key) in (("", ("mean", "diff", "ci")), (" (GenEval overall)", ("tag_mean", "tag_diff", "tag_ci"))):
                if mean_key not in paired(scores["base"], scores["base"]):
                    continue
                best = max(teachers, key=lambda m: paired(scores["base"], scores[m])[mean_key])
                for m in models:
                    r = paired(scores["base"], scores[m])
                    vs_best = "" if m == best else "{:+.3f} ± {:.3f}".format(*(paired(scores[best], scores[m])[k] for k in (diff_key, ci_key)))
                    d = "" if m == "base" else f"{r[diff_key]:+.3f} ± {r[ci_key]:.3f}"
                    lines.append(f"| {m} | {metric}{kind} | {r['n']} | {r[mean_key]:.3f} | {d} | {best} | {vs_best} |")
    open(path, "w").write("\n".join(lines) + "\n")
    return "\n".join(lines)


def training_report(runs=None, path=None):
    """Per RL run and task, the mean of the first and the last 5 iterations' training reward and (OPD runs) the
    per-step KL to the task's teacher and to the MAR anchor, from each run's log.jsonl; to `path` (OUT/training.md)."""
    runs, path = runs or [s for s, script, _ in STAGES if script == "distill.py"], path or f"{OUT}/training.md"
    lines = ["| run | task | reward: first 5 -> last 5 | KL to its teacher | KL to the anchor |", "|---|---|---|---|---|"]
    for run_name in runs:
        log = [r for r in map(json.loads, open(f"{OUT}/{run_name}/log.jsonl")) if "loss" in r]  # iterations only
        for task in TASKS:
            cells = []
            for key in ("reward", "kl_teacher", "kl_anchor"):
                values = [r[f"{task}/{key}"] for r in log if f"{task}/{key}" in r]
                cells.append(f"{sum(values[:5]) / len(values[:5]):.4f} -> {sum(values[-5:]) / len(values[-5:]):.4f}"
                             if values else "")
            lines.append(f"| {run_name} | {task} | " + " | ".join(cells) + " |")
    open(path, "w").write("\n".join(lines) + "\n")
    return "\n".join(lines)


def evaluate(models, eval_dir):
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
                    f"--models={models!r}", f"--out_dir={eval_dir}"], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def run_longer():
    """--longer: the EXTRA runs made, and each LONGER run copied from OUT/name to OUT/longer/name (the original
    stays as it is) and resumed to LONGER_ITERATIONS, a checkpoint every 20; the base, the teachers and every
    checkpoint evaluated into OUT/eval_longer (the base's and teachers' images copied from OUT/eval, so reused),
    paired as the pipeline."""
    with_iterations = lambda flags, n: [*(f for f in flags if not f.startswith("--iterations=")), f"--iterations={n}"]
    checkpoints = lambda name, folder, n: {f"{name}_it{i}": f"{folder}/step_{i:06d}" for i in range(20, n + 1, 20)}
    flags_of = {name: flags for name, _, flags in STAGES}
    references = ("base", *(f"teacher_{t}" for t in TASKS))
    models = {m: MODELS[m] for m in references}
    for name, flags, iterations in EXTRA:
        run(name, "distill.py", with_iterations([*distill_common, *flags], iterations))
        models.update({name: f"{OUT}/{name}"} if iterations == 20 else checkpoints(name, f"{OUT}/{name}", iterations))
    for name in LONGER:
        if not os.path.isfile(f"{OUT}/{name}/stage_done.json"):
            raise SystemExit(f"error: {OUT}/{name} has not finished: run python benchmarks/toy_world.py first")
        if not os.path.isdir(f"{OUT}/longer/{name}"):
            shutil.rmtree(f"{OUT}/longer/{name}.tmp", ignore_errors=True)  # a copy killed midway
            shutil.copytree(f"{OUT}/{name}", f"{OUT}/longer/{name}.tmp")
            os.rename(f"{OUT}/longer/{name}.tmp", f"{OUT}/longer/{name}")
            os.remove(f"{OUT}/longer/{name}/stage_done.json")
        run(f"longer/{name}", "distill.py", [*with_iterations(flags_of[name], LONGER_ITERATIONS), *every20])
        models.update(checkpoints(name, f"{OUT}/longer/{name}", LONGER_ITERATIONS))
    for m in references:
        if os.path.isdir(f"{OUT}/eval/{m}") and not os.path.isdir(f"{OUT}/eval_longer/{m}"):
            shutil.copytree(f"{OUT}/eval/{m}", f"{OUT}/eval_longer/{m}")
    evaluate(models, f"{OUT}/eval_longer")
    print(paired_report(models, f"{OUT}/eval_longer", f"{OUT}/eval_longer/paired.md"))
    print(training_report([name for name, _, _ in EXTRA] + [f"longer/{name}" for name in LONGER], f"{OUT}/eval_longer/training.md"))


if __name__ == "__main__":
    os.chdir(ROOT)
    if only == "report":  # the paired differences of an evaluation that exists, and the training logs' summary
        print(paired_report())
        print(training_report())
        raise SystemExit(0)
    if longer:
        run_longer()
        raise SystemExit(0)
    seconds = json.load(open(f"{OUT}/seconds.json")) if os.path.isfile(f"{OUT}/seconds.json") else {}
    if ship:
        retrain_teachers(seconds)
        os.makedirs(OUT, exist_ok=True)
        json.dump(seconds, open(f"{OUT}/seconds.json", "w"), indent=2)
        if only == "teachers":
            raise SystemExit(0)
    elif only == "teachers":
        raise SystemExit("error: --only=teachers retrains the teachers: add --ship")
    else:
        print("[disk] teachers:", ", ".join(f"{t} {folder}" for t, folder in TEACHER.items()))
    if only != "eval":
        for name, script, flags in STAGES:
            if not only or only == name:
                seconds[name] = seconds.get(name, 0.0) + run(name, script, flags)
                os.makedirs(OUT, exist_ok=True)
                json.dump(seconds, open(f"{OUT}/seconds.json", "w"), indent=2)
    t0 = time.time()
    evaluate(MODELS, f"{OUT}/eval")
    seconds["eval"] = time.time() - t0
    json.dump(seconds, open(f"{OUT}/seconds.json", "w"), indent=2)
    print(open(f"{OUT}/eval/results.md").read())
    print(paired_report())
    print(training_report())
    print("seconds per stage:", json.dumps(seconds))
