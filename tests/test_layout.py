"""The house: imports point down the layers, run in no circle, and the command line stays light."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "polyrot"
HEAVY = ("torch", "mlflow", "transformers", "matplotlib")

# Each subpackage's layer: a module may import its own subpackage and any lower layer, never a
# sibling of its own layer (the Dyck-3 and Hugging Face worlds, figures and tracking stand apart).
LAYERS = {"errors": 0, "core": 1, "toy": 2, "hf": 2, "figures": 2, "tracking": 2, "stages": 3,
          "experiments": 4, "cli": 5, "mlflow_plugin": 5, "__main__": 6}


def modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module under root, a package's __init__ as the package."""
    out = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules one module imports, lazy imports inside functions included."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            stem = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([stem] if stem else []))
            candidates = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        # A submodule's import of its own parent package (run anyway on its import) is no edge.
        found.update(m for m in candidates if m in known and m != name and not name.startswith(m + "."))
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a closed path [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else 0  # the bare package holds only the version


def test_the_package_has_no_import_cycle():
    assert find_cycle(import_graph(PACKAGE)) is None


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from pkg.low import b\n")
    (pkg / "low" / "b.py").write_text("def f():\n    from pkg.top import c  # lazy, and still a loop\n")
    (pkg / "top.py").write_text("import pkg.low.a\nc = 1\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.low.a", "pkg.low.b", "pkg.top", "pkg.low.a"]
    (pkg / "low" / "b.py").write_text("x = 1\n")
    assert find_cycle(import_graph(pkg)) is None


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in modules(PACKAGE) if layer(m) is None]
    assert unplaced == []


def test_imports_point_down_the_layers():
    upward = []
    for module, targets in import_graph(PACKAGE).items():
        own = module.split(".")[1] if "." in module else None
        for target in targets:
            other = target.split(".")[1] if "." in target else None
            if other != own and layer(target) >= layer(module) and layer(target) > 0:
                upward.append(f"{module} -> {target}")
    assert sorted(upward) == []


def test_no_module_imports_pickle():
    # Tensors travel as safetensors and metadata as JSON; foreign checkpoints go through
    # torch.load(weights_only=True), never through pickle itself.
    found = {name for name, path in modules(PACKAGE).items() for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, (ast.Import, ast.ImportFrom))
             and any(n.split(".")[0] == "pickle" for n in [getattr(node, "module", None) or ""]
                     + [a.name for a in node.names])}
    assert not found, found


def python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_importing_the_cli_loads_no_heavy_package():
    loaded = python(f"import sys, polyrot.cli; print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert loaded.strip() == "[]"


@pytest.mark.parametrize("argv", [["--help"], ["train-seed", "--help"], ["reproduce", "--help"],
                                  ["train-seed", "--bogus", "1"], ["train-seed", "--lr", "fast"]])
def test_help_and_bad_input_answer_without_loading_a_heavy_package(argv):
    code = ("import json, sys\nfrom click.testing import CliRunner\nfrom polyrot.cli import main\n"
            f"result = CliRunner().invoke(main, {argv!r})\n"
            f"print(json.dumps([result.exit_code, result.output, sorted(m for m in {HEAVY!r} if m in sys.modules)]))")
    exit_code, output, loaded = json.loads(python(code))
    assert loaded == []
    assert exit_code == (0 if "--help" in argv else 2)
    if argv == ["--help"]:
        assert "train-seed" in output and "reproduce" in output and "fit-rotation" in output
    if argv == ["train-seed", "--lr", "fast"]:
        assert "--lr expects float, got 'fast'" in output
