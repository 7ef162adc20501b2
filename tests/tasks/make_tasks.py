"""Build the local harness tasks' data from the embedded corpus (the stdlib ``*.py`` files
that ``salt data prepare`` uses by default), deterministically:

* ``lambada.jsonl``: LAMBADA-style passages, one docstring paragraph per line whose last
  word is to be predicted (``text``; the word is ``text.split(' ')[-1]``);
* ``mc.jsonl``: multiple choice: a function's docstring summary, the function's name among
  four names of the same module (``summary``, ``choices``, ``label``);
* ``docs.jsonl``: whole docstrings for rolling log-likelihood (``text``).

Each file has a ``split`` field (train / test).  Run from the repository root:
``python tests/tasks/make_tasks.py``; the committed files were built with Python 3.11.
"""
import ast
import json
import pathlib
import random
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
WORD = re.compile(r"^[A-Za-z]{3,}$")


def docstrings():
    from salt.data import embedded_corpus
    root = pathlib.Path(embedded_corpus().description["stdlib_dir"])
    for path in embedded_corpus().files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.relative_to(root).as_posix()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                doc = ast.get_docstring(node)
                if doc and doc.isascii():
                    yield module, getattr(node, "name", None), node, doc


def lambada_passages(docs):
    for _, _, _, doc in docs:
        for para in doc.split("\n\n"):
            words = para.split()
            if not 25 <= len(words) <= 60 or any(c in para for c in "`>{}|*"):
                continue
            last = words[-1].rstrip(".")
            if words[-1].endswith(".") and WORD.match(last):
                yield " ".join(words[:-1] + [last])


def mc_items(docs, rng):
    by_module = {}
    for module, name, node, doc in docs:
        if isinstance(node, ast.FunctionDef) and not name.startswith("_"):
            summary = doc.strip().split("\n")[0].strip()
            if 20 <= len(summary) <= 100 and name.lower() not in summary.lower():
                by_module.setdefault(module, []).append((name, summary))
    for module in sorted(by_module):
        funcs = sorted(set(by_module[module]))
        names = sorted({n for n, _ in funcs})
        for name, summary in funcs:
            others = [n for n in names if n != name]
            if len(others) < 3:
                continue
            choices = rng.sample(others, 3) + [name]
            rng.shuffle(choices)
            yield {"summary": summary, "choices": choices, "label": choices.index(name)}


def write(name, rows, n_train, n_test, rng):
    rows = list(rows)
    rng.shuffle(rows)
    rows = rows[:n_train + n_test]
    if len(rows) < n_train + n_test:
        sys.exit(f"{name}: only {len(rows)} rows")
    with open(HERE / name, "w") as f:
        for i, row in enumerate(rows):
            row = row if isinstance(row, dict) else {"text": row}
            f.write(json.dumps(dict(row, split="train" if i < n_train else "test")) + "\n")


def main():
    docs = list(docstrings())
    rng = random.Random(0)
    write("lambada.jsonl", sorted(set(lambada_passages(docs))), 10, 40, rng)
    write("mc.jsonl", mc_items(docs, rng), 10, 40, rng)
    long_docs = sorted({d for _, _, _, d in docs if 400 <= len(d) <= 1500})
    write("docs.jsonl", long_docs, 0, 12, rng)


if __name__ == "__main__":
    main()
