"""The demo's figures in README.md, written from the demo's own evaluation, not typed by hand.

    python scripts/readme_demo.py demo-output/evaluate/report.json README.md

rewrites the block between the two markers below with a table rendered from report.json's
headline (cp2image_tf/evaluation/report.py writes it). `make readme-figure` runs this after
copying the demo's overview.png to docs/demo.png.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

START = "<!-- demo-figures -->"
END = "<!-- /demo-figures -->"

# (row label, headline key); a row whose key the report lacks (MoA without --moa-column,
# retrieval when copairs skipped) is left out.
ROWS = (
    ("features re-measured at r >= 0.7", "fraction_r"),
    ("treatment accuracy (classifier)", "treatment_accuracy"),
    ("mechanism-of-action accuracy", "moa_accuracy"),
    ("treatment mAP (retrieval)", "map"),
    ("treatment means' r with real cells'", "profile_r"),
    ("own profile ranked first (top-1)", "self_top1"),
    ("own profile in the top 10%", "self_top10pct"),
)
COLUMNS = (("drawn cells", "model"), ("nearest training cell", "nearest neighbour"),
           ("real crops (ceiling)", "ceiling"))


class ReadmeError(Exception):
    """A report or README this script cannot use; the message says which and why."""


def number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def chance_levels(report: dict) -> dict:
    """Chance for each row, where the report states one."""
    classification = report.get("classification") or {}
    retrieval = report.get("retrieval") or {}
    maps = (retrieval.get("map") or {}).get("methods") or {}
    selfs = (retrieval.get("self") or {}).get("chance") or {}
    return {"treatment_accuracy": classification.get("chance"),
            "moa_accuracy": (classification.get("moa") or {}).get("chance"),
            "map": (maps.get("model") or {}).get("random_map"),
            "self_top1": selfs.get("top1"), "self_top10pct": selfs.get("top10pct")}


def render(report: dict) -> str:
    """The demo's figures as a Markdown table and one line saying what was evaluated."""
    try:
        methods = report["headline"]["all"]["methods"]
        rows = [(label, key) for label, key in ROWS if key in methods["model"]]
        columns = [(title, methods[name]) for title, name in COLUMNS]
    except (KeyError, TypeError) as err:
        raise ReadmeError(f"report.json has no headline entry {err}: is it evaluate's "
                          "report, and did its ceiling check pass?") from None
    chance = chance_levels(report)
    lines = ["| | " + " | ".join(title for title, _ in columns) + " | chance |",
             "|---|" + "---|" * (len(columns) + 1)]
    for label, key in rows:
        cells = [number(row.get(key)) for _, row in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " | "
                     + ("" if chance.get(key) is None else number(chance[key])) + " |")
    lines += controllability_rows(report)
    treatments = len(report.get("cells_per_treatment") or {})
    features = (report.get("features") or {}).get("remeasured")
    lines += ["", f"*{report['cells']} test cells of {treatments} treatments, "
              f"{features} CellProfiler features re-measured with cp-measure; for the real crops, "
              "the treatment means' r compares two random halves of the real cells.*"]
    return "\n".join(lines)


def controllability_rows(report: dict) -> list[str]:
    """The controllability section's median gains (traversals re-measured; 1 for real cells by
    its definition, 0 for a picture that does not change), when the report has them."""
    summary = (report.get("controllability") or {}).get("summary") or {}
    if "correlated" not in summary:
        return []
    lookup = (summary.get("lookup") or {}).get("gain")
    rows = [("how far a traversal moves its feature (gain), correlated features too",
             summary["correlated"].get("gain"), lookup)]
    if "alone" in summary:
        rows.append(("... the feature alone", summary["alone"].get("gain"), None))
    return [f"| {label} | {number(model)} | {'' if near is None else number(near)} | 1.00 | 0.00 |"
            for label, model, near in rows]


def replace_block(text: str, block: str) -> str:
    """`text` with what lies between START and END replaced by `block`."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ReadmeError(f"README.md needs one {START} line followed by one {END} line.")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python scripts/readme_demo.py REPORT_JSON README_MD", file=sys.stderr)
        return 2
    report_path, readme_path = Path(argv[0]), Path(argv[1])
    for path in (report_path, readme_path):
        if not path.is_file():
            print(f"readme_demo: {path} not found (make demo writes the report).",
                  file=sys.stderr)
            return 1
    try:
        block = render(json.loads(report_path.read_text()))
    except (json.JSONDecodeError, ReadmeError) as err:
        print(f"readme_demo: {report_path}: {err}", file=sys.stderr)
        return 1
    try:
        readme = replace_block(readme_path.read_text(), block)
    except ReadmeError as err:
        print(f"readme_demo: {readme_path}: {err}", file=sys.stderr)
        return 1
    partial = readme_path.with_name(f".{readme_path.name}.partial")
    partial.write_text(readme)
    partial.replace(readme_path)  # never a half-written README
    print(f"{readme_path}: the demo's figures from {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
