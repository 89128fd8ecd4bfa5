"""
How much of each paper script is the paper: the numbers of docs/readability.md (not a test).

    python bench/readability.py                 # the six scripts and common.py in this checkout
    python bench/readability.py --rev main      # the same files as a git revision has them

A script reads top to bottom in banner sections (81 '#', a title line, 81 '#'). Its paper part is its module
docstring (the equation sheet) and every section whose title starts with "The paper's" (its maths and its
networks); the rest is the imports, presets and constants before the first banner and the sections Training,
Sampling, Evaluation and Command line. Blank lines are not counted anywhere.
"""
import argparse
import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["ddpm.py", "ddim.py", "guided.py", "ddgan.py", "ldm.py", "dreambooth.py", "common.py"]
BANNER = re.compile(r"^#{81}\n#(.{79})#\n#{81}$", re.M)
MAX_LINE = 110


def parts(src):
    """Non-blank lines per part: doc (the module docstring), paper, rest; and the total."""
    lines = src.splitlines()
    tree = ast.parse(src)
    first = tree.body[0] if tree.body else None
    doc_end = first.end_lineno if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else 0
    kind = ["doc" if i < doc_end else "rest" for i in range(len(lines))]
    for m in BANNER.finditer(src):
        start = src[:m.start()].count("\n")
        part = "paper" if m.group(1).strip().startswith("The paper's") else "rest"
        kind[start:] = [part] * (len(lines) - start)
    counts = {"doc": 0, "paper": 0, "rest": 0}
    for k, line in zip(kind, lines):
        counts[k] += bool(line.strip())
    return counts, sum(counts.values())


def read(name, rev):
    if rev is None:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            return f.read()
    return subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", help="a git revision to measure instead of the working tree")
    args = p.parse_args()
    print("| file | lines | non-blank | docstring + maths + networks | maths + networks | lines > 110 |")
    print("|---|---|---|---|---|---|")
    for name in SCRIPTS:
        src = read(name, args.rev)
        counts, total = parts(src)
        long = sum(len(line) > MAX_LINE for line in src.splitlines())
        paper = counts["doc"] + counts["paper"]
        share, strict = "-", "-"                 # without sections (common.py, or before issue 19)
        if counts["paper"]:
            share = f"{paper} ({100 * paper / total:.0f}%)"
            strict = f"{counts['paper']} ({100 * counts['paper'] / total:.0f}%)"
        print(f"| {name} | {len(src.splitlines())} | {total} | {share} | {strict} | {long} |")


if __name__ == "__main__":
    main()
