"""Evaluation results -> Markdown / CSV / JSON tables, and the merge into one comparison table.

One evaluation run is a `Result` (method, dataset, checkpoint, sampler, steps, metrics, wall time, plus
seed / git commit / package versions), saved as JSON with `Result.save`. `results_table` lists runs one
per row; `merge_results` reads several result files and builds the paper-style comparison (rows:
methods, columns: PSNR / SSIM / LPIPS / FID per dataset, as in 3DiM's Table 1)::

    table = merge_results([Path("runs/3dim_cars.json"), Path("runs/dfm_cars.json")])
    print(table.to_markdown()); table.save("results/comparison")   # .md, .csv, .json
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import io
import json
import math
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = [
    "Result",
    "Table",
    "TableError",
    "collect_environment",
    "results_table",
    "comparison_table",
    "load_results",
    "merge_results",
]

# Display name, arrow and decimals of each known metric (others print with 4 significant digits).
METRIC_FORMAT: dict[str, tuple[str, str, int]] = {
    "psnr": ("PSNR", "↑", 2),
    "ssim": ("SSIM", "↑", 3),
    "lpips": ("LPIPS", "↓", 3),
    "fid": ("FID", "↓", 2),
    "kid": ("KID", "↓", 4),
    "kid_std": ("KID std", "", 4),
    "consistency_psnr": ("3D-cons. PSNR", "↑", 2),
    "consistency_ssim": ("3D-cons. SSIM", "↑", 3),
    "num_images": ("images", "", 0),
}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fid": False, "kid": False,
                    "consistency_psnr": True, "consistency_ssim": True}  # fmt: skip
BASE_COLUMNS = ("method", "dataset", "checkpoint", "sampler", "steps")
DEFAULT_COMPARISON_METRICS = ("psnr", "ssim", "lpips", "fid")


class TableError(ValueError):
    """A result file is malformed, or results collide in a table."""


def collect_environment() -> dict[str, Any]:
    """Git commit of the working directory (if any) and versions of the packages that shape the numbers."""
    versions: dict[str, str] = {"python": platform.python_version()}
    for dist in ("genvs", "torch", "torchvision", "lightning", "torchmetrics", "torch-fidelity", "lpips", "diffusers"):
        try:  # installed metadata: no heavy imports
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            if dist == "genvs":  # running from a source checkout that is not pip-installed
                from genvs import __version__

                versions[dist] = __version__
    commit = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            commit = out.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
            if dirty.returncode == 0 and dirty.stdout.strip():
                commit += "-dirty"
    except Exception:
        pass
    return {"commit": commit, "versions": versions}


@dataclass
class Result:
    """One evaluation run: a method's metrics on one dataset."""

    method: str
    dataset: str
    metrics: dict[str, float]
    checkpoint: str = ""
    sampler: str = ""
    steps: int | None = None
    wall_time_s: float | None = None
    seed: int | None = None
    commit: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # anything else: config, notes, protocol, date

    @classmethod
    def create(cls, method: str, dataset: str, metrics: Mapping[str, float], **kwargs) -> "Result":
        """Like the constructor, but fills ``commit``/``versions`` from `collect_environment` and the date."""
        env = collect_environment()
        kwargs.setdefault("commit", env["commit"])
        kwargs.setdefault("versions", env["versions"])
        meta = dict(kwargs.pop("meta", {}) or {})
        meta.setdefault("date", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        return cls(method=method, dataset=dataset, metrics={k: float(v) for k, v in metrics.items()}, meta=meta, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "Result":
        missing = [k for k in ("method", "dataset", "metrics") if k not in d]
        if missing:
            raise TableError(f"{source}: result is missing {missing}; expected keys method, dataset, metrics (+ optional ones)")
        if not isinstance(d["metrics"], Mapping):
            raise TableError(f"{source}: 'metrics' must be an object {{name: value}}, got {type(d['metrics']).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TableError(f"{source}: unknown result keys {unknown}; put extra information under 'meta'")
        kw = dict(d)
        kw["metrics"] = {k: _to_float(v, f"{source}: metric {k!r}") for k, v in d["metrics"].items()}
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        """Write this result as JSON (refuses to overwrite an existing file)."""
        path = Path(path)
        if path.exists():
            raise FileExistsError(f"{path} exists; results are never overwritten. Choose another name or delete it first.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")
        return path


def _to_float(v: Any, what: str) -> float:
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError) as e:
        raise TableError(f"{what} is not a number: {v!r}") from e


def _fmt(value: Any, metric: str | None = None) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if metric in METRIC_FORMAT:
            return f"{value:.{METRIC_FORMAT[metric][2]}f}"
        if metric == "wall_time_s":
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value)


@dataclass
class Table:
    """A table: ``columns`` (keys), ``rows`` (dicts keyed by column), display ``headers`` and ``meta``.

    ``metric_of`` maps a column to the metric it shows (for formatting and best-value highlighting).
    ``records`` keeps the full results behind the rows (written to JSON with seed/commit/versions).
    """

    columns: list[str]
    rows: list[dict[str, Any]]
    headers: dict[str, str] = field(default_factory=dict)
    metric_of: dict[str, str] = field(default_factory=dict)
    title: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    highlight_best: bool = True  # default of `to_markdown`: bold the best value of each metric column

    def header(self, col: str) -> str:
        return self.headers.get(col, col)

    def cell(self, row: Mapping[str, Any], col: str) -> str:
        return _fmt(row.get(col), self.metric_of.get(col, col))

    def best(self, col: str) -> float | None:
        m = self.metric_of.get(col)
        if m not in HIGHER_IS_BETTER:
            return None
        vals = [r[col] for r in self.rows if isinstance(r.get(col), (int, float)) and not math.isnan(r[col])]
        if len(vals) < 2:
            return None
        return max(vals) if HIGHER_IS_BETTER[m] else min(vals)

    def to_markdown(self, highlight_best: bool | None = None) -> str:
        """GitHub Markdown; with ``highlight_best`` (default: the table's) the best value of each metric
        column is bold (only when the column has at least two values)."""
        highlight_best = self.highlight_best if highlight_best is None else highlight_best
        lines = []
        if self.title:
            lines += [f"**{self.title}**", ""]
        lines.append("| " + " | ".join(self.header(c) for c in self.columns) + " |")
        align = ["---:" if c in self.metric_of or c in ("steps", "wall_time_s") else "---" for c in self.columns]
        lines.append("| " + " | ".join(align) + " |")
        bests = {c: self.best(c) for c in self.columns} if highlight_best else {}
        for r in self.rows:
            cells = []
            for c in self.columns:
                s = self.cell(r, c).replace("|", "\\|")
                b = bests.get(c)
                if b is not None and isinstance(r.get(c), (int, float)) and self.cell(r, c) == _fmt(float(b), self.metric_of.get(c, c)):
                    s = f"**{s}**"
                cells.append(s)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """CSV with the column keys as header and full-precision numbers."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for r in self.rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in self.columns])
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "columns": self.columns,
            "headers": {c: self.header(c) for c in self.columns},
            "rows": self.rows,
            "results": self.records,
            "meta": self.meta,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n"

    def save(self, prefix: str | Path, formats: Iterable[str] = ("md", "csv", "json"), overwrite: bool = False) -> dict[str, Path]:
        """Write ``prefix.md``, ``prefix.csv`` and ``prefix.json``; returns ``{format: path}``."""
        prefix = Path(prefix)
        writers = {"md": self.to_markdown, "csv": self.to_csv, "json": self.to_json}
        out = {}
        for fmt in formats:
            if fmt not in writers:
                raise ValueError(f"Unknown table format {fmt!r}; choose from {sorted(writers)}")
            path = prefix.with_name(prefix.name + "." + fmt)
            if path.exists() and not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --overwrite) or choose another prefix")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(writers[fmt]())
            out[fmt] = path
        return out


def _metric_header(metric: str, prefix: str = "") -> str:
    name, arrow, _ = METRIC_FORMAT.get(metric, (metric, "", 4))
    return f"{prefix}{name}{arrow}"


def results_table(results: Sequence[Result], metrics: Sequence[str] | None = None, title: str = "") -> Table:
    """One row per run: method, dataset, checkpoint, sampler, steps, each metric, wall time.

    ``metrics`` defaults to every metric any result reports, known ones first in a fixed order."""
    if metrics is None:
        seen: dict[str, None] = {}
        for r in results:
            seen.update(dict.fromkeys(r.metrics))
        order = list(METRIC_FORMAT)
        metrics = sorted(seen, key=lambda m: (order.index(m) if m in order else len(order), m))
    metrics = list(metrics)
    columns = [*BASE_COLUMNS, *metrics, "wall_time_s"]
    headers = {c: c for c in BASE_COLUMNS} | {m: _metric_header(m) for m in metrics} | {"wall_time_s": "wall time (s)"}
    rows = []
    for r in results:
        row: dict[str, Any] = {c: getattr(r, c) for c in BASE_COLUMNS}
        row.update({m: r.metrics.get(m) for m in metrics})
        row["wall_time_s"] = r.wall_time_s
        rows.append(row)
    return Table(
        columns=columns,
        rows=rows,
        headers=headers,
        metric_of={m: m for m in metrics},
        title=title,
        records=[r.to_dict() for r in results],
        highlight_best=False,  # rows mix datasets: a column-wide "best" would compare across them
    )


def comparison_table(
    results: Sequence[Result],
    metrics: Sequence[str] = DEFAULT_COMPARISON_METRICS,
    datasets: Sequence[str] | None = None,
    row_by: Sequence[str] = ("method",),
    sources: Sequence[str] | None = None,
    title: str = "",
) -> Table:
    """Paper-style comparison: one row per method (``row_by`` fields), columns ``<dataset> <METRIC>``.

    Columns are only made for metrics that at least one result on that dataset reports; missing cells
    are empty. Two results for the same row and dataset raise `TableError` (name both sources); add
    ``"sampler"``, ``"steps"`` or ``"checkpoint"`` to ``row_by`` to keep them apart.
    """
    sources = list(sources) if sources is not None else [f"result {i}" for i in range(len(results))]
    datasets = list(datasets) if datasets is not None else list(dict.fromkeys(r.dataset for r in results))
    row_keys: dict[tuple, dict[str, Any]] = {}
    origin: dict[tuple, str] = {}
    for r, src in zip(results, sources):
        if r.dataset not in datasets:
            continue
        key = tuple(getattr(r, f) for f in row_by)
        row = row_keys.setdefault(key, {f: getattr(r, f) for f in row_by})
        cell = (key, r.dataset)
        if cell in origin:
            raise TableError(
                f"Two results for {dict(zip(row_by, key))} on dataset {r.dataset!r}: {origin[cell]} and {src}. "
                f"Pass row_by with more fields (e.g. ('method', 'sampler', 'steps')) or drop one file."
            )
        origin[cell] = src
        for m in metrics:
            if m in r.metrics:
                row[f"{r.dataset}/{m}"] = r.metrics[m]
    columns = list(row_by)
    headers = {f: f for f in row_by}
    metric_of = {}
    for ds in datasets:
        for m in metrics:
            col = f"{ds}/{m}"
            if any(col in row for row in row_keys.values()):
                columns.append(col)
                headers[col] = _metric_header(m, prefix=f"{ds} ")
                metric_of[col] = m
    return Table(
        columns=columns,
        rows=list(row_keys.values()),
        headers=headers,
        metric_of=metric_of,
        title=title,
        records=[dict(r.to_dict(), source=s) for r, s in zip(results, sources)],
        meta={"datasets": datasets, "metrics": list(metrics), "row_by": list(row_by)},
    )


def load_results(paths: Sequence[str | Path]) -> tuple[list[Result], list[str]]:
    """Read result JSON files (a file holds one result object, a list of them, or a saved table's
    ``{"results": [...]}``); a directory contributes its ``*.json`` files in sorted order.

    Returns the results and, for each, the file it came from."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise TableError(f"{p} is a directory without *.json result files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise TableError(f"Result file {p} does not exist")
    results, sources = [], []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise TableError(f"{f} is not valid JSON ({e}); expected a result written by genvs test / Result.save") from e
        if isinstance(data, Mapping) and "results" in data and "method" not in data:
            items = data["results"]
        elif isinstance(data, list):
            items = data
        else:
            items = [data]
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise TableError(f"{f}: entry {i} is not a result object")
            item = {k: v for k, v in item.items() if k != "source"}
            results.append(Result.from_dict(item, source=f"{f}" + (f"[{i}]" if len(items) > 1 else "")))
            sources.append(str(f))
    return results, sources


def merge_results(
    paths: Sequence[str | Path],
    metrics: Sequence[str] = DEFAULT_COMPARISON_METRICS,
    datasets: Sequence[str] | None = None,
    row_by: Sequence[str] = ("method",),
    title: str = "",
) -> Table:
    """Combine result JSON files into one comparison `Table` (rows: methods, columns: metric per dataset)."""
    results, sources = load_results(paths)
    return comparison_table(results, metrics=metrics, datasets=datasets, row_by=row_by, sources=sources, title=title)
