"""Imports flow one way: scripts -> maxent_rlhf -> objectives, never back up, and no circle.

The package's modules are parsed (not imported) with `ast`; every import counts, also those inside
functions, relative ones, and module names handed to `importlib.import_module` as strings, because a
lazy import closes a circle just as well at run time. The checker itself is tested on a made-up tree
with a known circle and a known import of a script, so a checker that sees nothing cannot pass.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "maxent_rlhf"
SCRIPTS = {"train_rloo", "train_offline", "evaluate_judge"}
# ways to execute a file as a module without an import statement any reader or tool would see
FILE_LOADERS = {"spec_from_file_location", "module_from_spec", "SourceFileLoader", "run_path", "REPO_ROOT"}


def module_names(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of `package` under `root`."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], set[str], list[str]]:
    """(package modules imported, top-level modules imported, file-loader names used) by one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    top: set[str] = set()
    loaders: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                targets.add(alias.name)
                top.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                    else node.module or "")
            top.add(base.split(".")[0])
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value in known:  # a module named in a string: importlib.import_module("maxent_rlhf.x")
                targets.add(node.value)
            if node.value in SCRIPTS:  # a script named as a module: load_script("train_rloo")
                top.add(node.value)
        elif isinstance(node, ast.Name) and node.id in FILE_LOADERS:
            loaders.append(f"{node.id} (line {node.lineno})")
        elif isinstance(node, ast.Attribute) and node.attr in FILE_LOADERS:
            loaders.append(f"{node.attr} (line {node.lineno})")
    edges = set()
    for t in targets:
        if t not in known:
            continue
        # importing a.b.c runs the __init__ of a.b first (unless the importer lives inside a.b)
        parts = t.split(".")
        for i in range(1, len(parts) + 1):
            parent = ".".join(parts[:i])
            if parent in known and parent != module and not (module + ".").startswith(parent + "."):
                edges.add(parent)
    return edges, top, loaders


def import_graph(root: Path, package: str = PACKAGE):
    mods = module_names(root, package)
    known = set(mods)
    graph, tops, loaders = {}, {}, {}
    for m, p in mods.items():
        graph[m], tops[m], loaders[m] = imports_of(m, p, known)
    return graph, tops, loaders


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


# --------------------------------------------------------------------------------------------------
# the package
# --------------------------------------------------------------------------------------------------
def test_the_package_has_no_import_circle():
    graph, _, _ = import_graph(REPO)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_package_never_imports_the_scripts():
    _, tops, loaders = import_graph(REPO)
    back_up = {m: sorted(t & SCRIPTS) for m, t in tops.items() if t & SCRIPTS}
    assert not back_up, f"package modules import root scripts: {back_up}"
    by_file = {m: l for m, l in loaders.items() if l}
    assert not by_file, f"package modules load files as modules (invisible imports): {by_file}"


def test_objectives_is_the_bottom_of_the_package():
    graph, _, _ = import_graph(REPO)
    assert graph[f"{PACKAGE}.objectives"] == set(), "objectives must import no other module of the package"
    # and the graph is not empty: the checker sees lazy and relative imports of the real package
    assert f"{PACKAGE}.objectives" in graph[f"{PACKAGE}.generation"]
    assert f"{PACKAGE}.models" in graph[f"{PACKAGE}.judges"]  # imported inside RewardModelJudge.__init__
    assert f"{PACKAGE}.toylab.task" in graph[f"{PACKAGE}.toylab.judge"]  # `from . import task`


# --------------------------------------------------------------------------------------------------
# the checker on a tree with known faults
# --------------------------------------------------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))


def test_checker_finds_lazy_relative_and_string_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "def f():\n    from .sub import b  # lazy, relative\n",
        "pkg/sub/__init__.py": "from . import b\n",
        "pkg/sub/b.py": "from ..c import x\n",
        "pkg/c.py": "import importlib\nPLUGINS = ('pkg.a',)\n",
        "pkg/d.py": "import importlib.util\nimport train_rloo\nREPO_ROOT = None\n"
                    "spec = importlib.util.spec_from_file_location('x', 'x.py')\n",
        "pkg/e.py": "CLASSES = {'evaluate_judge': 'EvalConfig'}\nCOMMAND = ['python', 'evaluate_judge.py']\n",
    })
    graph, tops, loaders = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}  # named in a string
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"pkg.a", "pkg.c"} <= set(cycle)
    assert "train_rloo" in tops["pkg.d"]
    assert "evaluate_judge" in tops["pkg.e"]  # named as a module; running the file "evaluate_judge.py" is fine
    assert {l.split()[0] for l in loaders["pkg.d"]} == {"REPO_ROOT", "spec_from_file_location"}
    del graph["pkg.c"]
    assert find_cycle(graph) is None
