"""The project's layout: a stage script (what a user runs) is never imported by another file of
the project; what two stages share lives in a module named for what it holds."""
import ast

from conftest import ROOT

# the scripts a user runs; plot.py is also the drawing train.py uses, so it may be imported
STAGES = {"prepare", "train", "sample", "eval", "export", "app", "bench", "bench_prepare"}


def imported_modules(path) -> dict[str, int]:
    """Top-level module name -> the line of each import in the file, wherever it sits (module
    level, or inside a function: a lazy import counts the same)."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name.split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.setdefault(node.module.split(".")[0], node.lineno)
    return found


def test_no_file_imports_a_stage_script():
    files = sorted(ROOT.glob("*.py"))
    assert {"train.py", "sample.py", "model.py"} <= {f.name for f in files}  # the right folder
    offenders = [f"{path.name}:{line} imports {name}.py"
                 for path in files for name, line in imported_modules(path).items()
                 if name in STAGES and name != path.stem]
    assert not offenders, ("a stage script is imported; move what it shares into a module named for "
                           "what it holds: " + ", ".join(offenders))


def test_the_check_sees_lazy_and_from_imports(tmp_path):
    """The parser finds every form of import a file could use to reach a stage script."""
    path = tmp_path / "x.py"
    path.write_text("import os.path\nfrom train import Dataset\n\ndef f():\n    import sample as s\n"
                    "    from . import bench\n", encoding="utf-8")
    assert imported_modules(path) == {"os": 1, "train": 2, "sample": 5}
