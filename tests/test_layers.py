"""The layering docs/architecture.md describes, read from every module's imports (ast:
also the imports inside functions).

    cli -> cp2image_tf -> tfrecords_tools
    within cp2image_tf: training <- serving <- drawing <- evaluation / explore;
                        measuring beside them (evaluation, explore's readout and training's
                        judge rounds use it; it uses no other stage); viz, metrics and tflog
                        below all.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cli", "cp2image_tf", "tfrecords_tools")

# The cp2image_tf stages each stage may import besides itself.
STAGE_MAY_IMPORT = {
    # Judge rounds (training/shared/judge.py) measure the decoder's edits with cp-measure.
    "training": {"measuring"},
    "measuring": set(),
    "serving": {"training"},
    "drawing": {"training", "serving"},
    "evaluation": {"training", "serving", "drawing", "measuring"},
    # explore's readout shows the drawn cell re-measured with cp-measure, as evaluate does
    # (explore/readout.py): the same measurement, so the same stage.
    "explore": {"training", "serving", "drawing", "measuring"},
}
# cp2image_tf's modules outside the stages, and the stages each may import. viz and metrics are
# used by training (validation pictures and figures) as by evaluation, so they sit below all.
TOP_LEVEL_MAY_IMPORT = {
    "cp2image_tf.viz": set(),
    "cp2image_tf.metrics": set(),
    "cp2image_tf.sampledata": {"measuring"},
    # TensorFlow's harmless C++ lines kept from the user around the calls that print them.
    "cp2image_tf.tflog": set(),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for package in PACKAGES
            for p in sorted((root / package).rglob("*.py"))}


def imports_of(name: str, path: Path, known) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in the file, at any depth.
    `from a.b import c` is a.b.c when that is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        found += [(t, node.lineno) for t in targets if t.split(".")[0] in PACKAGES]
    return found


def import_graph(root: Path = ROOT) -> dict[str, list[tuple[str, int]]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    inside = parts[0] == "cp2image_tf" and len(parts) > 1 and parts[1] in STAGE_MAY_IMPORT
    return parts[1] if inside else None


def layer_violations(graph) -> list[str]:
    """Every import against the layering, as 'module:line imports target: why'."""
    problems = []
    for module, imports in graph.items():
        top = module.split(".")[0]
        for target, line in imports:
            where = f"{module}:{line} imports {target}"
            if target not in graph:
                problems.append(f"{where}: no such module of the project")
                continue
            target_top = target.split(".")[0]
            if target_top == "cli" and top != "cli":
                problems.append(f"{where}: the library never imports the CLI")
            if top == "tfrecords_tools" and target_top == "cp2image_tf":
                problems.append(f"{where}: storage knows nothing of the model")
            if top != "cp2image_tf" or target_top != "cp2image_tf":
                continue
            stage, target_stage = stage_of(module), stage_of(target)
            if stage is None:
                allowed = TOP_LEVEL_MAY_IMPORT.get(module)
                if allowed is None:
                    problems.append(f"{where}: {module} is in no stage; add it to "
                                    "TOP_LEVEL_MAY_IMPORT with the stages it may use")
                elif target_stage is not None and target_stage not in allowed:
                    problems.append(f"{where}: {module} may import only {sorted(allowed)}")
            elif target_stage is None:
                if target not in TOP_LEVEL_MAY_IMPORT or TOP_LEVEL_MAY_IMPORT[target]:
                    problems.append(f"{where}: stage {stage} may use only the modules below "
                                    "every stage (viz, metrics, tflog)")
            elif target_stage != stage and target_stage not in STAGE_MAY_IMPORT[stage]:
                problems.append(f"{where}: stage {stage} sits below {target_stage}")
    return list(dict.fromkeys(problems))


def cycles(graph) -> list[list[str]]:
    """The module cycles, each once, as the list of modules round it."""
    found, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target, _ in graph.get(module, ()):
            if target not in graph or target == module:
                continue
            if state.get(target) == "open":
                found.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_every_module_is_read():
    graph = import_graph()
    assert {"cli.main", "cp2image_tf.training.train", "tfrecords_tools.parts"} <= set(graph)
    # imports inside functions count: cmd_fit imports the training loop inside its command
    assert "cp2image_tf.training.train" in {t for t, _ in graph["cli.cmd_fit"]}


def test_imports_follow_the_layers():
    problems = layer_violations(import_graph())
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("module, source, expected", [
    ("tfrecords_tools/convert.py", "def f():\n    from cp2image_tf.viz import composite\n",
     "storage knows nothing of the model"),
    ("cp2image_tf/training/train.py", "from cp2image_tf.drawing import generate\n",
     "stage training sits below drawing"),
    ("cp2image_tf/serving/export.py", "from cli.common import call\n",
     "the library never imports the CLI"),
])
def test_a_wrong_import_is_caught(tmp_path, module, source, expected):
    """The checks can fail: a copy of the tree with one wrong import added."""
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            copy = tmp_path / path.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(path.read_text())
    target = tmp_path / module
    target.write_text(target.read_text() + "\n" + source)
    problems = layer_violations(import_graph(tmp_path))
    assert any(expected in p for p in problems), problems


def test_a_cycle_is_caught():
    graph = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    assert cycles(graph) == [["a", "b", "c", "a"]]


MAX_FUNCTION_LINES = 80


def long_functions(root: Path = ROOT, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (or method) of cp2image_tf/, tfrecords_tools/ and cli/ longer than
    `limit` lines from its `def` to its end, docstring included (a Click command's option
    decorators are not its body): "path:line name (N lines)"."""
    found = []
    for package in ("cp2image_tf", "tfrecords_tools", "cli"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} "
                                     f"({lines} lines)")
    return found


def test_no_library_function_is_over_80_lines():
    assert not long_functions(), "\n".join(long_functions())


def test_a_long_function_is_caught(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(81))
    (tmp_path / "cli").mkdir()
    (tmp_path / "cli" / "long.py").write_text(f"def f():\n{body}\n")
    for package in ("cp2image_tf", "tfrecords_tools"):
        (tmp_path / package).mkdir()
    assert long_functions(tmp_path) == ["cli/long.py:1 f (82 lines)"]
