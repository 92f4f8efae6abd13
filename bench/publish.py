"""Bench: publish a run into the repository (``python -m bench.publish OUT_DIR``).

For every ``<scenario>.json`` in OUT_DIR (a full ``all`` run or single scenarios), the
scenario's published files in ``bench/results/`` are replaced: its Markdown, its PNGs and
a slimmed JSON (time series and long lists dropped, so the committed files stay small; the
full JSON stays in OUT_DIR). Scenarios OUT_DIR does not have keep their published files:
publishing a re-run of two scenarios never overwrites the others with anything.

Then ``bench/results/summary.md`` and the part of ``bench/README.md`` after the
``RESULTS`` marker are rewritten from every published JSON, each scenario with the commit,
date and command of the run that produced it, image links pointing into ``results/``.
Quick (``--quick``) runs are refused: they are smoke tests, not numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import report

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
MARKER = "<!-- RESULTS: everything below is written by `python -m bench.publish` -->"
DROP_KEYS = {"series", "rss_series"}
MAX_LIST = 64
#: the order of the sections (any other published scenario follows, by name)
ORDER = (
    "overload",
    "overhead",
    "bigbody",
    "queue",
    "replicas",
    "jobs",
    "checkpoints",
    "tenants",
    "autoscale",
)


def slim(value: Any) -> Any:
    """The value without time series and without lists longer than MAX_LIST."""
    if isinstance(value, dict):
        return {k: slim(v) for k, v in value.items() if k not in DROP_KEYS}
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            return f"<{len(value)} items, see the run's full JSON>"
        return [slim(v) for v in value]
    return value


def _files_of(name: str, data: dict[str, Any]) -> list[str]:
    """The files one scenario publishes: JSON, Markdown and its plots."""
    return [f"{name}.json", f"{name}.md", *(str(p) for p in data.get("plots") or [])]


def publish(out_dir: Path) -> list[str]:
    """Publish every scenario JSON of ``out_dir``; returns the scenarios published."""
    runs = sorted(p for p in out_dir.glob("*.json") if p.is_file())
    loaded = [(p, json.loads(p.read_text())) for p in runs]
    loaded = [(p, d) for p, d in loaded if isinstance(d, dict) and d.get("scenario") == p.stem]
    if not loaded:
        raise SystemExit(f"no <scenario>.json in {out_dir}")
    quick = [p.name for p, d in loaded if d.get("quick")]
    if quick:
        raise SystemExit(f"refusing to publish --quick runs: {', '.join(quick)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    published: list[str] = []
    for path, data in loaded:
        name = data["scenario"]
        old = RESULTS / f"{name}.json"
        if old.exists():
            for stale in _files_of(name, json.loads(old.read_text())):
                (RESULTS / stale).unlink(missing_ok=True)
        for extra in _files_of(name, data)[1:]:
            if (out_dir / extra).exists():
                shutil.copy2(out_dir / extra, RESULTS / extra)
        (RESULTS / path.name).write_text(json.dumps(slim(data), indent=1) + "\n")
        published.append(name)
    summary = summary_markdown()
    (RESULTS / "summary.md").write_text(summary)
    body = summary.replace("](", "](results/")
    head = README.read_text().split(MARKER, 1)[0] if README.exists() else ""
    README.write_text(head.rstrip() + "\n\n" + MARKER + "\n\n" + body)
    return published


def _published() -> list[dict[str, Any]]:
    found = {p.stem: json.loads(p.read_text()) for p in RESULTS.glob("*.json")}
    names = [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)
    return [found[n] for n in names]


def provenance(data: dict[str, Any]) -> str:
    """Which commit, when and with what command one published scenario was run."""
    commit = (data.get("machine") or {}).get("commit", "?")
    started = data.get("started_unix")
    when = time.strftime("%Y-%m-%d", time.gmtime(started)) if started else "?"
    command = data.get("command")
    how = f"`{command}`" if command else "command not recorded"
    return f"Run at commit {commit} on {when} ({how}), {data.get('duration_s', '?')} s."


def summary_markdown() -> str:
    results = _published()
    machine = (results[-1].get("machine") if results else None) or report.machine_info()
    peers = (results[-1].get("peers") if results else None) or {}
    lines = [
        "## Published results",
        "",
        f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
        f"{machine.get('mem_gib')} GiB, {machine.get('os')}, Python {machine.get('python')}",
        f"- peers: {'; '.join(f'{k}: {v}' for k, v in peers.items())}",
        "- each scenario was published from its own run; its commit and command are under "
        "its heading",
        "",
    ]
    for data in results:
        section = report.scenario_markdown(data)
        head, _, rest = section.partition("\n")
        lines.append(f"{head}\n\n{provenance(data)}\n{rest}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print("usage: python -m bench.publish OUT_DIR", file=sys.stderr)
        raise SystemExit(2)
    done = publish(Path(sys.argv[1]))
    print(f"published {', '.join(done)} into {RESULTS}", file=sys.stderr)
