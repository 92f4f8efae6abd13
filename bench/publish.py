"""Bench: publish a full run into the repository (``python -m bench.publish OUT_DIR``).

Copies the run's PNGs and Markdown into ``bench/results/`` with slimmed JSON (time series
and long lists dropped, so the committed files stay small; the full JSON stays in
OUT_DIR), and rewrites the part of ``bench/README.md`` after the ``RESULTS`` marker with
the run's ``summary.md``, image links pointing into ``results/``.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
MARKER = "<!-- RESULTS: everything below is written by `python -m bench.publish` -->"
DROP_KEYS = {"series", "rss_series"}
MAX_LIST = 64


def slim(value: Any) -> Any:
    """The value without time series and without lists longer than MAX_LIST."""
    if isinstance(value, dict):
        return {k: slim(v) for k, v in value.items() if k not in DROP_KEYS}
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            return f"<{len(value)} items, see the run's full JSON>"
        return [slim(v) for v in value]
    return value


def publish(out_dir: Path) -> None:
    summary = (out_dir / "summary.md").read_text()
    if RESULTS.exists():
        shutil.rmtree(RESULTS)
    RESULTS.mkdir(parents=True)
    for path in sorted(out_dir.iterdir()):
        if path.suffix in {".png", ".md"}:
            shutil.copy2(path, RESULTS / path.name)
        elif path.suffix == ".json":
            data = slim(json.loads(path.read_text()))
            (RESULTS / path.name).write_text(json.dumps(data, indent=1) + "\n")
    body = summary.replace("# Benchmark summary", "## Latest full run", 1)
    body = body.replace("![", "![").replace("](", "](results/")
    head = README.read_text().split(MARKER, 1)[0] if README.exists() else ""
    README.write_text(head.rstrip() + "\n\n" + MARKER + "\n\n" + body)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bench.publish OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    publish(Path(sys.argv[1]))
