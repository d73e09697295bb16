"""`python -m fastsynth.compare`: train (or reuse) several configurations with the same seed and
budget, evaluate them all, and write report.md + report.json in the paper's table layouts.

    python -m fastsynth.compare --methods mocov2,mocov2+synth --output-dir runs/cmp
    python -m fastsynth.compare --dataset cub --data-root DIR --preset paper \\
        --methods mocov2,mocov2+synth,simsiam,simsiam+synth --noise both,gradcam,lowvar,random

Every flag of `python -m fastsynth.train` is passed through (preset, epochs, sizes, ...). A run
whose folder already holds final metrics for the same configuration is reused, not retrained.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

RETRIEVAL = (("rank1", "rank-1"), ("rank5", "rank-5"), ("mAP", "mAP"))
METHOD_SPECS = {"mocov2": ("mocov2", "off"), "mocov2+synth": ("mocov2", "on"),
                "simsiam": ("simsiam", "off"), "simsiam+synth": ("simsiam", "on")}
# METHOD.md, "The paper's headline numbers" (ResNet-50, 100 epochs): linear top-1 / rank-1, %.
PAPER = {
    "cub": {"mocov2": (63.98, 39.72), "mocov2+synth": (66.17, 42.06), "simsiam": (46.75, 16.24),
            "simsiam+synth": (57.80, 24.67)},
    "cars": {"mocov2": (62.02, 30.51), "mocov2+synth": (65.60, 35.81), "simsiam": (45.72, 12.45),
             "simsiam+synth": (53.63, 19.72)},
    "aircraft": {"mocov2": (51.13, 30.02), "mocov2+synth": (55.28, 33.27), "simsiam": (38.52, 18.49),
                 "simsiam+synth": (47.50, 24.56)},
}
# Keys that do not change what a run computes: a finished run with only these different is reused.
# Not --data-root: for --dataset folder it is the dataset itself (a moved official set retrains).
RUN_ONLY = {"output_dir", "stage", "resume", "resume_from", "device", "workers", "log_every", "keep_checkpoints",
            "checkpoint_every", "download", "gc_every"}


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    """(metric key, header) of the table: a linear top-1 per label fraction the runs have in
    common (--probe-fractions), largest first, then retrieval."""
    common = set.intersection(*(set(r["metrics"]) for r in rows)) if rows else set()
    fractions = sorted((int(k.split("@")[1]) for k in common if k.startswith("linear_top1@")), reverse=True)
    return [(f"linear_top1@{f}", f"linear {f} %") for f in fractions] + [kv for kv in RETRIEVAL if kv[0] in common]


def reusable(result: dict, cfg: dict) -> bool:
    """A finished run of the same experiment: trained and evaluated here (--stage all, its own
    checkpoint), not a lone stage whose final_metrics.json holds no table or another checkpoint's."""
    saved = result.get("config", {})
    return ("trained" in (result.get("metrics") or {}) and saved.get("stage", "all") == "all"
            and not saved.get("resume_from") and _same(saved, cfg))


def plan(methods: list[str], noises: list[str]) -> list[tuple[str, str, str, str]]:
    """[(name, method, synth, noise)]: Table 1's methods, then Table 4's noise ablations of
    MoCo v2 + synth (the `both` run is shared)."""
    runs = []
    for m in methods:
        if m not in METHOD_SPECS:
            raise ValueError(f"--methods: {m!r} is not one of {', '.join(METHOD_SPECS)}")
        method, synth = METHOD_SPECS[m]
        runs.append((m, method, synth, "both"))
    for n in noises:
        if n != "both":
            runs.append((f"mocov2+synth/{n}", "mocov2", "on", n))
    return runs


def _same(saved: dict, cfg: dict) -> bool:
    """Same experiment; an option added to fastsynth after the saved run counts as its default."""
    import dataclasses

    from fastsynth.config import Config
    defaults = {f.name: f.default for f in dataclasses.fields(Config)}
    for k, v in cfg.items():
        if k in RUN_ONLY:
            continue
        if saved.get(k, defaults.get(k)) != v:
            return False
    return all(k in cfg or k in RUN_ONLY for k in saved)


def run_all(args, train_argv: list[str]) -> list[dict]:
    from fastsynth import train
    from fastsynth.config import from_args
    rows = []
    for name, method, synth, noise in plan(args.methods, args.noise):
        folder = os.path.join(args.output_dir, name.replace("/", "-"))
        cfg = from_args([*train_argv, "--method", method, "--synth", synth, "--noise", noise, "--output-dir", folder])
        done = os.path.join(folder, "final_metrics.json")
        if os.path.isfile(done) and reusable(json.load(open(done)), cfg.to_dict()):
            print(f"[compare] {name}: reusing {folder}")
            result = json.load(open(done))
        else:
            print(f"[compare] {name}: training in {folder}")
            result = train.run(cfg)
            if result.get("stopped"):
                raise SystemExit(result.get("exit_code", 0))
        base_name, base = next(((k, v) for k, v in result["metrics"].items() if k != "trained"), (None, None))
        rows.append({"name": name, "run_dir": folder, "noise": noise, "config": result["config"],
                     "metrics": result["metrics"]["trained"], "random_init": base, "baseline": base_name})
    return rows


def _table(rows: list[dict], paper: dict | None, with_run: bool = True) -> list[str]:
    cols = columns(rows)
    head = ["run", *(h for _, h in cols)] + (["paper linear / rank-1"] if paper else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{100 * r['metrics'][k]:.2f}" for k, _ in cols]
        name = f"[{r['name']}]({os.path.basename(r['run_dir'])}/)" if with_run else r["name"]
        extra = []
        if paper:
            p = paper.get(r["name"])
            extra = [f"{p[0]:.2f} / {p[1]:.2f}" if p else "-"]
        lines.append("| " + " | ".join([name, *cells, *extra]) + " |")
    return lines


def figures(rows: list[dict], out: str, n_attention: int = 8) -> dict:
    """Per run: training curves, bank variance (synth runs), test-feature embedding, triplets;
    across runs: Grad-CAM attention of the same test images (paper Fig. 3)."""
    from fastsynth import figures as figs
    from fastsynth.attention import save_attention, ssl_gradcam
    from fastsynth.eval import extract_features, file_digest
    made, cams, images = {}, {}, None
    for r in rows:
        tag = r["name"].replace("/", "-")
        items = []
        try:
            figs.save_curves(os.path.join(r["run_dir"], "metrics.jsonl"), os.path.join(out, f"{tag}-curves.png"))
            items.append(f"{tag}-curves.png")
            model, cfg, splits, device, ckpt = _load_run(r)
            if cfg.synth == "on":
                figs.save_variance(ckpt["model"]["synth.bank.var"], cfg.lam, os.path.join(out, f"{tag}-variance.png"))
                items.append(f"{tag}-variance.png")
            cache = (os.path.join(r["run_dir"], "features"), file_digest(os.path.join(r["run_dir"], "last.pt")))
            feats, labels = extract_features(model.encoder, splits.test, cfg, device, "embedding", cache)
            figs.save_embedding(feats, labels, os.path.join(out, f"{tag}-embedding.png"), seed=cfg.seed)
            items.append(f"{tag}-embedding.png")
            if "/" not in r["name"]:  # Table 1 runs: the attention figure compares methods
                if images is None:
                    images = _attention_images(splits, cfg, n_attention)
                cams[r["name"]] = ssl_gradcam(model, images.to(device)).cpu()
        except Exception as e:  # noqa: BLE001 - a missing figure must not lose the tables
            print(f"[compare] {r['name']}: figure skipped ({type(e).__name__}: {e})")
        if os.path.isfile(os.path.join(r["run_dir"], "triplets.png")):
            items.append(os.path.join(os.path.basename(r["run_dir"]), "triplets.png"))
        made[r["name"]] = items
    if cams:
        save_attention(images, cams, os.path.join(out, "attention.png"))
        made["Grad-CAM attention, SSL loss (Fig. 3)"] = ["attention.png"]
    return made


def _load_run(row: dict):
    from fastsynth import checkpoint
    from fastsynth.config import from_dict
    from fastsynth.data.datasets import build_dataset
    from fastsynth.data.scan import clean_splits
    from fastsynth.engine import resolve_device
    from fastsynth.model import SynthSSL
    ckpt = checkpoint.load(os.path.join(row["run_dir"], "last.pt"))
    cfg = from_dict(row["config"])
    cfg.weights = None  # the checkpoint carries the weights
    device = resolve_device(cfg.device)
    model = SynthSSL(cfg)
    checkpoint.load_into(model, ckpt["model"], f"{row['run_dir']}/last.pt (model)")
    splits = clean_splits(build_dataset(cfg.dataset, cfg.data_root, False, cfg.seed), cfg.max_bad_fraction,
                          os.path.join(row["run_dir"], "bad_files.txt"))
    return model.to(device), cfg, splits, device, ckpt


def _attention_images(splits, cfg, n: int):
    """The first image of each of the first n test classes (evaluation view): the same images
    for every model."""
    import torch
    from fastsynth.data.loaders import load_rgb
    from fastsynth.data.transforms import evaluation
    seen, picks = set(), []
    for path, y in zip(splits.test.paths, splits.test.labels):
        if y not in seen:
            seen.add(y)
            picks.append(path)
        if len(picks) == n:
            break
    t = evaluation(cfg.image_size)
    return torch.stack([t(load_rgb(p)) for p in picks])


def write_report(rows: list[dict], out: str, dataset: str, made: dict) -> str:
    table1 = [r for r in rows if "/" not in r["name"]]
    table4 = [r for r in rows if r["config"]["method"] == "mocov2" and r["config"]["synth"] == "on"]
    cfg = rows[0]["config"]
    budget = (f"preset {cfg['preset']}, {cfg['arch']} at {cfg['image_size']} px, batch {cfg['batch_size']}, "
              f"{cfg['epochs']} SSL epochs, {cfg['warmup_epochs']} warm-up epochs, seed {cfg['seed']}"
              + (f", at most {cfg['max_steps']} steps per stage" if cfg.get("max_steps") else ""))
    paper = PAPER.get(dataset)
    lines = [f"# fastsynth comparison: {dataset}", "", f"Budget (every run): {budget}.",
             "Numbers are percentages on the test split; each row links the run folder it came from.", "",
             "## Table 1 layout: classification (linear probe) and retrieval", "", *_table(table1, paper)]
    base = rows[0].get("random_init")
    if base:
        what = ("Random-initialised encoder" if rows[0].get("baseline", "random_init") == "random_init"
                else "The encoder at its initial weights (--weights)")
        lines += ["", f"{what} (same evaluation, the floor a method must beat): "
                  + ", ".join(f"{h} {100 * base[k]:.2f}" for k, h in columns([{"metrics": base}])) + "."]
    if paper:
        lines += ["", "The paper's column: ResNet-50, 100 epochs (METHOD.md), not this budget."]
    if len(table4) > 1:
        lines += ["", "## Table 4 layout: noise ablations of MoCo v2 + synthesized pairs", "",
                  *_table([dict(r, name=f"noise={r['noise']}") for r in table4], None, with_run=False)]
        lines += [f"- noise={r['noise']}: run `{r['run_dir']}`" for r in table4]
    lines += ["", "## Figures", ""]
    for name, items in made.items():
        lines += [f"### {name}", ""] + [f"![{os.path.basename(i)}]({i})" for i in items] + [""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump({"dataset": dataset, "budget": budget, "rows": rows, "paper": paper, "figures": made}, fh,
                  indent=2, default=str)
    return path


def main(argv=None) -> int:
    from fastsynth.checkpoint import CheckpointError
    from fastsynth.config import ConfigError
    from fastsynth.data.base import DatasetError
    from fastsynth.guard import TrainingError
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    p.add_argument("--methods", default="mocov2,mocov2+synth",
                   help=f"comma-separated, from {', '.join(METHOD_SPECS)}")
    p.add_argument("--noise", default="both", help="noise ablations of mocov2+synth (Table 4): "
                   "comma-separated from both, gradcam, lowvar, random, none")
    p.add_argument("--output-dir", default="runs/compare", help="one folder per run, report.md and report.json")
    p.add_argument("--no-figures", action="store_true", help="tables only")
    args, train_argv = p.parse_known_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.noise = [n.strip() for n in args.noise.split(",") if n.strip()]
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        rows = run_all(args, train_argv)
        made = {} if args.no_figures else figures(rows, args.output_dir)
        path = write_report(rows, args.output_dir, rows[0]["config"]["dataset"], made)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(open(path).read())
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
