"""Facts about the code's shape that a reader relies on: no function takes more than 6
positional parameters (after self or cls), the rest being keyword-only and named at every call;
no module imports itself round a circle of imports."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "scripts",
                                                                              "*.py"))
                 + glob.glob(os.path.join(ROOT, "tests", "*.py")))
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


def imports_of(source: str, modules: set[str]) -> set[str]:
    """The project modules a module imports, anywhere in it (a function-level import counts)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules
        elif isinstance(node, ast.ImportFrom) and node.module in modules:
            found.add(node.module)
    return found


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
    paths = glob.glob(os.path.join(ROOT, "*.py"))
    modules = {os.path.basename(p)[:-3] for p in paths}
    graph = {os.path.basename(p)[:-3]: imports_of(open(p, encoding="utf-8").read(), modules)
             for p in paths}
    assert cycles(graph) == []
