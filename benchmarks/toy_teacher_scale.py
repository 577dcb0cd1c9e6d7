"""
The toy teachers' gain against the samples per update: the measurement docs/toy_results.md leaves to a GPU.

  python benchmarks/toy_teacher_scale.py --report=$OUT/teacher_scale.md     # on a GPU (device auto)
  python benchmarks/toy_teacher_scale.py --groups=2 --iterations=1 --tasks=text --out=/tmp/scale   # a CPU smoke run

On two CPU cores the composition and text teachers do not beat the base with 64 samples per update (8 groups of
8) in up to 150 iterations, nor the composition teacher with 256 or 512. This runs the same toy preset (train_teacher.py, groups of 8, its step
size and KL) with more groups per update, then evaluate.py with the table's protocol (held-out prompts, the
same seeds for every model) and the paired difference to the base (benchmarks/eval_paired.py). One row per
run is appended to the report as soon as it is measured, so a run cut short still leaves its rows.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from eval_paired import load, paired  # noqa: E402

TASKS = {  # task: (training prompts, evaluate.py benchmark, its metrics: strict first)
    "composition": ("toy/prompts/composition_train.jsonl", "toy_composition", ["toy_composition_strict", "toy_composition"]),
    "text": ("toy/prompts/text_train.txt", "toy_text", ["toy_text_strict", "toy_text_accuracy"]),
}


def run(command):
    print("[run]", " ".join(command[1:]), flush=True)
    t0 = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.time() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--groups", default="8,64,256", help="groups of 8 per update, comma-separated (8 = the preset)")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--tasks", default="composition,text")
    parser.add_argument("--out", default="runs/toy/scale", help="teachers and evaluation images")
    parser.add_argument("--report", default="", help="the markdown table (default: OUT/teacher_scale.md)")
    args = parser.parse_args()
    os.chdir(ROOT)
    report = args.report or os.path.join(args.out, "teacher_scale.md")
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"error: unknown task(s) {unknown}; known: {sorted(TASKS)}")
    with open(report, "w") as f:
        f.write(f"Command: python benchmarks/toy_teacher_scale.py {' '.join(sys.argv[1:])}\n\n"
                "| task | groups x 8 per update | iterations | train s | eval s | strict metric − base | second metric − base | n |\n"
                "|---|---|---|---|---|---|---|---|\n")
    for task in tasks:
        prompts, benchmark, (strict, dense) = TASKS[task]
        for groups in (int(g) for g in args.groups.split(",")):
            name = f"{task}_g{groups}"
            samples = 8 * groups
            train_s = run([sys.executable, "train_teacher.py", f"--reward=toy_{task}", f"--prompts={prompts}",
                           f"--groups_per_iter={groups}", f"--batch_size={min(samples, 256)}",
                           f"--iterations={args.iterations}", f"--save_every={args.iterations}",
                           f"--grid_every={args.iterations}", f"--out_dir={args.out}/{name}"])
            # the base's images are made once and reused; this teacher was just (re)trained, so its old ones go
            shutil.rmtree(f"{args.out}/eval/{name}", ignore_errors=True)
            eval_s = run([sys.executable, "evaluate.py", f"--select={benchmark}",
                          f"--models={ {'base': '', name: f'{args.out}/{name}'}!r}", f"--out_dir={args.out}/eval"])
            cells = []
            for metric in (strict, dense):
                r = paired(load(f"{args.out}/eval/base", benchmark, metric), load(f"{args.out}/eval/{name}", benchmark, metric))
                cells.append(f"{r['diff']:+.3f} ± {r['ci']:.3f} ({metric})")
                n = r["n"]
            with open(report, "a") as f:
                f.write(f"| {task} | {groups} | {args.iterations} | {train_s:.0f} | {eval_s:.0f} | {cells[0]} | {cells[1]} | {n} |\n")
            print(open(report).read(), flush=True)


if __name__ == "__main__":
    main()
