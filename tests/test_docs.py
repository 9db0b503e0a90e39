"""The documentation: the site builds with no warning (a broken link or a page left out of the
nav fails it), the README stays short and its links resolve, and the demo's figures in the
README are rendered from the demo's own report (scripts/readme_demo.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("readme_demo", ROOT / "scripts/readme_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_demo = load_script()


def small_report(moa=True) -> dict:
    """A report.json as evaluate writes it, reduced to what the README's block reads."""
    def row(fraction, treatment, moa_acc, map_, profile, top1, top10):
        entry = {"ssim": 0.6, "fraction_r": fraction, "treatment_accuracy": treatment,
                 "map": map_, "profile_r": profile, "self_top1": top1, "self_top10pct": top10}
        if moa:
            entry["moa_accuracy"] = moa_acc
        return entry

    classification = {"chance": 1 / 7}
    if moa:
        classification["moa"] = {"chance": 0.25, "column": "Metadata_MoA"}
    return {
        "model": "demo-output/models/cp2image", "cells": 70,
        "cells_per_treatment": {t: 10 for t in "ABCDEFG"},
        "features": {"input": 600, "remeasured": 598},
        "classification": classification,
        "retrieval": {"map": {"methods": {"model": {"map": 0.63, "random_map": 0.183}}},
                      "self": {"chance": {"top1": 1 / 70, "top10pct": 0.1}}},
        "headline": {"all": {"methods": {
            "model": row(0.517, 0.871, 0.862, 0.634, 0.884, 0.729, 1.0),
            "nearest neighbour": row(0.391, 0.833, 0.811, 0.641, 0.893, 0.514, 0.957),
            "mean image": row(0.0, 0.14, 0.43, 0.18, 0.02, 0.014, 0.1),
            "ceiling": row(0.749, 0.943, 0.871, 0.662, 0.731, 1.0, 1.0)}}},
    }


def test_the_site_builds_strictly(tmp_path):
    """mkdocs build --strict: any warning (a broken link, a missing nav page) fails it."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "design" / "exemplar" / "index.html").is_file()


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert pages and [p for p in pages if p not in nav] == []


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading (lower case, punctuation dropped)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors_of(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_the_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 260
    targets = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", t)]
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert missing == []
    broken = [t for t in targets if "#" in t and t.split("#")[1] not in
              anchors_of(ROOT / (t.split("#")[0] or "README.md"))]
    assert broken == []


def test_github_anchors():
    assert github_anchor("`published`: the paper's decoder") == "published-the-papers-decoder"
    assert github_anchor("A real screen: BBBC013") == "a-real-screen-bbbc013"


def test_render_writes_the_reports_figures():
    block = readme_demo.render(small_report())
    lines = block.splitlines()
    features = next(line for line in lines if line.startswith("| features"))
    assert features == "| features re-measured at r >= 0.7 | 0.52 | 0.39 | 0.75 |  |"
    treatment = next(line for line in lines if line.startswith("| treatment accuracy"))
    assert treatment == "| treatment accuracy (classifier) | 0.87 | 0.83 | 0.94 | 0.14 |"
    assert "| mechanism-of-action accuracy | 0.86 | 0.81 | 0.87 | 0.25 |" in lines
    assert "| treatment mAP (retrieval) | 0.63 | 0.64 | 0.66 | 0.18 |" in lines
    assert "| own profile ranked first (top-1) | 0.73 | 0.51 | 1.00 | 0.01 |" in lines
    assert "70 test cells of 7 treatments, 598 CellProfiler features" in block
    # the mean image is no column of the README's table
    assert "0.00" not in features


def test_render_leaves_out_rows_the_report_lacks():
    block = readme_demo.render(small_report(moa=False))
    assert "mechanism-of-action" not in block
    assert "| treatment accuracy (classifier) | 0.87 |" in block


def test_render_names_a_report_without_headline():
    with pytest.raises(readme_demo.ReadmeError, match="headline"):
        readme_demo.render({"cells": 3})


def test_the_script_rewrites_only_the_marked_block(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(small_report()))
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nBefore.\n\n{readme_demo.START}\nold figures 0.11\n"
                      f"{readme_demo.END}\n\nAfter.\n")
    assert readme_demo.main([str(report), str(readme)]) == 0
    text = readme.read_text()
    assert "old figures" not in text
    assert text.startswith("# Title\n\nBefore.\n\n<!-- demo-figures -->\n| | drawn cells |")
    assert text.endswith("<!-- /demo-figures -->\n\nAfter.\n")
    assert "| 0.52 | 0.39 | 0.75 |" in text
    # run again: the same README
    assert readme_demo.main([str(report), str(readme)]) == 0
    assert readme.read_text() == text


def test_the_script_refuses_a_readme_without_markers(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(small_report()))
    readme = tmp_path / "README.md"
    readme.write_text("# No markers\n")
    assert readme_demo.main([str(report), str(readme)]) == 1
    assert readme.read_text() == "# No markers\n"
    assert "<!-- demo-figures -->" in capsys.readouterr().err
    assert readme_demo.main([str(tmp_path / "missing.json"), str(readme)]) == 1
    assert "missing.json not found" in capsys.readouterr().err


def test_the_readme_has_the_demo_block():
    text = (ROOT / "README.md").read_text()
    assert text.count(readme_demo.START) == 1 and text.count(readme_demo.END) == 1
    block = text.split(readme_demo.START)[1].split(readme_demo.END)[0]
    assert "| features re-measured at r >= 0.7 |" in block


def test_render_adds_the_controllability_gains_when_the_report_has_them():
    report = small_report()
    assert "gain" not in readme_demo.render(report)
    report["controllability"] = {"summary": {"correlated": {"gain": 0.612}, "alone": {"gain": 0.014},
                                             "lookup": {"gain": 0.45}}}
    lines = readme_demo.render(report).splitlines()
    assert ("| how far a traversal moves its feature (gain), correlated features too | 0.61 | 0.45 "
            "| 1.00 | 0.00 |") in lines
    assert "| ... the feature alone | 0.01 |  | 1.00 | 0.00 |" in lines
