"""Build the local downstream tasks' data from the Python standard library's own sources.

    python examples/downstream/make_data.py        # writes stdlib_mc.jsonl and stdlib_docs.jsonl here

- stdlib_mc.jsonl (multiple choice, task `stdlib_next_line`, up to 200 documents): a line of code from a standard-library
  module, cut at a space in its first half; the choices are its true second half and the second halves of
  three other lines of the same module (chance: 1 in 4).
- stdlib_docs.jsonl (loglikelihood_rolling, task `stdlib_docstrings`): docstrings of its modules, classes and functions (200 characters or more), scored by
  perplexity per word and per byte.

The files are checked in (the data must not change with the Python version that reads it); this
script says how they were made. Seeded: the same Python gives the same files.
"""

from __future__ import annotations

import ast
import json
import random
import sysconfig
from pathlib import Path

MODULES = ("json/decoder.py", "json/encoder.py", "email/utils.py", "http/cookies.py", "logging/handlers.py", "textwrap.py",
           "string.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "calendar.py", "csv.py", "difflib.py")
MC_DOCS, DOCSTRINGS = 200, 24


def code_lines(source: str) -> list[str]:
    """Lines worth guessing: code of 30-90 characters (no comments, no docstring or string-only lines)."""
    strings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            strings.update(range(node.lineno, node.end_lineno + 1))
    out = []
    for no, line in enumerate(source.splitlines(), 1):
        s = line.strip()
        if no not in strings and 30 <= len(s) <= 90 and not s.startswith(("#", '"', "'")) and any(c in s for c in "=(."):
            out.append(s)
    return out


def docstrings(source: str) -> list[str]:
    """The module's docstring and its functions' and classes' (at least 200 characters)."""
    tree = ast.parse(source)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    return [d.strip() for d in (ast.get_docstring(n) for n in nodes) if d and len(d) >= 200]


def main() -> None:
    rng = random.Random(1234)
    root, here = Path(sysconfig.get_path("stdlib")), Path(__file__).parent
    docs, texts = [], []
    for name in MODULES:
        source = (root / name).read_text(encoding="utf-8")
        lines = sorted(set(code_lines(source)))
        rng.shuffle(lines)
        # Cut at a space (the harness joins context and choice with one): a word split in two
        # could tokenize with no token of its own for the choice.
        halves = [(line[:cut], line[cut + 1 :]) for line in lines if (cut := line.rfind(" ", 12, len(line) // 2 + 1)) > 0]
        for context, right in halves[: MC_DOCS // len(MODULES) + 1]:
            wrong = [r for _, r in rng.sample([h for h in halves if h[1] != right], 3)]
            choices = [right, *wrong]
            rng.shuffle(choices)
            docs.append({"module": name, "context": context, "choices": choices, "label": choices.index(right)})
        texts.extend({"module": name, "text": d} for d in docstrings(source)[:2])
    with open(here / "stdlib_mc.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs[:MC_DOCS])
    with open(here / "stdlib_docs.jsonl", "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in texts[:DOCSTRINGS])
    print(f"{here}: {min(len(docs), MC_DOCS)} multiple-choice documents, {min(len(texts), DOCSTRINGS)} docstrings")


if __name__ == "__main__":
    main()
