"""Facts about the code's shape that a reader relies on: no function takes more than 6
positional parameters (after self or cls), the rest being keyword-only and named at every call;
no module imports itself round a circle of imports; each layer imports only the layers below it
(docs/design.md); at most 8 modules at the root; nothing edits Python's import path."""
import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("core", "features", "run", "tools")
SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py"))
                 + [p for d in PACKAGES + ("tests",)
                    for p in glob.glob(os.path.join(ROOT, d, "*.py"))])
MOST_POSITIONAL = 6


def positional_counts(source: str) -> list[tuple[int, str, int]]:
    """(line, function name, positional parameters without self/cls) of each function."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names = [a.arg for a in node.args.posonlyargs + node.args.args]
            if names[:1] in (["self"], ["cls"]):
                names = names[1:]
            found.append((node.lineno, node.name, len(names)))
    return found


def test_the_count_sees_keyword_only_parameters_and_self():
    src = "def f(a, b, *, c): pass\nclass K:\n    def g(self, a, /, b=1, *r, c): pass\n"
    assert positional_counts(src) == [(1, "f", 2), (3, "g", 2)]


def test_no_function_takes_more_than_six_positional_parameters():
    wide = [f"{os.path.relpath(path, ROOT)}:{line} {name} ({n})" for path in SOURCES
            for line, name, n in positional_counts(open(path, encoding="utf-8").read())
            if n > MOST_POSITIONAL]
    assert wide == []


def module_name(path: str) -> str:
    """/repo/core/diffusion.py -> 'core.diffusion'; /repo/ddpm.py -> 'ddpm'."""
    rel = os.path.relpath(path, ROOT)[:-3]
    return rel.replace(os.sep, ".").removesuffix(".__init__")


def imports_of(source: str, modules: set[str]) -> set[str]:
    """The project modules a module imports, anywhere in it (a function-level import counts):
    `import unet`, `from core import diffusion` and `from core.diffusion import x` all name one."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {f"{node.module}.{a.name}" for a in node.names} & modules
            if node.module in modules:
                found.add(node.module)
    return found


def project_graph() -> dict[str, set[str]]:
    """Every module of the project (the tests' aside) -> the project modules it imports."""
    paths = [p for p in SOURCES if os.path.basename(os.path.dirname(p)) != "tests"]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(open(p, encoding="utf-8").read(), modules) - {module_name(p)}
            for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or round a circle."""
    reach = {m: set(deps) for m, deps in graph.items()}
    changed = True
    while changed:  # the transitive closure: small graphs, a few rounds
        changed = False
        for m in reach:
            more = set().union(*(reach[d] for d in reach[m])) - reach[m]
            if more:
                reach[m] |= more
                changed = True
    groups = {tuple(sorted(n for n in reach if m in reach[n] and n in reach[m])) for m in reach}
    return sorted(list(g) for g in groups if g)


def test_the_cycle_finder_finds_a_circle_of_three():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_the_project_imports_itself_round_a_circle():
    graph = project_graph()
    assert len(graph) > 30 and graph["ddpm"]  # the finder sees the packages' modules
    assert cycles(graph) == []


# The layers, lowest first, and what each may import (docs/design.md). A module is in the layer
# of its folder; at the root, unet is the core's, data and ui are shared helpers, and the rest is
# the command line.
LAYERS = {"core": {"core"}, "shared": {"core", "shared"},
          "features": {"core", "shared", "features"}, "run": {"core", "shared", "features", "run"},
          "cli": {"core", "shared", "features", "run", "cli"},
          "tools": {"core", "shared", "features", "run", "cli", "tools"}}
AT_ROOT = {"unet": "core", "data": "shared", "ui": "shared", "ddpm": "cli", "config": "cli",
           "settings": "cli", "validation": "cli"}


def layer_of(module: str) -> str:
    return module.split(".")[0] if "." in module or module in PACKAGES else AT_ROOT[module]


def test_each_layer_imports_only_the_layers_below_it():
    graph = project_graph()
    assert set(m for m in graph if "." not in m) - set(PACKAGES) == set(AT_ROOT)
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                    if layer_of(d) not in LAYERS[layer_of(m)])
    assert upward == []


def test_the_core_imports_torch_and_the_core_only():
    """No files, console or images: the core reads like the papers."""
    allowed = {"math", "dataclasses", "torch", "typing", "__future__"}
    for m in [m for m in project_graph() if layer_of(m) == "core"]:
        path = os.path.join(ROOT, *m.split(".")) + ".py"
        if not os.path.exists(path):
            path = os.path.join(ROOT, m, "__init__.py")
        tree = ast.parse(open(path, encoding="utf-8").read())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        outside = {n for n in names if n.split(".")[0] not in allowed | {"core", "unet"}}
        assert outside == set(), m


def test_at_most_eight_modules_at_the_root_and_a_docstring_per_folder():
    assert len(glob.glob(os.path.join(ROOT, "*.py"))) <= 8
    for d in PACKAGES:
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, d, "__init__.py")).read()))
        assert doc and "import" in doc, d  # what lives there and what it may import


def test_nothing_edits_the_import_path():
    edit = re.compile(r"sys\.path" + r"\s*(\[|\.(insert|append|extend)|\+?=)")
    found = [f"{os.path.relpath(p, ROOT)}:{i}" for p in SOURCES
             for i, line in enumerate(open(p, encoding="utf-8"), 1) if edit.search(line)]
    assert found == []
