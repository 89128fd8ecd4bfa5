"""The repository's own rules for readable code, checked on every .py file here (scripts, common.py, tests,
bench): no line over 110 characters, one statement per line, no conditional expression inside another."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINE = 110


def python_files():
    skip = {"out", "__pycache__"}
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in skip)
        found += [os.path.join(folder, f) for f in sorted(files) if f.endswith(".py")]
    return found


def test_the_checks_see_the_scripts_tests_and_bench():
    names = {os.path.relpath(p, ROOT) for p in python_files()}
    assert {"common.py", "ddpm.py", "guided.py", "tests/test_style.py", "bench/bench.py"} <= names


def test_no_line_is_longer_than_110_characters():
    long = [f"{os.path.relpath(p, ROOT)}:{i}: {len(line)} characters"
            for p in python_files() for i, line in enumerate(open(p, encoding="utf-8").read().splitlines(), 1)
            if len(line) > MAX_LINE]
    assert not long, "\n".join(long)


def test_one_statement_per_line():
    crowded = []
    for p in python_files():
        starts = [node.lineno for node in ast.walk(ast.parse(open(p, encoding="utf-8").read()))
                  if isinstance(node, ast.stmt)]
        crowded += [f"{os.path.relpath(p, ROOT)}:{line}" for line in sorted(set(starts))
                    if starts.count(line) > 1]
    assert not crowded, "\n".join(crowded)


def test_no_nested_conditional_expressions():
    nested = []
    for p in python_files():
        for node in ast.walk(ast.parse(open(p, encoding="utf-8").read())):
            inner = [n for n in ast.walk(node) if isinstance(n, ast.IfExp) and n is not node]
            if isinstance(node, ast.IfExp) and inner:
                nested.append(f"{os.path.relpath(p, ROOT)}:{node.lineno}")
    assert not nested, "\n".join(nested)


def test_the_checks_catch_what_they_forbid(tmp_path):
    bad = "x = 1; y = 2\nif x: y = 3\nz = 1 if x else 2 if y else 3\n"
    tree = ast.parse(bad)
    starts = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.stmt)]
    assert starts.count(1) == 2 and starts.count(2) == 2
    assert any(isinstance(n, ast.IfExp) and isinstance(n.orelse, ast.IfExp) for n in ast.walk(tree))
