"""Speed, memory and MFU of every method at a fixed reference configuration, as ratios in one run.

    python benchmarks/run.py                      # all methods, every variant, this machine
    python benchmarks/run.py --methods threedim --variants fp32 fp32_cl --repeats 3

For each method and *variant* (fp32 eager, fp32 channels_last, bf16 autocast + channels_last,
torch.compile, ...) one training step (forward, backward, Adam) and one denoiser evaluation at sampling
time are timed in a fresh subprocess (so peak memory and compilation do not leak between variants).
Model FLOPs per step come from torch's `FlopCounterMode`; MFU divides achieved FLOP/s by the machine's
matmul peak for the variant's dtype, measured in the same run. Every figure is also reported as a ratio
to plain fp32 eager of the same method, measured in the same run: ratios are what to compare across
machines. Results go to ``benchmarks/results/<machine>.json`` and the table in ``benchmarks/README.md``
is regenerated from all result files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"

VARIANTS = {
    "fp32": dict(dtype="fp32", channels_last=False, compile=False),
    "fp32_cl": dict(dtype="fp32", channels_last=True, compile=False),
    "bf16_cl": dict(dtype="bf16", channels_last=True, compile=False),
    "fp32_cl_compile": dict(dtype="fp32", channels_last=True, compile=True),
}


# ----------------------------------------------------------------------------- reference configs
def reference_threedim(device):
    """The speed reference of REFERENCE.md: X-UNet ch 64, ch_mult 1-2-2-4, emb_ch 1024, 2 res blocks,
    attention at 16 and 8, 64x64 images, batch 8 (pairs of frames), one Adam step."""
    import torch

    from genvs.core.cameras import intrinsics_from_fov, sphere_poses
    from genvs.core.config import spec
    from genvs.core.views import Views
    from genvs.methods.threedim import ThreeDiM, XUNet

    net = spec(XUNet, image_size=64, ch=64, ch_mult=(1, 2, 2, 4), emb_ch=1024, num_res_blocks=2,
               attn_resolutions=(16, 8), attn_heads=4, dropout=0.0)
    model = ThreeDiM(network=net)
    B, H = 8, 64
    g = torch.Generator().manual_seed(0)
    views = Views(torch.rand(B, 2, 3, H, H, generator=g) * 2 - 1, intrinsics_from_fov(52, H).expand(B, 2, 3, 3).clone(),
                  sphere_poses(2 * B, generator=g).view(B, 2, 4, 4), num_context=1)

    def sample_eval(model, views):  # one denoiser evaluation of a sampling step (CFG doubles the batch)
        pair = views.select([0, 1])
        rays = model.rays(pair.K, pair.c2w, H, H)
        lam = torch.zeros(B, device=views.device)
        mask = torch.ones(B, dtype=torch.bool, device=views.device)
        return model.denoise(pair.images[:, 0], pair.images[:, 1], lam, rays, mask)

    return model, views, sample_eval, {"evals_per_view": 2 * 256, "batch": B}


REFERENCES = {"threedim": reference_threedim}


# --------------------------------------------------------------------------------- measurement
def matmul_peak(dtype: str, device: str, n: int = 2048, seconds: float = 2.0) -> float:
    """Best achieved GFLOP/s of an n x n x n matmul in ``dtype`` (the machine's practical peak)."""
    import torch

    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    a = torch.randn(n, n, device=device, dtype=dt)
    b = torch.randn(n, n, device=device, dtype=dt)
    best, end = 0.0, time.time() + seconds
    while time.time() < end:
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def run_variant(method: str, variant: str, device: str, repeats: int) -> dict:
    """Measure one (method, variant) in this process."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    opts = VARIANTS[variant]
    torch.manual_seed(0)
    model, views, sample_eval, info = REFERENCES[method](device)
    model.channels_last = opts["channels_last"]
    model.configure_model()
    model = model.to(device)
    views = views.to(device)
    if not opts["channels_last"]:
        model.denoiser.to(memory_format=torch.contiguous_format)
    if opts["compile"]:
        model.denoiser = torch.compile(model.denoiser)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=opts["dtype"] == "bf16")

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def train_step():
        with autocast:
            loss = model.training_loss(views)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as fc:
        train_step()
    step_flops = fc.get_total_flops()
    with torch.no_grad(), autocast, FlopCounterMode(display=False) as fc_eval:
        sample_eval(model, views)
    eval_flops = fc_eval.get_total_flops()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_times, eval_times = [], []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        train_step()
        sync()
        train_times.append(time.perf_counter() - t)
    model.eval()
    with torch.no_grad(), autocast:
        sample_eval(model, views)  # warm-up
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            sample_eval(model, views)
            sync()
            eval_times.append(time.perf_counter() - t)
    step_s, eval_s = statistics.median(train_times), statistics.median(eval_times)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # bytes (Linux: ru_maxrss in KiB)
    return {
        "method": method,
        "variant": variant,
        **opts,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "batch": info["batch"],
        "train_step_s": step_s,
        "train_samples_per_s": info["batch"] / step_s,
        "train_tflop_per_step": step_flops / 1e12,
        "train_gflops": step_flops / step_s / 1e9,
        "denoiser_evals_per_s": info["batch"] / eval_s,
        "seconds_per_novel_view": info["evals_per_view"] * eval_s / info["batch"],
        "eval_gflops": eval_flops / eval_s / 1e9,
        "peak_memory_gib": peak / 2**30,
        "peak_memory_kind": "cuda max_memory_allocated" if device == "cuda" else "process max RSS",
    }


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_readme() -> None:
    """Regenerate the results table of benchmarks/README.md from every results file."""
    rows = []
    for f in sorted(RESULTS.glob("*.json")):
        data = json.loads(f.read_text())
        if "runs" not in data:
            continue
        m = data["machine"]
        where = m.get("gpu") or f"{m['cpu']} ({m['cores']} cores)"
        for r in data["runs"]:
            rows.append(
                f"| {where} | {r['method']} | {r['variant']} | {r['train_step_s']:.3f} | {r['speedup_vs_fp32']:.2f}x "
                f"| {r['train_samples_per_s']:.2f} | {r['train_gflops']:.0f} | {100 * r['mfu']:.1f}% "
                f"| {r['denoiser_evals_per_s']:.1f} | {r['seconds_per_novel_view']:.1f} | {r['peak_memory_gib']:.2f} |"
            )
    table = "\n".join([
        "| machine | method | variant | train step (s) | vs fp32 | samples/s | GFLOP/s | MFU | denoiser evals/s | s / novel view | peak mem (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    readme = HERE / "README.md"
    text = readme.read_text() if readme.exists() else "# Benchmarks\n"
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    block = f"{start}\n{table}\n{end}"
    text = text[: text.index(start)] + block + text[text.index(end) + len(end):] if start in text else text + "\n" + block + "\n"
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(REFERENCES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="results file (default results/<machine>.json)")
    ap.add_argument("--one", nargs=2, metavar=("METHOD", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.one:  # child process: one measurement, printed as JSON
        print("RESULT " + json.dumps(run_variant(*args.one, device, args.repeats)), flush=True)
        return
    peaks = {dt: matmul_peak(dt, device) for dt in ("fp32", "bf16")}
    print(f"matmul peak GFLOP/s: {peaks}", flush=True)
    runs = []
    for method in args.methods:
        base = None
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--one", method, variant, "--device", device, "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{method}/{variant} failed:\n{proc.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(line[len("RESULT "):])
            r["mfu"] = r["train_gflops"] / peaks[r["dtype"]]
            if variant == "fp32":
                base = r
            r["speedup_vs_fp32"] = base["train_step_s"] / r["train_step_s"] if base else float("nan")
            r["eval_speedup_vs_fp32"] = (r["denoiser_evals_per_s"] / base["denoiser_evals_per_s"]) if base else float("nan")
            runs.append(r)
            print(json.dumps(r), flush=True)
    info = machine()
    out = Path(args.out) if args.out else RESULTS / f"{'cuda' if device == 'cuda' else 'cpu'}-{info.get('gpu', info['cpu']).split()[0].lower()}-{info['cores']}c.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "device": device, "matmul_peak_gflops": peaks, "runs": runs,
                               "date": time.strftime("%Y-%m-%d")}, indent=1))
    write_readme()
    print(f"wrote {out} and benchmarks/README.md")


if __name__ == "__main__":
    main()
