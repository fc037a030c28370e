"""The README's line of tested versions, read from requirements.lock: `python
tools/versions_line.py` prints it, `--write README.md` puts it in place of the old one
(make lock does); tests/test_docs.py checks that the README's line agrees with the lock."""
import os
import re
import sys

LOCK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "requirements.lock")

# The packages the line names: what the program and its test command run on.
NAMED = ["torch", "numpy", "pillow", "rich", "matplotlib", "pytest"]
PREFIX = "Tested with "


def locked(path: str = LOCK) -> dict[str, str]:
    """{package name in lower case: exact version} of the lock's `name==version` lines."""
    with open(path) as f:
        return {m[1].lower(): m[2] for m in re.finditer(r"^([\w.-]+)==(\S+)$", f.read(), re.M)}


def python_of(path: str = LOCK) -> str:
    """The Python version the lock was made on (its second comment line): '3.11'."""
    with open(path) as f:
        return re.search(r"on Python (\d+\.\d+)", f.read())[1]


def versions_line() -> str:
    pins = locked()
    named = ", ".join(f"{name} {pins[name]}" for name in NAMED)
    return f"{PREFIX}Python {python_of()}, {named} (every version: `requirements.lock`)."


if __name__ == "__main__":
    line = versions_line()
    if sys.argv[1:2] == ["--write"]:
        with open(sys.argv[2]) as f:
            text = f.read()
        text, n = re.subn(rf"^{PREFIX}.*$", line, text, count=1, flags=re.M)
        if not n:
            sys.exit(f"{sys.argv[2]}: no line starts with {PREFIX!r}")
        with open(sys.argv[2], "w") as f:
            f.write(text)
    print(line)
