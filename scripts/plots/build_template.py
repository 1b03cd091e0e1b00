"""Write DVC's HTML template for `dvc plots show` with vega, vega-lite and vega-embed inlined (issue 27).

dvc-render's default page loads the three libraries from cdn.jsdelivr.net, so it is blank offline, which
is how this pipeline's default run works.  DVC uses the page ``plots.html_template`` in .dvc/config
names instead, and inserts the CDN <script> tags only where that page has a ``{scripts}`` placeholder:
this one has none, and carries the libraries (npm packages pinned in package-lock.json, installed by
scripts/setup.sh into scripts/plots/node_modules, git-ignored) in its own <script> elements.

    python scripts/plots/build_template.py        # → .dvc/plots_offline.html (git-ignored, ~0.8 MB)

The charts are drawn as SVG (vega-embed's ``renderer: "svg"``) rather than on a canvas, so a saved page
keeps vector charts and a test can read the drawn marks and legends from the DOM.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))       # run as a script (scripts/setup.sh): pipeline/ is not on the path otherwise
OUT = ROOT / ".dvc" / "plots_offline.html"
LIBS = {"vega": "build/vega.min.js", "vega-lite": "build/vega-lite.min.js", "vega-embed": "build/vega-embed.min.js"}
# DVC replaces these in the template; the page must hold {plot_divs} and must not hold {scripts}.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

SVG_RENDERER = """(function () {
  var embed = window.vegaEmbed;
  window.vegaEmbed = function (el, spec, opt) {
    return embed(el, spec, Object.assign({renderer: "svg"}, opt || {}));
  };
})();"""


def build(modules: Path = HERE / "node_modules", out: Path = OUT) -> Path:
    scripts = []
    for name, rel in LIBS.items():
        path = modules / name / rel
        if not path.exists():
            sys.exit(f"{path}: missing; install the pinned packages first: npm ci --prefix {HERE.relative_to(ROOT)}")
        version = json.loads((modules / name / "package.json").read_text())["version"]
        code = path.read_text(encoding="utf-8")
        bad = [p for p in ("</script", *PLACEHOLDERS) if p in code]
        if bad:
            sys.exit(f"{path}: contains {bad}, which would break the inlined page")
        scripts.append(f"<script>/* {name} {version} (npm, inlined) */\n{code}\n</script>")
    scripts.append(f"<script>\n{SVG_RENDERER}\n</script>")
    page = ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n{refresh_tag}\n"
            "<title>DVC plots (offline)</title>\n" + "\n".join(scripts) +
            "\n<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")
    from pipeline.checkpoint import write_text      # the one atomic writer (temp file + fsync + rename)

    return write_text(out, page)


if __name__ == "__main__":
    print(f"plots template: {build().relative_to(ROOT)}")
