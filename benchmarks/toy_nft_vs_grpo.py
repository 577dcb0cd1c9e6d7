"""
DiffusionNFT and Flow-GRPO toy teachers side by side (docs/toy_results.md, "The room RL has, and DiffusionNFT teachers beside Flow-GRPO").

  python benchmarks/toy_nft_vs_grpo.py                                 # 3 NFT teachers, then every model evaluated
  python benchmarks/toy_nft_vs_grpo.py --grpo=train --tasks=text       # retrain the GRPO teacher too
  python benchmarks/toy_nft_vs_grpo.py --nft_flags="--lr=3e-3" --name=lr3e-3 --tasks=text   # an NFT variant
  python benchmarks/toy_nft_vs_grpo.py --grpo=none --name=trialform --nft_flags="--nft_weighting=velocity \
      --nft_level_density=uniform --nft_levels=4 --adv_clip=2.0 --old_decay=[0,0,0]"     # the issue's trial's form

Per task (composition, text, quality): an NFT teacher by train_teacher.py's toy_nft preset (the toy preset's
prompts, reward, 8 groups of 8 = 64 samples per update, about the GRPO teacher's wall-clock: 40 iterations of ~6-8 s
against 30 of ~10 s), and the GRPO teacher, either the shipped toy/teachers/grpo/TASK (train_teacher.py's toy preset on
the committed base) or retrained with --grpo=train. Then evaluate.py's toy protocol (held-out prompts, 10 ODE steps,
the same seeds for every model) on all three benchmarks, and per model and metric the paired difference to the
base (benchmarks/eval_paired.py): the teacher's own task and the other two (the seesaw). The NFT training curve
(mean training reward of the first and last 10 iterations) comes from its log.jsonl. One markdown table,
printed and written to --report. A stage whose output exists is skipped (delete its folder to redo it).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from eval_paired import load, paired  # noqa: E402

TASKS = {  # task: training prompts, evaluate.py benchmark, its metrics (strict first)
    "composition": ("toy/prompts/composition_train.jsonl", "toy_composition", ["toy_composition_strict", "toy_composition"]),
    "text": ("toy/prompts/text_train.txt", "toy_text", ["toy_text_accuracy", "toy_text_strict"]),
    "quality": ("toy/prompts/quality_train.txt", "toy_quality", ["toy_quality_strict", "toy_quality"]),
}


def run(command, done):
    if os.path.exists(done):
        print(f"[skip] {done} exists", flush=True)
        return None
    print("[run]", shlex.join(command[1:]), flush=True)
    t0 = time.time()
    subprocess.run(command, cwd=ROOT, check=True)
    return time.time() - t0


def curve(out):
    rewards = [r["reward_mean"] for r in map(json.loads, open(os.path.join(out, "log.jsonl"))) if "reward_mean" in r]
    head, tail = rewards[:10], rewards[-10:]
    return f"{sum(head) / len(head):.3f} -> {sum(tail) / len(tail):.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--tasks", default="composition,text,quality")
    parser.add_argument("--grpo", default="shipped", choices=["shipped", "train", "none"])
    parser.add_argument("--nft_flags", default="", help="extra train_teacher.py flags for the NFT teachers")
    parser.add_argument("--name", default="nft", help="the NFT teachers' name prefix (a variant: another name)")
    parser.add_argument("--out", default="runs/toy/nft_vs_grpo")
    parser.add_argument("--report", default="", help="default: OUT/report_NAME.md")
    args = parser.parse_args()
    os.chdir(ROOT)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or set(tasks) - set(TASKS):
        raise SystemExit(f"error: --tasks must name some of {sorted(TASKS)}")
    models, seconds = {"base": ""}, {}
    for task in tasks:
        prompts = TASKS[task][0]
        if args.grpo == "train":
            out = f"{args.out}/grpo_{task}"
            seconds[f"grpo_{task}"] = run([sys.executable, "train_teacher.py", f"--reward=toy_{task}", f"--prompts={prompts}",
                                          f"--out_dir={out}"], f"{out}/latest")
            models[f"grpo_{task}"] = out
        elif args.grpo == "shipped":
            models[f"grpo_{task}"] = f"toy/teachers/grpo/{task}"
        out = f"{args.out}/{args.name}_{task}"
        seconds[f"{args.name}_{task}"] = run([sys.executable, "train_teacher.py", "--preset=toy_nft", f"--reward=toy_{task}",
                                             f"--prompts={prompts}", f"--out_dir={out}", *shlex.split(args.nft_flags)],
                                            f"{out}/latest")
        models[f"{args.name}_{task}"] = out
    # evaluate.py reuses the images a model already has (same settings), so only new models are sampled
    subprocess.run([sys.executable, "evaluate.py", f"--models={models!r}", f"--out_dir={args.out}/eval"], cwd=ROOT, check=True)
    header = "| model | trained on | training reward (first -> last 10 it.) | train s | " + " | ".join(
        f"{TASKS[t][1]}: {m} − base" for t in TASKS for m in TASKS[t][2]) + " |"
    lines = [f"Command: python benchmarks/toy_nft_vs_grpo.py {shlex.join(sys.argv[1:])}", "", header,
             "|" + "---|" * (4 + 2 * len(TASKS))]
    for name, path in models.items():
        if name == "base":
            continue
        cells = []
        for task, (_, benchmark, metrics) in TASKS.items():
            for metric in metrics:
                r = paired(load(f"{args.out}/eval/base", benchmark, metric), load(f"{args.out}/eval/{name}", benchmark, metric))
                cells.append(f"{r['diff']:+.3f} ± {r['ci']:.3f} (n={r['n']})")
        trained = os.path.isfile(os.path.join(path, "log.jsonl"))
        s = seconds.get(name)
        lines.append(f"| {name} | {name.split('_', 1)[1]} | {curve(path) if trained else 'shipped'} | "
                     f"{'' if s is None else f'{s:.0f}'} | " + " | ".join(cells) + " |")
    report = args.report or f"{args.out}/report_{args.name}.md"
    os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
    open(report, "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
