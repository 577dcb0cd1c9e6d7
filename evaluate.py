"""
Evaluation: the papers' protocol as one reproducible table (docs/reward_spec.md 1.7 and 8).

Every model (the base, or a LoRA on it: a teacher, a student, an EMA copy, a merge) samples the same prompts
from the same noise: ODE (Euler), 40 steps, CFG 4.5, negative prompt "", 512 px, one fixed seed per
(prompt, image) that does not depend on the model. Every image is saved as a PNG and scored from that PNG,
so a resumed run, or a run on another number of GPUs, gives the same numbers.

  python evaluate.py                                          # toy world: base + the three toy teachers (CPU)
  python evaluate.py --add_models="{'student': 'runs/toy/distill'}"
  torchrun --nproc_per_node=8 evaluate.py --preset=sd35       # GenEval, OCR, PickScore, DrawBench
  torchrun --nproc_per_node=8 evaluate.py --preset=sd35 --models="{'base': '', 'student': 'runs/distill'}" --select=geneval,ocr
  python evaluate.py --preset=sd35 --prompts=data/t2i_compbench_val/color_val.txt --reward=clipscore

An adapter is a folder in peft or diffusers format, a checkpoint folder (its adapter/; pass CKPT/ema for
the EMA copy), a run folder (its newest checkpoint), or a hub id. All adapters sit on one copy of the base.

Outputs in out_dir: results.json, results.md (rows = models, columns = metrics, mean +- 95% CI), and
grid_<benchmark>.png (prompts x models, same noise); per model and benchmark, <model>/<benchmark>/ holds
the images PPPPP_KK.png (prompt index, image index; seed = model.sample_seed(seed, P, K)), settings.json
(what made them, checked before they are reused) and scores.jsonl (every image's scores). With several
nodes, out_dir must be on a filesystem every rank sees (ranks write images that rank 0 reads for the grids).
"""
import hashlib
import json
import os
import re
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import model as M
import rewards

# -- config: the papers' protocol (SD3.5-M, 512 px); the default preset "toy" runs the toy world on a CPU ----
preset = "toy"
model = "stabilityai/stable-diffusion-3.5-medium"
models = {"base": ""}           # name -> adapter (path or hub id); "" = the base model alone
add_models = {}                 # more models on top of `models`, to extend a preset's list
# name -> {"prompts": file, "rewards": [names], "images_per_prompt": k, "aggregate": "mean" | "geneval",
#          optional "reward_kwargs": {reward: kwargs}, "dedupe": True}. "geneval": per-tag means, overall =
# their unweighted mean (needs a tag per prompt). dedupe: identical rows are one prompt (files that repeat
# a prompt k times mean k images of it: say so with images_per_prompt).
benchmarks = {}                 # set by the preset
select = ""                     # comma-separated benchmarks to run; default: all of `benchmarks`
prompts = ""                    # any prompt file (.txt or GenEval .jsonl) as one more benchmark, named after the file
reward = ""                     # ... scored by these rewards (comma-separated rewards.py names or module:Class)
images_per_prompt = 1           # ... with this many images per prompt
reward_kwargs = {}              # {reward: kwargs for rewards.get_reward}, for every benchmark
skip_unavailable = False        # a reward whose weights are unavailable: leave its column out (warning) instead of stopping
geneval_detector = ""           # "mmdet:PATH.pth": GenEval's own mmdet checkpoint (the papers' numbers); or a transformers
                                # id/folder; "" = that checkpoint if it is at rewards.MMDET_GENEVAL_CHECKPOINT, else
                                # transformers' Mask2Former stand-in (not comparable with published GenEval numbers)
out_dir = "runs/eval"
num_steps = 40
guidance = 4.5
negative_prompt = ""
resolution = 512
t5_length = 128
seed = 0
batch_size = 16                 # images per forward, and the unit of work a rank gets (so it fixes the numbers)
max_prompts = 0                 # > 0: only the first N prompts of each benchmark (a quick look)
grid_prompts = 8                # rows of each benchmark's comparison grid
dtype = "bfloat16"
device = ""

DATA_HINT = "the benchmark prompt sets are not in the repository: the README says where to get them"
SD35_TEACHERS = {"teacher_geneval": "jieliu/SD3.5M-FlowGRPO-GenEval", "teacher_ocr": "jieliu/SD3.5M-FlowGRPO-Text",
                 "teacher_pickscore": "jieliu/SD3.5M-FlowGRPO-PickScore"}
SD35_BENCHMARKS = {
    # the official file holds each of the 553 prompts 4 times (docs/reward_spec.md 8): de-duplicated, then 4 images
    # each; per image GenEval's official rule ("correct"), per-tag accuracy, overall = mean of the six tags
    "geneval": dict(prompts="data/geneval_test_metadata.jsonl", rewards=["geneval"], images_per_prompt=4,
                    aggregate="geneval", reward_kwargs={"geneval": {"score": "correct"}}),
    "ocr": dict(prompts="data/ocr_test.txt", rewards=["ocr"], images_per_prompt=1, aggregate="mean"),
    "pickscore": dict(prompts="data/pickscore_sfw_test.txt", rewards=["pickscore"], images_per_prompt=1, aggregate="mean"),
    # Flow-OPD scores DrawBench quality with DeQA, which transformers does not ship: the aesthetic predictor is
    # the quality score we have. The file holds the 200 prompts 5 times each: 5 images per prompt.
    "drawbench": dict(prompts="data/drawbench_test.txt", rewards=["aesthetic"], images_per_prompt=5, aggregate="mean"),
}
TOY_MODELS = {"base": "", "teacher_composition": "toy/teachers/composition", "teacher_text": "toy/teachers/text",
              "teacher_quality": "toy/teachers/quality"}
TOY_BENCHMARKS = {
    # strict 0/1 metrics first (the headline, as GenEval and OCR are), the dense training rewards beside them
    "toy_composition": dict(prompts="toy/prompts/composition_test.jsonl", rewards=["toy_composition_strict", "toy_composition"],
                            images_per_prompt=4, aggregate="geneval"),
    "toy_text": dict(prompts="toy/prompts/text_test.txt", rewards=["toy_text_accuracy", "toy_text_strict", "toy_text"],
                     images_per_prompt=1, aggregate="mean"),
    "toy_quality": dict(prompts="toy/prompts/quality_test.txt", rewards=["toy_quality_strict", "toy_quality"],
                        images_per_prompt=2, aggregate="mean"),
}
PRESETS = {
    # 10 ODE steps, not 40: the toy world samples with 10 everywhere else, and at 40 the 750 images per model
    # (324 + 256 + 170) take ~5 min each on one CPU core instead of ~70 s (measured on a busy 2-core machine);
    # 8 models: ~5 min with torchrun --nproc_per_node=2
    "toy": dict(model="toy/base", models=TOY_MODELS, benchmarks=TOY_BENCHMARKS, out_dir="runs/toy/eval", resolution=32,
                t5_length=12, num_steps=10, batch_size=64, dtype="float32"),
    "sd35": dict(models={"base": "", **SD35_TEACHERS}, benchmarks=SD35_BENCHMARKS, out_dir="runs/eval"),
}
config = M.configure(globals(), PRESETS)
config = {k: v for k, v in config.items() if not k.isupper()}
torch_dtype = M.torch_dtype(dtype)  # a bad --dtype or --out_dir fails here, before anything loads
if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise M.UserError(f"{out_dir}: --out_dir is an existing file, not a folder; choose another --out_dir")

# -- what to run: models, benchmarks (prompts), rewards; every input is checked before any image is made ----
dist = M.setup_distributed(device or None)
models = {**models, **add_models}
if not models:
    raise M.UserError("no models to evaluate: give --models=\"{'base': ''}\" (name -> adapter, '' = the base model)")
for name in models:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name in (".", ".."):
        raise M.UserError(f"model name {name!r} is used as a folder name: letters, digits and _ . + - only")
benchmarks = {name: dict(spec) for name, spec in benchmarks.items()}
if prompts:
    if not reward:
        raise M.UserError("--prompts needs --reward=NAME[,NAME...] (a rewards.py reward or module:Class)")
    custom = os.path.splitext(os.path.basename(prompts))[0]
    benchmarks[custom] = dict(prompts=prompts, rewards=reward.split(","), images_per_prompt=images_per_prompt, aggregate="mean")
    select = select or custom
chosen = [b.strip() for b in select.split(",") if b.strip()] if select else list(benchmarks)
for b in chosen:
    if b not in benchmarks:
        raise M.UserError(f"unknown benchmark {b!r}; this preset has: {', '.join(benchmarks) or 'none'} "
                          f"(or define one with --prompts=FILE --reward=NAME, or --benchmarks={{...}})")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", b):
        raise M.UserError(f"benchmark name {b!r} is used as a folder name: letters, digits and _ . + - only")

tasks = {}  # benchmark -> its prompts, metadata, images per prompt, aggregate
for b in chosen:
    spec = benchmarks[b]
    if not isinstance(spec, dict) or "prompts" not in spec or not spec.get("rewards"):
        raise M.UserError(f"benchmark {b!r} needs at least 'prompts' (a file) and 'rewards' (a list of names), got {spec!r}")
    unknown = set(spec) - {"prompts", "rewards", "images_per_prompt", "aggregate", "reward_kwargs", "dedupe"}
    if unknown:
        raise M.UserError(f"benchmark {b!r}: unknown key {sorted(unknown)[0]!r}")
    aggregate = spec.get("aggregate", "mean")
    if aggregate not in ("mean", "geneval"):
        raise M.UserError(f"benchmark {b!r}: aggregate must be 'mean' or 'geneval', got {aggregate!r}")
    path = spec["prompts"]
    if not os.path.isfile(path):
        raise M.UserError(f"benchmark {b!r}: prompt file {path} not found" + (f" ({DATA_HINT})" if path.startswith("data/") else ""))
    try:
        prompt_list, metadata_list = rewards.load_prompts(path)
    except (ValueError, OSError) as e:
        raise M.UserError(f"benchmark {b!r}: {e}") from None
    if spec.get("dedupe", True):  # the first occurrence of each identical row keeps its place
        rows = dict.fromkeys(json.dumps([p, m], sort_keys=True) for p, m in zip(prompt_list, metadata_list))
        prompt_list, metadata_list = map(list, zip(*(json.loads(r) for r in rows))) if rows else ([], [])
    if max_prompts:
        prompt_list, metadata_list = prompt_list[:max_prompts], metadata_list[:max_prompts]
    if aggregate == "geneval" and any("tag" not in m for m in metadata_list):
        raise M.UserError(f"benchmark {b!r}: aggregate 'geneval' needs a tag per prompt (a GenEval-style .jsonl)")
    k = spec.get("images_per_prompt", 1)
    if not isinstance(k, int) or k < 1:
        raise M.UserError(f"benchmark {b!r}: images_per_prompt must be a positive integer, got {k!r}")
    tasks[b] = dict(prompts=prompt_list, metadata=metadata_list, images_per_prompt=k, aggregate=aggregate, file=path)

# adapters: read (and hashed) before the reward and base models load, so a wrong path fails in seconds
adapter_states, model_info = {}, {}
for name, path in models.items():
    if not path:
        model_info[name] = {"adapter": ""}
        continue
    try:
        adapter_states[name], info = M.read_adapter(path)
    except M.UserError as e:
        raise M.UserError(f"model {name!r}: {e}") from None
    with open(info["file"], "rb") as f:
        model_info[name] = {"adapter": path, "file": info["file"], "sha256": hashlib.sha256(f.read()).hexdigest()}

# rewards: one instance per (name, kwargs), loaded now so missing weights stop the run before it samples
reward_fns, columns, skipped = {}, {b: [] for b in chosen}, {b: [] for b in chosen}
for b in list(chosen):
    for r in benchmarks[b]["rewards"]:
        kwargs = {**reward_kwargs.get(r, {}), **benchmarks[b].get("reward_kwargs", {}).get(r, {})}
        if r == "geneval" and not {"detector", "detector_id"} & set(kwargs):
            official = rewards.MMDET_GENEVAL_CHECKPOINT
            detector = geneval_detector or (f"mmdet:{official}" if os.path.isfile(official) else "")
            if detector:
                kwargs["detector"] = detector
        key = (r, json.dumps(kwargs, sort_keys=True))
        if key not in reward_fns:
            try:
                fn = rewards.get_reward(r, device=dist.device, **kwargs)
                if hasattr(fn, "load"):
                    fn.load()
                reward_fns[key] = fn
            except rewards.RewardWeightsUnavailable as e:
                if not skip_unavailable:
                    raise M.UserError(f"benchmark {b!r}, reward {r!r}: {e} (or pass --skip_unavailable=True to leave "
                                      f"this column out)") from None
                reward_fns[key] = None
                if dist.master:
                    print(f"warning: reward {r!r} skipped, its weights are unavailable: {e}")
            except (ValueError, TypeError) as e:
                raise M.UserError(f"benchmark {b!r}, reward {r!r}: {e}") from None
        if reward_fns[key] is None:
            skipped[b].append(r)
        else:
            columns[b].append((r, reward_fns[key]))
    if not columns[b]:
        if dist.master:
            print(f"warning: benchmark {b!r} has no reward left to score it; skipped")
        chosen.remove(b)

# the base model with every adapter on it: one model's memory, switched per model (METHOD 6)
pipe = M.load_pipeline(model, dist.device, torch_dtype, t5_length=t5_length)
transformer = pipe.transformer.eval()
latent_shape = pipe.latent_shape(resolution)
adapter_of = {name: None for name in models}
for i, (name, state) in enumerate(adapter_states.items()):
    adapter_of[name] = f"model_{i}"  # adapter names must be identifiers; model names are free-form
    try:
        M.set_adapter_state(transformer, adapter_of[name], state)
    except M.UserError as e:
        raise M.UserError(f"model {name!r}: {e}") from None
del adapter_states
negative = pipe.text.encode([negative_prompt])


def image_file(p, k):
    return f"{p:05d}_{k:02d}.png"


def check_settings(folder, settings, prompt_list):
    """Saved images are reused only if the same base, adapter file, sampler and prompts made them."""
    path = os.path.join(folder, "settings.json")
    if not os.path.isfile(path):
        return
    saved = M.read_json(path, "settings file", f"delete {folder} to regenerate its images")
    if not isinstance(saved, dict):
        raise M.UserError(f"{path}: not a settings object; delete {folder} to regenerate its images")
    diff = [f"{k}: {saved.get(k)!r} there, {v!r} now" for k, v in settings.items() if saved.get(k) != v]
    n = min(len(saved.get("prompts", [])), len(prompt_list))
    if saved.get("prompts", [])[:n] != prompt_list[:n]:
        diff.append("the prompts differ")
    if diff:
        raise M.UserError(f"{folder} holds images made otherwise ({'; '.join(diff)}): delete it to regenerate, or use another --out_dir")


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    M._atomic(write, path)


def read_png(path):
    try:
        return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
    except Exception as e:  # truncated, not a PNG: PIL's UnidentifiedImageError, OSError, ...
        raise M.UserError(f"{path}: not a readable image ({type(e).__name__}); delete it and run again to regenerate it") from None


def read_pngs(files):
    return torch.stack([read_png(f) for f in files])


def write_png(image, path):
    M._atomic(lambda p: Image.fromarray(image.permute(1, 2, 0).numpy()).save(p, format="PNG"), path)


@torch.no_grad()
def generate(batch_prompts, seeds):
    # each prompt encoded alone (the encoder's cache then only ever holds such embeddings): with batched
    # encoding an embedding would depend on which prompts shared its batch, i.e. on the number of ranks
    cond = [pipe.text.encode([p]) for p in batch_prompts]
    embeds, pooled = torch.cat([c[0] for c in cond]), torch.cat([c[1] for c in cond])
    n = len(batch_prompts)
    latents = M.rollout(transformer, embeds, pooled, negative[0].expand(n, -1, -1), negative[1].expand(n, -1), latent_shape,
                        seeds, num_steps, pipe.shift, guidance, sde=False, keep=False).latents[:, -1]
    return M.to_uint8(pipe.codec.decode(latents)).cpu()


def aggregate_column(rows, column, kind):
    values = [float(r[column]) for r in rows]
    mean, ci, _ = M.mean_ci(values)
    if kind == "mean":
        return {"value": mean, "ci95": ci, "n": len(values)}
    # GenEval (docs/reward_spec.md 1.7): per-tag accuracy over that tag's images, overall = unweighted mean of the T
    # tags, so var(overall) = sum_t var(mean_t) / T^2 (tags are independent samples)
    overall, ci, by_tag = M.tag_mean_ci(values, [r["tag"] for r in rows])
    tags = [t for t in rewards.GENEVAL_TAGS if t in by_tag] + sorted(t for t in by_tag if t not in rewards.GENEVAL_TAGS)
    per_tag = {t: {"value": by_tag[t][0], "ci95": by_tag[t][1], "n": sum(r["tag"] == t for r in rows)} for t in tags}
    return {"value": overall, "ci95": ci, "n": len(values), "image_mean": mean, "per_tag": per_tag}


# -- sampling and scoring: fixed global batches, whole batches per rank -----------------------------------
# Work item (p, k) = image k of prompt p; the list is cut into batches of batch_size whatever the number of
# ranks, and batch i goes to rank i % world. Every image is thus made in the same batch (same float
# arithmetic) on 1 or N ranks, and scored, from its PNG, in the same batch: the numbers are equal by construction.
results, scores_of, counts = {}, {}, {"generated": 0, "reused": 0}
t0 = time.time()


def protocol():
    return {"sampler": "ODE (Euler)", "num_steps": num_steps, "guidance": guidance, "negative_prompt": negative_prompt,
            "resolution": resolution, "shift": pipe.shift, "dtype": dtype, "t5_length": t5_length, "seed": seed,
            "seeds": "model.sample_seed(seed, prompt_index, image_index), the same for every model", "base_model": model}


def write_results():
    summary = {"protocol": protocol(), "models": model_info,
               "benchmarks": {b: {"prompts": tasks[b]["file"], "num_prompts": len(tasks[b]["prompts"]),
                                  "images_per_prompt": tasks[b]["images_per_prompt"], "aggregate": tasks[b]["aggregate"],
                                  "rewards": [c for c, _ in columns[b]], "skipped_rewards": skipped[b],
                                  **detectors_of(b)} for b in chosen},
               "results": results, "run": {**counts, "world_size": dist.world, "seconds": round(time.time() - t0, 1)},
               "config": config}
    write_text(os.path.join(out_dir, "results.json"), json.dumps(summary, indent=2))
    write_text(os.path.join(out_dir, "results.md"), markdown_table())


def detectors_of(b):
    """{"detector": ...} naming which GenEval detector scored benchmark b, if one did."""
    names = [fn.detector_name for _, fn in columns[b] if hasattr(fn, "detector_name")]
    return {"detector": "; ".join(names)} if names else {}


def cell(metric):
    return f"{metric['value']:.3f} ± {metric['ci95']:.3f}"


def markdown_table():
    cols = [(b, c) for b in chosen for c, _ in columns[b]]
    n_images = {b: len(tasks[b]["prompts"]) * tasks[b]["images_per_prompt"] for b in chosen}
    head = [f"{b} (n={n_images[b]})" if [c] == [x for x, _ in columns[b]] == [b] else f"{b}: {c} (n={n_images[b]})" for b, c in cols]
    lines = ["# Evaluation", "",
             f"Sampler: ODE (Euler), {num_steps} steps, CFG {guidance}, negative prompt {json.dumps(negative_prompt)}, {resolution} px, "
             f"shift {pipe.shift}, {dtype}; noise seeded per (prompt, image), the same for every model. Base model: `{model}`.",
             "Each cell: mean ± 95% CI half-width (normal approximation, 1.96 s/√n); n = images per model.", "",
             "| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for name in results:
        lines.append(f"| {name} | " + " | ".join(cell(results[name][b][c]) if b in results[name] else "" for b, c in cols) + " |")
    for b in chosen:
        t = tasks[b]
        lines += ["", f"**{b}**: {len(t['prompts'])} prompts from `{t['file']}` x {t['images_per_prompt']} images."]
        if skipped[b]:
            lines.append(f"Not scored (weights unavailable): {', '.join(skipped[b])}.")
        if detectors_of(b):
            lines.append(f"Detector: {detectors_of(b)['detector']}.")
        if t["aggregate"] != "geneval":
            continue
        lines.append("Overall = unweighted mean of the per-tag accuracies (GenEval's official number); its CI combines "
                     "the per-tag variances, var = Σ_t var_t / T².")
        for c, _ in columns[b]:
            done = [name for name in results if b in results[name]]
            if not done:
                continue
            tags = list(results[done[0]][b][c]["per_tag"])
            counts_t = [results[done[0]][b][c]["per_tag"][t]["n"] for t in tags]
            lines += ["", f"| {c} | " + " | ".join(f"{t} (n={n})" for t, n in zip(tags, counts_t)) + " | overall |",
                      "|---|" + "---|" * (len(tags) + 1)]
            for name in done:
                m = results[name][b][c]
                lines.append(f"| {name} | " + " | ".join(cell(m["per_tag"][t]) for t in tags) + f" | {cell(m)} |")
    lines += ["", "Models: " + "; ".join(f"{name} = {info['adapter'] or 'the base model'}" for name, info in model_info.items()), ""]
    return "\n".join(lines)


def settings_of(name):
    return {**protocol(), "adapter": model_info[name]["adapter"], "adapter_sha256": model_info[name].get("sha256", "")}


for name in models:  # every folder checked on every rank before anything is written: fail in seconds, not hours
    for b in chosen:
        check_settings(os.path.join(out_dir, name, b), settings_of(name), tasks[b]["prompts"])
if torch.distributed.is_initialized():
    torch.distributed.barrier()

for name in models:
    for b in chosen:
        t = tasks[b]
        folder = os.path.join(out_dir, name, b)
        os.makedirs(folder, exist_ok=True)
        if dist.master:
            saved = os.path.join(folder, "settings.json")
            old = M.read_json(saved).get("prompts", []) if os.path.isfile(saved) else []
            write_text(saved, json.dumps({**settings_of(name), "prompts": max(old, t["prompts"], key=len)}, indent=1))
        work = [(p, k) for p in range(len(t["prompts"])) for k in range(t["images_per_prompt"])]
        batches = [work[i:i + batch_size] for i in range(0, len(work), batch_size)]
        mine = batches[dist.rank::dist.world]
        rows, made, reused = [], 0, 0
        bar = tqdm(total=sum(map(len, mine)), desc=f"{name} / {b}", unit="img", disable=not dist.master)
        with transformer.adapter(adapter_of[name]):
            for batch in mine:
                files = [os.path.join(folder, image_file(p, k)) for p, k in batch]
                batch_prompts = [t["prompts"][p] for p, _ in batch]
                missing = [i for i, f in enumerate(files) if not os.path.isfile(f)]
                if missing:  # the whole batch again (its composition fixes the numbers), only missing files written
                    images = generate(batch_prompts, [M.sample_seed(seed, p, k) for p, k in batch])
                    for i in missing:
                        write_png(images[i], files[i])
                made, reused = made + len(missing), reused + len(batch) - len(missing)
                images = read_pngs(files)  # scores always come from the saved uint8 PNGs
                batch_meta = [t["metadata"][p] for p, _ in batch]
                batch_rows = [{"prompt_index": p, "image_index": k, "seed": M.sample_seed(seed, p, k), "file": image_file(p, k),
                               "prompt": t["prompts"][p], **({"tag": m["tag"]} if "tag" in m else {})}
                              for (p, k), m in zip(batch, batch_meta)]
                for c, fn in columns[b]:
                    scores, details = fn(images, batch_prompts, batch_meta)
                    for i, row in enumerate(batch_rows):
                        row[c] = float(scores[i])
                        row.update({f"{c}/{key}": values[i] for key, values in details.items()
                                    if key != "tag" and isinstance(values[i], (int, float, str, bool, dict, list))})
                rows += batch_rows
                bar.update(len(batch))
        bar.close()
        if torch.distributed.is_initialized():
            gathered = [None] * dist.world
            torch.distributed.all_gather_object(gathered, (rows, made, reused))
        else:
            gathered = [(rows, made, reused)]
        if not dist.master:
            continue
        rows = sorted((r for g in gathered for r in g[0]), key=lambda r: (r["prompt_index"], r["image_index"]))
        counts["generated"] += sum(g[1] for g in gathered)
        counts["reused"] += sum(g[2] for g in gathered)
        write_text(os.path.join(folder, "scores.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
        scores_of[name, b] = {(r["prompt_index"], r["image_index"]): r for r in rows}
        results.setdefault(name, {})[b] = {c: aggregate_column(rows, c, t["aggregate"]) for c, _ in columns[b]}
        headline = columns[b][0][0]
        tqdm.write(f"{name} / {b}: {headline} {cell(results[name][b][headline])} (n={len(rows)})")
        write_results()  # after every (model, benchmark): a long run's finished part is on disk


# -- grids: the same prompts and noise, a row per prompt, a column per model -------------------------------
def font(size):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def wrap(draw, text, width, fnt, max_lines):
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=fnt) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(1, len(lines[-1]) - 3)] + "..."
    return lines


def grid_prompts_of(t):
    """Spread over the file; with tags, in turn from each tag so every task shows."""
    n, count = len(t["prompts"]), min(grid_prompts, len(t["prompts"]))
    if t["aggregate"] != "geneval":
        return sorted({i * n // count for i in range(count)})
    by_tag = {}
    for p, m in enumerate(t["metadata"]):
        by_tag.setdefault(m["tag"], []).append(p)
    queues = [by_tag[tag] for tag in [x for x in rewards.GENEVAL_TAGS if x in by_tag] + sorted(set(by_tag) - set(rewards.GENEVAL_TAGS))]
    chosen_prompts, depth = [], 0
    while len(chosen_prompts) < count:
        chosen_prompts += [q[depth] for q in queues if depth < len(q)][:count - len(chosen_prompts)]
        depth += 1
    return chosen_prompts


def save_comparison_grid(b, path):
    t = tasks[b]
    shown = grid_prompts_of(t)
    names = [name for name in models if (name, b) in scores_of]
    # small (toy) images: an integer nearest-neighbour upscale to >= 128 px, so pixels stay sharp; large: 256 px
    side = resolution * max(1, 128 // resolution) if resolution < 128 else 256
    scale_up = resolution < side
    text_font, small, title_font = font(13), font(12), font(15)
    pad, prompt_w, score_h, head_h = 6, 230, 18, 100
    cols = [c for c, _ in columns[b]]
    header = [(f"{b}: image 0 of {len(shown)} prompts, the same noise for every model", title_font, "black"),
              (f"under each image: {' / '.join(cols)}", small, (90, 90, 90)),
              (f"under each model: its {cols[0]} over all {len(t['prompts']) * t['images_per_prompt']} images, ± 95% CI", small, (90, 90, 90))]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(pad + prompt_w + len(names) * (side + pad), 4 * pad + max(int(measure.textlength(s, font=f)) for s, f, _ in header))
    height = head_h + len(shown) * (side + score_h + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for li, (line, fnt, color) in enumerate(header):
        draw.text((pad, pad + (0 if li == 0 else 6 + 15 * li)), line, fill=color, font=fnt)
    for j, name in enumerate(names):
        x = pad + prompt_w + j * (side + pad)
        draw.text((x, pad + 58), wrap(draw, name, side, text_font, 1)[0], fill="black", font=text_font)
        draw.text((x, pad + 74), cell(results[name][b][cols[0]]), fill=(0, 90, 160), font=text_font)
    for i, p in enumerate(shown):
        y = head_h + i * (side + score_h + pad)
        draw.line([(pad, y - 3), (width - pad, y - 3)], fill=(220, 220, 220))
        lines = wrap(draw, t["prompts"][p], prompt_w - 2 * pad, text_font, (side + score_h) // 16 - 1)
        for li, line in enumerate(lines):
            draw.text((pad, y + 2 + 16 * li), line, fill="black", font=text_font)
        tag = t["metadata"][p].get("tag")
        if tag:
            draw.text((pad, y + 4 + 16 * len(lines)), f"[{tag}]", fill=(120, 120, 120), font=small)
        row_scores = [scores_of[name, b][p, 0][cols[0]] for name in names]
        for j, name in enumerate(names):
            x = pad + prompt_w + j * (side + pad)
            image = Image.open(os.path.join(out_dir, name, b, image_file(p, 0))).convert("RGB")
            image = image.resize((side, side), Image.NEAREST if scale_up else Image.LANCZOS)
            canvas.paste(image, (x, y))
            values = [scores_of[name, b][p, 0][c] for c in cols]
            best = len(names) > 1 and values[0] == max(row_scores) and min(row_scores) < max(row_scores)
            draw.text((x, y + side + 2), " / ".join(f"{v:.2f}" for v in values), font=text_font,
                      fill=(0, 130, 0) if best else "black")  # green: the row's best headline score
    M._atomic(lambda q: canvas.save(q, format="PNG"), path)


if dist.master:
    for b in chosen:
        save_comparison_grid(b, os.path.join(out_dir, f"grid_{b}.png"))
    write_results()
    print(f"{counts['generated']} images generated, {counts['reused']} reused, in {time.time() - t0:.0f} s; "
          f"wrote {out_dir}/results.md, results.json and grid_<benchmark>.png")
    print(markdown_table())
if torch.distributed.is_initialized():
    torch.distributed.barrier()  # every rank done before any tears down (a rank leaving early can abort at exit)
    torch.distributed.destroy_process_group()
