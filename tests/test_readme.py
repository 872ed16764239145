"""The README and docs/*.md against the repository: length, paths, commands, links, the layout map.

Rules (what counts, so a new path, command or link is covered without touching this file):

- **Paths**: every whitespace-separated word of an inline code span or a fenced code block in README.md
  and docs/*.md whose first component is one of ``SOURCE_ROOTS`` (the checked-in top level) must exist;
  a word with ``* ? [`` must match something. Words under ``GENERATED`` (outputs a run writes) and
  templates (``{`` or ``<``) are skipped. Words that are dotted module names (``ranzcr_tf.a.b``, or one
  attribute after the module) must name a module or package. Everything else (``runs/NAME``,
  ``demo/data``, ``gs://...``, Kaggle file names) is an example of an output or an input, not a repo path.
- **Commands**: the first cell of every row of the README's ``## Commands`` table. A code span starting
  ``python -m MOD`` or ``python SCRIPT`` is run with ``--help`` (after its subcommands: the leading
  lower-case words that are neither paths nor file names nor flags) and must exit 0 and list every
  ``--flag`` the span names; ``make T`` must be a Makefile target.
- **Links**: every relative markdown link resolves to a file, and its ``#anchor`` to a heading there
  (GitHub's slugs).
- **Layout**: every module of the package is named in the README's ``## Layout`` block.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_README_LINES = 220
SOURCE_ROOTS = (".ci", "Makefile", "README.md", "benchmarks", "configs", "docs", "kaggle_kernel.py",
                "make_tfrecords.py", "pyproject.toml", "ranzcr_tf", "tests", "train_tpu.py")
GENERATED = ("tests/artifacts/",)  # written by the tests themselves
HELP_TIMEOUT_S = 300  # a cold TensorFlow import on a loaded 2-core machine

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _documents() -> list[str]:
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _split_fences(text: str) -> tuple[list[str], list[str]]:
    """``(prose lines, code-block lines)`` of a markdown text."""
    prose, code, inside = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            inside = not inside
            continue
        (code if inside else prose).append(line)
    return prose, code


def _code_words(text: str) -> list[str]:
    prose, code = _split_fences(text)
    spans = [span for line in prose for span in INLINE_CODE.findall(line)]
    indented = [line for line in prose if line.startswith("    ")]  # indented code blocks
    return [word.strip("'\"(),;:") for chunk in spans + code + indented for word in chunk.split()]


def _path_problem(word: str) -> str | None:
    """Why ``word`` is a repo path that does not exist; None when it exists or is not a repo path."""
    if any(mark in word for mark in "{<") or word.startswith(GENERATED):
        return None
    first = word.split("/")[0]
    if first in SOURCE_ROOTS:
        if any(mark in word for mark in "*?["):
            return None if glob.glob(os.path.join(ROOT, word)) else "matches nothing"
        return None if os.path.exists(os.path.join(ROOT, word.rstrip("/"))) else "does not exist"
    if re.fullmatch(r"ranzcr_tf(\.\w+)+", word):
        return _module_problem(word.split("."))
    return None


def _module_problem(parts: list[str]) -> str | None:
    """A dotted name is a module or package, or a module and one name defined in it."""
    base = os.path.join(ROOT, *parts)
    if os.path.isdir(base) or os.path.isfile(base + ".py"):
        return None
    module = os.path.join(ROOT, *parts[:-1]) + ".py"
    if len(parts) > 2 and os.path.isfile(module):
        pattern = rf"^(def|class)\s+{parts[-1]}\b|^{parts[-1]}\s*[:=]"
        return None if re.search(pattern, _read(module), re.M) else f"{module} defines no {parts[-1]}"
    return "no such module"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    prose, _ = _split_fences(_read(path))
    seen: dict[str, int] = {}
    anchors = set()
    for line in prose:
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _table_commands() -> list[str]:
    """Code spans of the first cell of each row of the README's command table."""
    rows = [line for line in _section(_read(README), "Commands").splitlines() if line.startswith("|")]
    spans = []
    for row in rows[2:]:  # header and rule
        first_cell = re.split(r"(?<!\\)\|", row)[1]
        spans += [span.replace("\\|", "|") for span in INLINE_CODE.findall(first_cell)]
    return spans


def _help_argv(span: str) -> list[str]:
    words = span.split()
    if words[1] == "-m":
        argv, rest = [sys.executable, "-m", words[2]], words[3:]
    else:
        argv, rest = [sys.executable, words[1]], words[2:]
    for word in rest:  # subcommands: bare lower-case words before any argument or flag
        if not re.fullmatch(r"[a-z][a-z_]*", word):
            break
        argv.append(word)
    return argv + ["--help"]


def _run_help(argv: list[str]) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HELP_TIMEOUT_S)
    return done.returncode, done.stdout + done.stderr


def test_readme_is_short():
    lines = _read(README).count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/ (at most {MAX_README_LINES})"


def test_every_repo_path_the_documents_name_exists():
    problems = [f"{os.path.relpath(doc, ROOT)}: `{word}` {why}"
                for doc in _documents() for word in _code_words(_read(doc))
                for why in [_path_problem(word)] if why]
    assert not problems, "stale paths:\n" + "\n".join(problems)


def test_the_path_rule_catches_a_missing_path():
    assert _path_problem("ranzcr_tf/preprocess.py") == "does not exist"
    assert _path_problem("configs/*.nothing") == "matches nothing"
    assert _path_problem("ranzcr_tf.serve.nothing") == "no such module"
    assert _path_problem("ranzcr_tf.runs.require_ranzcr_run") is None
    assert _path_problem("runs/NAME/fold{k}") is None and _path_problem("demo/data") is None


def test_every_relative_link_resolves():
    problems = []
    for doc in _documents():
        for target in LINK.findall(_read(doc)):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file_part, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(doc), file_part)) if file_part else doc
            where = f"{os.path.relpath(doc, ROOT)}: ({target})"
            if not os.path.exists(path):
                problems.append(f"{where} no such file")
            elif anchor and path.endswith(".md") and anchor not in _anchors(path):
                problems.append(f"{where} no heading with anchor #{anchor}")
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_slugs_follow_github():
    assert _slug("Training (`train_tpu.py`)") == "training-train_tpupy"
    assert _slug("Soft labels, unlabeled images and blend") == "soft-labels-unlabeled-images-and-blend"


def _layout_sections(block: list[str]) -> dict[str, set[str]]:
    """Words of the layout map per package folder: ``""`` for ``ranzcr_tf/`` itself, ``"prep"`` for the lines
    from ``  prep/`` to the next folder line, and so on; lines after the package (``configs/``...) count for none."""
    sections: dict[str, set[str]] = {}
    current = None
    for line in block:
        folder = re.match(r"(\s*)([\w.]+)/", line)
        if folder and folder.group(2) == "ranzcr_tf":
            current = ""
        elif folder and current is not None and len(folder.group(1)) == 2:
            current = folder.group(2)
        elif folder and not folder.group(1):
            current = None
        if current is not None:
            sections.setdefault(current, set()).update(re.findall(r"[\w.]+", line))
    return sections


def test_the_layout_map_names_every_module():
    sections = _layout_sections(_split_fences(_section(_read(README), "Layout"))[1])
    package = os.path.join(ROOT, "ranzcr_tf")
    missing = []
    for path in sorted(glob.glob(os.path.join(package, "**", "*.py"), recursive=True)):
        folder = os.path.relpath(os.path.dirname(path), package).replace(os.sep, "/").replace(".", "")
        stem = os.path.splitext(os.path.basename(path))[0]
        named = sections.get(folder, set())
        if stem != "__init__" and stem not in named and f"{stem}.py" not in named:
            missing.append(os.path.relpath(path, ROOT))
    assert not missing, "README.md's layout map does not name, under its folder: " + ", ".join(missing)


def test_every_command_in_the_table_answers_help():
    spans = _table_commands()
    assert len(spans) >= 10, f"the command table lost its rows: {spans}"
    makefile = _read(os.path.join(ROOT, "Makefile"))
    for span in spans:
        if span.startswith("make "):
            target = span.split()[1]
            assert re.search(rf"^{re.escape(target)}\s*:", makefile, re.M), f"`{span}`: no Makefile target {target}"
    commands = [span for span in spans if span.startswith("python ")]
    argvs = {tuple(_help_argv(span)) for span in commands}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(argvs, pool.map(lambda argv: _run_help(list(argv)), argvs)))
    problems = []
    for span in commands:
        code, output = results[tuple(_help_argv(span))]
        if code != 0:
            problems.append(f"`{span}`: --help exited {code}: {output.strip()[-300:]}")
            continue
        unknown = [flag for flag in FLAG.findall(span) if not re.search(rf"{flag}(?![\w-])", output)]
        if unknown:
            problems.append(f"`{span}`: --help lists no {', '.join(unknown)}")
    assert not problems, "\n".join(problems)
