"""The documentation site builds with ``mkdocs build --strict``: a broken link, anchor, snippet or API
reference fails the suite."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[1]


def _mkdocs(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "mkdocs", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html).replace("&quot;", '"').replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&")


def test_docs_build_strict(tmp_path):
    site = tmp_path / "site"
    proc = _mkdocs(["build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir", str(site)], ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # every page of the nav was built, the method pages written by the method authors included
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav):
        for item in nav:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            yield from pages(value) if isinstance(value, list) else [value]

    built = list(pages(config["nav"]))
    for page in ["methods/threedim.md", "methods/dfm.md", "methods/mvdiffusion.md", "methods/warping.md",
                 "data.md", "samplers.md", "add-a-method.md", "api/model.md"]:
        assert page in built, page
    for page in built:
        assert (site / page.replace(".md", ".html")).is_file(), page
    # the tutorial includes the example package's real files (snippets), not stale copies
    tutorial = _text((site / "add-a-method.html").read_text())
    model_py = (ROOT / "examples/genvs-plugin-example/genvs_plugin_example/model.py").read_text()
    assert "def training_loss(self, views: Views) -> dict[str, Tensor]:" in model_py
    assert "def training_loss(self, views: Views) -> dict[str, Tensor]:" in tutorial
    assert 'tinydiff = "genvs_plugin_example:TinyDiff"' in tutorial
    assert "--8<--" not in tutorial
    # API pages are generated from the docstrings
    api = _text((site / "api" / "model.html").read_text())
    assert "BaseNVSModel" in api and "Must implement" in api and "ema_weights" in api


def test_strict_build_fails_on_a_broken_link(tmp_path):
    """The same configuration refuses a page with a broken link and a broken anchor."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the missing page](missing.md) and [a section](other.md#nowhere).\n")
    (docs / "other.md").write_text("# Other\n")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir=str(docs), site_dir=str(tmp_path / "site"), nav=["index.md", "other.md"])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    proc = _mkdocs(["build", "--strict", "--config-file", str(tmp_path / "mkdocs.yml")], ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "missing.md" in out and "#nowhere" in out
