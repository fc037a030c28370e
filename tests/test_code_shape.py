"""Facts about the code's shape that a reader relies on: no function takes more than 6
positional parameters (after self or cls); the rest are keyword-only, named at every call."""
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
