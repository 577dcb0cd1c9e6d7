"""
The toy world's whole pipeline after the base model, measured: the numbers in docs/toy_results.md.

  python benchmarks/toy_world.py                 # everything (under an hour on 2 CPU cores), resumable
  python benchmarks/toy_world.py --ship          # ... and copy the three teachers to toy/teachers/
  python benchmarks/toy_world.py --only=eval     # re-evaluate what exists

Every stage is a plain run of a stage script with the flags printed here, so each number can be
reproduced by hand. A stage whose output exists is skipped (delete runs/toy/bench/<stage> to redo it).
  1. three single-reward Flow-GRPO teachers on the base (composition, text, quality)
  2. the student's two initialisations: SFT on the teachers' samples, and the exact merge of their LoRAs
  3. GRPO-Mix (scalar task rewards 3:1:1) and Flow-OPD variants (pg / gkd, with and without MAR, SFT or
     merge init; DanceOPD is one distill.py flag set away: --objective=gkd --step_weight=uniform --supervise=low_noise)
  4. evaluate.py on every model: held-out prompts, strict metrics, 95% CIs, comparison grids
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
ship = "--ship" in sys.argv
only = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--only=")), "")

TASKS = {"composition": "toy/prompts/composition_train.jsonl", "text": "toy/prompts/text_train.txt",
         "quality": "toy/prompts/quality_train.txt"}
TEACHER = {t: f"{OUT}/teacher_{t}" for t in TASKS}
teacher_tasks = [{"name": t, "prompts": p, "teacher": TEACHER[t], "weight": w, "reward": f"toy_{t}"}
                 for (t, p), w in zip(TASKS.items(), (3.0, 1.0, 1.0))]
# 30 iterations for every RL run (teachers, GRPO-Mix, OPD): equal budgets, and the pipeline inside its hour
distill_common = [f"--tasks={teacher_tasks!r}", f"--anchor={TEACHER['quality']}", "--eval_images=0", "--iterations=30"]

STAGES = [  # (name, script, flags); every run writes to OUT/name
    *[(f"teacher_{t}", "train_teacher.py", [f"--prompts={p}", f"--reward=toy_{t}"]) for t, p in TASKS.items()],
    ("sft", "cold_start.py", [f"--teachers={[{**t, 'adapter': t['teacher']} for t in teacher_tasks]!r}",
                              f"--data_dir={OUT}/sft_data"]),
    ("merge", "cold_start.py", ["--mode=merge", f"--teachers={[{**t, 'adapter': t['teacher']} for t in teacher_tasks]!r}"]),
    ("grpo_mix", "distill.py", [*distill_common, "--objective=grpo_mix", "--kl_beta=0.02", "--lr=3e-3",  # the teachers' recipe
                                "--shared_init_noise=True", "--timestep_fraction=0.5", "--sde_window=True", "--supervise=all"]),
    ("opd_pg_mar", "distill.py", [*distill_common, f"--student_init={OUT}/sft"]),
    ("opd_pg_nomar", "distill.py", [*distill_common, f"--student_init={OUT}/sft", "--beta_mar=0.0"]),
    ("opd_pg_mar_merge", "distill.py", [*distill_common, f"--student_init={OUT}/merge/adapter"]),
    ("opd_gkd_mar", "distill.py", [*distill_common, f"--student_init={OUT}/sft", "--objective=gkd"]),
]
MODELS = {"base": "", **{f"teacher_{t}": TEACHER[t] for t in TASKS}, "sft": f"{OUT}/sft", "merge": f"{OUT}/merge/adapter",
          **{s: f"{OUT}/{s}" for s, script, _ in STAGES if script == "distill.py"}}


def run(name, script, flags):
    out = f"{OUT}/{name}"
    done = os.path.isfile(f"{out}/latest") or os.path.isfile(f"{out}/adapter/adapter_config.json")
    if done:
        print(f"[skip] {name}: {out} exists")
        return 0.0
    command = [sys.executable, script, f"--out_dir={out}", *flags]
    print("[run]", " ".join(command[1:]), flush=True)
    t0 = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.time() - t0


if __name__ == "__main__":
    os.chdir(ROOT)
    seconds = json.load(open(f"{OUT}/seconds.json")) if os.path.isfile(f"{OUT}/seconds.json") else {}
    if only != "eval":
        for name, script, flags in STAGES:
            if not only or only == name:
                seconds[name] = seconds.get(name, 0.0) + run(name, script, flags)
                os.makedirs(OUT, exist_ok=True)
                json.dump(seconds, open(f"{OUT}/seconds.json", "w"), indent=2)
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "evaluate.py",
                    f"--models={MODELS!r}", f"--out_dir={OUT}/eval"], cwd=ROOT, check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    seconds["eval"] = time.time() - t0
    json.dump(seconds, open(f"{OUT}/seconds.json", "w"), indent=2)
    if ship:
        for t in TASKS:
            src = os.path.join(M.latest_checkpoint(TEACHER[t]), "adapter")
            shutil.rmtree(f"toy/teachers/{t}", ignore_errors=True)
            shutil.copytree(src, f"toy/teachers/{t}")
            print("shipped", f"toy/teachers/{t}")
    print(open(f"{OUT}/eval/results.md").read())
    print("seconds per stage:", json.dumps(seconds))
