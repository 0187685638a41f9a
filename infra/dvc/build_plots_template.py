"""Build ``infra/dvc/plots.html``: DVC's plots page template with Vega inlined, so that
``dvc plots show`` draws its plots with no network (DVC's own page loads Vega from a CDN, and
renders blank on a cluster without internet). ``.dvc/config`` points ``plots.html_template``
at it. The libraries are the versions DVC's renderer asks for, unmodified, each with its
licence (BSD-3-Clause):

    cd /tmp && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    for f in vega*.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
    python infra/dvc/build_plots_template.py /tmp
"""

from __future__ import annotations

import argparse
from pathlib import Path

LIBRARIES = (("vega", "5.20.2"), ("vega-lite", "5.2.0"), ("vega-embed", "6.18.2"))
OUT = Path(__file__).with_name("plots.html")

HEAD = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots (prism)</title>
    <style>
        body { font-family: sans-serif; }
        table { border-spacing: 15px; }
    </style>
"""
TAIL = """</head>
<body>
    {plot_divs}
</body>
</html>
"""


def build(packages: Path) -> str:
    """The template text from the unpacked npm packages under ``packages``."""
    scripts = []
    for name, version in LIBRARIES:
        root = packages / f"{name}-{version}" / "package"
        code = (root / "build" / f"{name}.min.js").read_text()
        licence = (root / "LICENSE").read_text().strip().replace("*/", "* /")
        for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
            if bad in code:
                raise ValueError(f"{name}: {bad!r} in its code cannot be inlined here")
        scripts.append(f"    <!-- {name} {version} -->\n    <script>/*\n{licence}\n*/\n"
                       f"{code}\n    </script>\n")
    return HEAD + "".join(scripts) + TAIL


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("packages", type=Path, help="folder holding NAME-VERSION/package/")
    OUT.write_text(build(ap.parse_args().packages))
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
