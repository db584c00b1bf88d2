"""Quality against speed of fast samplers for a trained checkpoint: PSNR / SSIM (+ LPIPS / FID / KID where
their weights are on this machine) and wall time per generated view, for

- ``paper``: the method's paper sampler (the class default of its ``sampler`` argument: 3DiM ancestral
  DDPM 256 steps, DFM / warping DDIM 50, MVDiffusion DDIM 50 on SD's "leading" spacing);
- ``ddim``: genvs' fixed `DDIMScheduler`, "trailing" timestep spacing, deterministic (eta 0);
- ``dpmpp``: diffusers' ``DPMSolverMultistepScheduler`` (``algorithm_type="dpmsolver++"``, 2nd order),
  "trailing" spacing,

each at every ``--steps`` (the paper sampler at its own step count, ``--paper-steps``), and the ``copy_input``
baseline (`genvs.methods.baselines.CopyInput`) on the same views as the last row. Only the scheduler
and the step count change between rows: guidance scale (``--guidance-scales`` for a sweep) and noise
temperature are the checkpoint's, the
method's sampling procedure (3DiM's stochastic conditioning, DFM's dynamic thresholding, the warping
model's x0 guidance, MVDiffusion's joint ring) is the model's own, and every row starts from the same
seeds. x0 clipping follows the checkpoint's scheduler (``clip_sample``; DPM-Solver++ gets the equivalent
``thresholding`` with ``sample_max_value = 1``), so latent-space models are never clipped.

    python benchmarks/samplers.py --config configs/3dim_toy.yaml \\
        --ckpt runs/3dim_toy/lightning_logs/version_0/checkpoints/last.ckpt --num-scenes 4 --num-targets 4
    python benchmarks/samplers.py --config configs/dfm_toy.yaml --config configs/dfm_toy_cars.yaml \\
        --ckpt runs/dfm_toy_cars/lightning_logs/version_0/checkpoints/last.ckpt --num-scenes 16 --num-targets 4

``--config`` repeats for overlays, merged in order as ``genvs fit --config A --config B`` merges them.

Generation is `BaseNVSModel.generate` (EMA weights, per-batch seeds) on the config's test split with the
protocol ``input_views`` / ``--num-scenes`` / ``--num-targets``; metrics are `genvs.eval.metrics.NVSMetrics`.
``--precision`` (default ``auto``: what ``genvs test`` picks for the device) runs it under bf16 autocast
with a channels_last denoiser for ``bf16-mixed``, as Lightning runs ``genvs test``; given several
precisions (``--precision 32-true bf16-mixed``), every row runs at each, on the same views and seeds, and
the table gains a precision column: what bf16 costs in quality, next to what it saves in time.
Writes ``benchmarks/results/samplers_<method>_<dataset>.json`` and ``.md`` and the samplers block of
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _bench_run():
    """benchmarks/run.py as a module (shared helpers: README blocks, machine description)."""
    import importlib.util

    name = "genvs_benchmarks_run"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]

SAMPLERS = ("paper", "ddim", "dpmpp")
OPTIONAL_METRICS = ("lpips", "fid", "kid")


def _portable(path: str) -> str:
    """``path`` as recorded in results: relative to the working directory, else its run-relative tail
    (``<run>/.../checkpoints/<file>``), so committed results never name a machine's folders."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(*p.parts[-5:]))


def method_class(config: dict, ckpt: dict) -> type:
    """The model class: the checkpoint's recorded method, else the config's ``model.class_path``."""
    import importlib

    from genvs.core.registry import resolve_method

    path = (ckpt.get("genvs") or {}).get("method")
    if path is None:
        model = config.get("model")
        path = model if isinstance(model, str) else (model or {}).get("class_path")
        if path is None:
            raise ValueError("neither the checkpoint nor the config names the model class (model.class_path)")
        if "." not in path:
            path = resolve_method(path)
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def paper_sampler_spec(cls: type) -> dict:
    """The default of ``cls``'s ``sampler`` argument (the paper's sampler, as a spec)."""
    param = inspect.signature(cls.__init__).parameters.get("sampler")
    if param is None or not isinstance(param.default, dict):
        raise ValueError(f"{cls.__name__} has no default `sampler` spec to take the paper's sampler from")
    return param.default


def make_samplers(model, names: list[str], steps: list[int], paper_steps: int | None,
                  guidance_scales: list[float] | None = None) -> list[tuple[str, Any]]:
    """``(name, Sampler)`` rows: the paper's sampler at its step count, then each fast sampler at ``steps``;
    all of them at each of ``guidance_scales`` (default: the checkpoint's) and the checkpoint's noise
    temperature."""
    from genvs.core.config import build, spec
    from genvs.core.samplers import DDIMScheduler, Sampler

    base = model.sampler
    keep = dict(guidance_scale=base.guidance_scale, noise_temperature=base.noise_temperature)
    clip = bool(base.scheduler.config.get("clip_sample", True))
    rows = []
    for name in names:
        if name == "paper":
            paper = build(paper_sampler_spec(type(model)), Sampler, "sampler")
            rows.append(("paper", paper.replace(num_steps=paper_steps or paper.num_steps, **keep)))
        elif name == "ddim":
            for n in steps:
                sched = spec(DDIMScheduler, timestep_spacing="trailing", clip_sample=clip)
                rows.append(("ddim", Sampler(sched, num_steps=n, eta=0.0, **keep)))
        elif name == "dpmpp":
            for n in steps:
                sched = spec("diffusers.DPMSolverMultistepScheduler", algorithm_type="dpmsolver++", solver_order=2,
                             timestep_spacing="trailing", thresholding=clip, sample_max_value=1.0)
                rows.append(("dpmpp", Sampler(sched, num_steps=n, **keep)))
        else:
            raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}")
    if guidance_scales is None:
        return rows
    return [(name, s.replace(guidance_scale=g)) for g in guidance_scales for name, s in rows]


def available_metrics(requested: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """PSNR/SSIM plus the optional metrics whose weights are on this machine; ``{metric: reason}`` for the
    ones left out (`MissingWeightsError` message)."""
    from genvs.eval.metrics import MissingWeightsError, NVSMetrics

    names, missing = ["psnr", "ssim"], {}
    for m in requested if requested is not None else OPTIONAL_METRICS:
        if m in names:
            continue
        try:
            NVSMetrics(metrics=[m])
            names.append(m)
        except MissingWeightsError as e:
            missing[m] = _without_machine_paths(str(e).splitlines()[0])
    return names, missing


def _without_machine_paths(text: str) -> str:
    """``text`` with this checkout's folder written ``<repo>`` and the home folder ``~`` (results are committed)."""
    return text.replace(str(ROOT), "<repo>").replace(str(Path.home()), "~")


def merged_config(paths: list[str]) -> dict:
    """The YAML files merged in order, later keys over earlier ones, nested sections key by key (a section
    naming another ``class_path`` replaces the earlier one whole), as LightningCLI merges ``--config``s."""
    import yaml

    def merge(base: Any, over: Any) -> Any:
        if not (isinstance(base, dict) and isinstance(over, dict)):
            return over
        if "class_path" in over and over["class_path"] != base.get("class_path"):
            return over
        return {**base, **{k: merge(base[k], v) if k in base else v for k, v in over.items()}}

    config: dict = {}
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def build_datamodule(config: dict, args) -> Any:
    """The config's datamodule on the test split: ``--num-scenes`` scenes, ``--num-targets`` targets each
    (whole rings for panorama datamodules), no worker processes."""
    import copy
    import importlib

    from genvs.core.config import build
    from genvs.data.module import NVSDataModule

    data = copy.deepcopy(config.get("data"))
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"{' + '.join(args.config)}: needs a `data:` section with class_path / init_args")
    init = data.setdefault("init_args", {})
    if args.data_root:
        init["root"] = args.data_root
    init["num_workers"] = 0
    if args.batch_size:
        init["batch_size"] = args.batch_size
    module, _, name = data["class_path"].rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    if "num_test_scenes" in params:  # whole-ring datamodules (panoramas): every view of the first scenes
        init["num_test_scenes"] = args.num_scenes
    else:  # view protocols (`genvs.data.EvalProtocol`)
        protocol = dict(init.get("test_protocol") or {})
        if args.input_views is not None:
            protocol["input_views"] = args.input_views
        protocol.setdefault("input_views", [64])
        protocol["num_scenes"] = args.num_scenes
        protocol["num_targets"] = args.num_targets
        init["test_protocol"] = protocol
    dm = build(data, NVSDataModule, "data")
    dm.prepare_data()
    dm.setup("test")
    return dm


def evaluate(model, loader, sampler, metrics: list[str], device: str, precision: str = "32-true") -> dict[str, Any]:
    """Generate every test batch with ``sampler`` (under bf16 autocast for ``bf16-mixed``, as Lightning runs
    ``genvs test``) and score it; wall time of generation only. ``psnr_se`` is
    the standard error of the mean PSNR over views (their spread, not the sampler's seed noise alone; None for
    one view)."""
    import torch

    from genvs.eval.metrics import NVSMetrics, psnr_per_image

    scorer = NVSMetrics(metrics=metrics).to(device)
    seconds, views, psnrs, overlaps = 0.0, 0, [], []
    for i, batch in enumerate(loader):
        batch = batch.to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            _, pred = model.generate(batch, i, sampler=sampler)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t
        views += pred.B * pred.V
        scorer.update(pred.images.float(), batch.targets.images.float())
        psnrs.append(psnr_per_image((pred.images + 1) / 2, (batch.targets.images + 1) / 2).flatten().cpu())
        overlaps += _ring_overlaps(pred)
    scores = scorer.compute()
    if overlaps:  # panorama rings: how well neighbouring generated views agree where they overlap
        scores["overlap_psnr"] = float(torch.tensor(overlaps).nanmean())
    psnr = torch.cat(psnrs).double()
    se = float(psnr.std() / math.sqrt(len(psnr))) if len(psnr) > 1 else None
    return {**scores, "psnr_se": se, "seconds_per_view": seconds / max(views, 1), "num_views": views,
            "generation_s": seconds, "notes": list(scorer.notes)}


def _ring_overlaps(pred) -> list[float]:
    """Per-scene `ring_overlap_psnr` of generated views that share a camera centre (none otherwise)."""
    from genvs.eval.consistency import ring_overlap_psnr, shares_centre

    if pred.V < 2 or not all(shares_centre(pred.c2w[b]) for b in range(pred.B)):
        return []
    return [float(ring_overlap_psnr(pred.images[b], pred.K[b], pred.c2w[b]).nanmean()) for b in range(pred.B)]


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def markdown(data: dict) -> str:
    cols = ["psnr", "ssim"] + [m for m in (*OPTIONAL_METRICS, "overlap_psnr") if any(m in r for r in data["rows"])]
    head = {"psnr": "PSNR ↑", "ssim": "SSIM ↑", "lpips": "LPIPS ↓", "fid": "FID ↓", "kid": "KID ↓",
            "overlap_psnr": "overlap PSNR ↑"}
    lines = [
        f"**{data['method']} on {data['dataset']}** ({_n(data['num_views'], 'view')} of {_n(data['num_scenes'], 'scene')}, "
        f"checkpoint `{data['checkpoint']}`, {data['device']}{', ' + data['precision'] if isinstance(data.get('precision'), str) else ''}, {data['date']}; PSNR ± its standard error over views)"
        + (f"; not measured (no local weights): {', '.join(sorted(data['missing_metrics']))}" if data["missing_metrics"] else ""),
        "",
        "| sampler | scheduler | steps | guidance | " + " | ".join(head[c] for c in cols) + " | s / view | faster than paper |",
        "|---|---|---|---|" + "---|" * len(cols) + "---|---|",
    ]
    precisions = list(dict.fromkeys(r.get("precision", data.get("precision")) for r in data["rows"]))
    by_precision = len(precisions) > 1
    if by_precision:
        lines[2] = lines[2].replace("| guidance |", "| guidance | precision |")
        lines[3] += "---|"

    def key(r: dict) -> tuple:
        return r.get("guidance_scale"), r.get("precision", data.get("precision"))

    papers = {key(r): r for r in data["rows"] if r["sampler"] == "paper"}

    def cells(r: dict) -> list[str]:
        out = []
        for c in cols:
            if c not in r:
                out.append("n/a")
                continue
            text = f"{r[c]:.{2 if c in ('psnr', 'overlap_psnr') else 3 if c != 'kid' else 4}f}"
            if c == "psnr" and isinstance(r.get("psnr_se"), float) and math.isfinite(r["psnr_se"]):
                text += f" ± {r['psnr_se']:.2f}"
            out.append(text)
        return out

    for r in data["rows"]:
        ref = papers.get(key(r))  # the paper sampler at the same guidance scale and precision
        speed = f"{ref['seconds_per_view'] / r['seconds_per_view']:.1f}x" if ref else "–"
        scale = f"{r['guidance_scale']:g}" if isinstance(r.get("guidance_scale"), (int, float)) else "–"
        if by_precision:
            scale += f" | {key(r)[1]}"
        lines.append(f"| {r['sampler']} | {r['scheduler']} | {r['steps']} | {scale} | "
                     + " | ".join(cells(r)) + f" | {r['seconds_per_view']:.2f} | {speed} |")
    if data.get("baseline"):  # what no sampler should fall below
        lines.append("| copy the input view (baseline) | – | 0 | – | " + "– | " * by_precision + " | ".join(cells(data["baseline"])) + " | – | – |")
    if "real_overlap_psnr" in data:  # the test rings themselves: the overlap PSNR of perfectly consistent views
        real = ["–"] * (len(cols) - 1) + [f"{data['real_overlap_psnr']:.2f}"]
        lines.append("| the real views (reference) | – | – | – | " + "– | " * by_precision + " | ".join(real) + " | – | – |")
    return "\n".join(lines)


def write_readme(readme: Path | None = None) -> None:
    """Regenerate the samplers block of benchmarks/README.md from every ``results/samplers_*.json``."""
    readme = readme or HERE / "README.md"
    blocks = []
    for f in sorted(RESULTS.glob("samplers_*.json")):
        data = json.loads(f.read_text())
        if data.get("development_run"):
            continue
        blocks.append(f"`results/{f.name}`: " + markdown(data))
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    readme.write_text(_bench_run().replace_block(text, "samplers", "\n\n".join(blocks) or "(no results yet)"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, action="append",
                    help="the run's config YAML (its data section gives the test set); repeat it for overlays, "
                         "merged in order as `genvs fit --config A --config B` does")
    ap.add_argument("--ckpt", required=True, help="a genvs checkpoint (.ckpt) of that run")
    ap.add_argument("--num-scenes", type=int, default=4, help="test scenes (first N)")
    ap.add_argument("--num-targets", type=int, default=4, help="target views per scene")
    ap.add_argument("--input-views", type=int, nargs="+", default=None,
                    help="conditioning views (default: the config's test_protocol, else [64] as SRN)")
    ap.add_argument("--steps", type=int, nargs="+", default=[16, 32, 64, 256], help="steps of the fast samplers")
    ap.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    ap.add_argument("--paper-steps", type=int, default=None, help="steps of the paper sampler (default: its own)")
    ap.add_argument("--guidance-scales", type=float, nargs="+", default=None,
                    help="classifier-free guidance scales; every sampler row at each (default: the checkpoint's)")
    ap.add_argument("--metrics", nargs="*", default=None,
                    help=f"optional metrics among {OPTIONAL_METRICS} (default: every one whose weights are present)")
    ap.add_argument("--data-root", default=None, help="override data.init_args.root")
    ap.add_argument("--batch-size", type=int, default=None, help="override data.init_args.batch_size")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--precision", nargs="+", default=["auto"], choices=["auto", "32-true", "bf16-mixed"],
                    help="auto: genvs' default for the device, as genvs test picks it (bf16-mixed on GPUs with bf16 "
                         "and CPUs with AVX-512-BF16 or AMX, else 32-true); several: every row at each")
    ap.add_argument("--out", default=None, help="results JSON (default results/samplers_<method>_<dataset>.json)")
    ap.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    args = ap.parse_args(argv)

    import torch

    from genvs.callbacks import check_checkpoint
    from genvs.cli import default_precision
    from genvs.core.config import to_spec

    for flag, n in (("--num-scenes", args.num_scenes), ("--num-targets", args.num_targets)):
        if n < 1:
            ap.error(f"{flag} must be at least 1, got {n}")
    if any(s < 1 for s in args.steps):
        ap.error(f"--steps must be positive, got {args.steps}")
    for path in args.config:
        if not Path(path).is_file():
            ap.error(f"--config {path}: no such file")
    ckpt_path = check_checkpoint(args.ckpt)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = merged_config(args.config)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    cls = method_class(config, ckpt)
    del ckpt
    model = cls.load_from_checkpoint(ckpt_path, map_location=device, weights_only=True).to(device).eval()
    precisions = list(dict.fromkeys(default_precision(torch.device(device).type) if p == "auto" else p
                                    for p in args.precision))
    if getattr(model, "channels_last", False):  # as the model's setup does under genvs test
        model.denoiser.to(memory_format=torch.channels_last)
    dm = build_datamodule(config, args)
    loader = dm.test_dataloader()
    metrics, missing = available_metrics(args.metrics)
    rows = []
    samplers = make_samplers(model, args.samplers, args.steps, args.paper_steps, args.guidance_scales)
    for precision in precisions:
        for name, sampler in samplers:
            res = evaluate(model, loader, sampler, metrics, device, precision)
            row = {"sampler": name, "scheduler": type(sampler.scheduler).__name__, "steps": sampler.num_steps,
                   "guidance_scale": sampler.guidance_scale, "precision": precision,
                   "scheduler_spec": to_spec(sampler.scheduler), **res}
            rows.append(row)
            shown = ", ".join(f"{k} {row[k]:.4g}" for k in metrics if k in row)
            print(f"{name:6s} {row['scheduler']:28s} {row['steps']:4d} steps, {precision}: {shown}, "
                  f"{row['seconds_per_view']:.2f} s/view", flush=True)
    from genvs.methods.baselines import CopyInput

    baseline = None
    if next(iter(loader)).num_context > 0:  # (text-conditioned panoramas have no view to copy)
        baseline = evaluate(CopyInput().to(device).eval(), loader, None, metrics, device, precisions[0])  # the same views, copied
        print("copy_input baseline: " + ", ".join(f"{k} {baseline[k]:.4g}" for k in metrics if k in baseline), flush=True)
    real_overlaps = [o for batch in loader for o in _ring_overlaps(batch.targets)]  # what real rings score
    dataset = getattr(dm, "name", None) or type(dm).__name__.replace("DataModule", "").lower()
    data = {
        "method": cls.__name__, "dataset": dataset, "config": " + ".join(args.config), "checkpoint": _portable(args.ckpt),
        "num_scenes": args.num_scenes, "num_targets": args.num_targets, "num_views": rows[0]["num_views"] if rows else 0,
        "metrics": metrics, "missing_metrics": missing, "device": device, "precision": precisions[0] if len(precisions) == 1 else precisions, "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d"), "rows": rows, "baseline": baseline and {"method": "copy_input", **baseline},
    }
    if real_overlaps:
        data["real_overlap_psnr"] = float(torch.tensor(real_overlaps).nanmean())
    data["machine"] = _bench_run().machine()
    out = Path(args.out) if args.out else RESULTS / f"samplers_{cls.__name__.lower()}_{dataset}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(data) + "\n")
    print(markdown(data))
    if not args.no_readme:
        write_readme()
    print(f"wrote {out} and {out.with_suffix('.md')}" + ("" if args.no_readme else " and benchmarks/README.md"))
    return data


if __name__ == "__main__":
    main()
