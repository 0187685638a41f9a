"""`dvc plots show` draws its plots with no network: the repository's DVC config points at
infra/dvc/plots.html, a page template with Vega inlined (DVC's own page loads it from a CDN).
The page is built by the real `dvc plots show`; Node.js (where present) then runs the page's
own scripts and renders every plot to SVG, as a browser would, with nothing fetched."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "infra" / "dvc" / "plots.html"

_RENDER = r"""
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const scripts = [...html.matchAll(/<script[^>]*>([\s\S]*?)<\/script>/g)].map(m => m[1]);
const libs = scripts.filter(s => !s.includes("vegaEmbed('#"));
for (const code of libs) vm.runInThisContext(code);  // UMD builds: globals, as in a page
const specs = scripts.filter(s => s.includes("vegaEmbed('#"))
  .map(s => JSON.parse(s.slice(s.indexOf("=") + 1, s.lastIndexOf(";", s.indexOf("vegaEmbed")))));
(async () => {
  const out = [];
  for (const spec of specs) {
    const view = new vega.View(vega.parse(vegaLite.compile(spec).spec), {renderer: "none"});
    const svg = await view.toSVG();
    out.push({marks: (svg.match(/<path|<line|<rect|<circle/g) || []).length, bytes: svg.length});
  }
  console.log(JSON.stringify({libs: [typeof vega, typeof vegaLite, typeof vegaEmbed], out}));
})();
"""


def _dvc(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(dvc), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=True)


def test_the_repository_config_uses_the_offline_template():
    from dvc.config import Config

    config = Config(dvc_dir=str(ROOT / ".dvc"), validate=False)
    template = (ROOT / ".dvc" / config["plots"]["html_template"]).resolve()
    assert template == TEMPLATE and template.is_file()


def test_dvc_plots_show_builds_a_page_that_needs_no_network(tmp_path):
    (tmp_path / "loss.tsv").write_text("step\tloss\n" + "".join(
        f"{i}\t{1 / (i + 1):.4f}\n" for i in range(20)))
    (tmp_path / "dvc.yaml").write_text("plots:\n  - loss.tsv:\n      x: step\n      y: loss\n")
    _dvc("init", "--no-scm", "-q", cwd=tmp_path)
    _dvc("plots", "show", "--html-template", str(TEMPLATE), "-o", "out", cwd=tmp_path)
    page = (tmp_path / "out" / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", page), "the page loads a script from elsewhere"
    assert "cdn." not in page and page.count("vegaEmbed('#") == 1
    node = shutil.which("node")
    if node is None:
        pytest.skip("Node.js is absent: the page's scripts were not run")
    js = tmp_path / "render.js"
    js.write_text(_RENDER)
    run = subprocess.run([node, str(js), str(tmp_path / "out" / "index.html")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["libs"] == ["object", "object", "function"]
    assert len(result["out"]) == 1 and result["out"][0]["marks"] > 0, result
