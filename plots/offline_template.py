"""Write plots/offline.html: DVC's page template for `dvc plots show` with Vega, Vega-Lite
and Vega-Embed inlined from plots/node_modules (`npm ci --prefix plots`, run by `make
install`), so the page draws its plots without internet; DVC's own template loads them
from a CDN and is blank offline. `.dvc/config` points `plots.html_template` here."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARIES = (
    "vega/build/vega.min.js",
    "vega-lite/build/vega-lite.min.js",
    "vega-embed/build/vega-embed.min.js",
)
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")  # what DVC fills in

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main() -> int:
    scripts = []
    for name in LIBRARIES:
        path = HERE / "node_modules" / name
        if not path.is_file():
            print(f"{path} is missing: run `npm ci --prefix plots`", file=sys.stderr)
            return 1
        code = path.read_text(encoding="utf-8")
        if "</script" in code or any(p in code for p in PLACEHOLDERS):
            print(f"{path} cannot be inlined: a </script> or a DVC placeholder", file=sys.stderr)
            return 1
        scripts.append(f"<script>{code}</script>")
    (HERE / "offline.html").write_text(PAGE.replace("SCRIPTS", "\n".join(scripts)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
