"""The package's import graph: no circle, no import from a lower stage to a higher one, no import side effects.

    python tests/test_imports.py          # prints every edge (module -> module, file:line, stage order)

Every import of a ``ranzcr_tf`` module counts, at module level and inside functions alike (a function-level
import hides a circle from Python, not from the architecture). Code under ``if __name__ == "__main__":`` is
left out: it runs only when that file is the program, never when the module is imported.

The stage order is written here, once. A module's stage is its subpackage; the modules at the top of the
package (``config``, ``labels``, ``io_utils``, ``runs``, ``compat``, ``device``, ``tables``, ``cli``) are the
shared bottom layer. Where the less obvious ones sit, and why:

- ``cli`` is shared: the one set of command-line conventions, used by every stage's ``main()``. It imports
  only shared modules, and importing it changes nothing (``cli.setup()`` is an explicit call).
- ``<stage>/__main__.py`` belongs to its stage: it wires that stage's functions to a command line.
- ``demo`` sits above ``report`` (``entry``): it chains every stage's command, as a user would.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "ranzcr_tf"
STAGES = ("shared", "prep", "synth", "pipeline", "model", "train", "serve", "report", "entry")
ENTRY_MODULES = {"ranzcr_tf.demo": "entry"}

# Allowed exceptions, each with its reason. Keep these few; remove an entry as soon as its reason is gone.
ALLOWED_CIRCLES: dict[frozenset, str] = {}
ALLOWED_UPWARD: dict[tuple[str, str], str] = {}


# ----------------------------------------------------------------------------------------------- the graph
def package_modules(root: str = ROOT) -> dict[str, str]:
    """``{dotted module name: file path}`` of every module of the package."""
    found = {}
    for folder, dirs, files in os.walk(os.path.join(root, PACKAGE)):
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__pycache__")))
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def stage_of(module: str) -> str:
    if module in ENTRY_MODULES:
        return ENTRY_MODULES[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in STAGES) else "shared"


def _is_main_guard(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and any(isinstance(c, ast.Constant) and c.value == "__main__"
                                                   for c in test.comparators))


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == PACKAGE]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # relative import
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    if base.split(".")[0] != PACKAGE:
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_edges(root: str = ROOT) -> list[tuple[str, str, str]]:
    """``(importer, imported, "file:line")`` for every import of a package module, outside main guards."""
    modules = package_modules(root)
    edges = []
    for module, path in modules.items():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        stack = [tree]
        while stack:
            node = stack.pop()
            for child in ast.iter_child_nodes(node):
                if _is_main_guard(child):
                    continue
                for target in _targets(child, module, path.endswith("__init__.py"), modules):
                    if target != module:
                        edges.append((module, target, f"{os.path.relpath(path, root)}:{child.lineno}"))
                stack.append(child)
    return sorted(set(edges))


def circles(edges) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for source, target, _ in edges:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward(edges) -> list[tuple[str, str, str]]:
    return [(a, b, where) for a, b, where in edges if STAGES.index(stage_of(b)) > STAGES.index(stage_of(a))]


# ----------------------------------------------------------------------------------------------- tests
def test_every_module_has_a_stage():
    for module in package_modules():
        assert stage_of(module) in STAGES, module


def test_no_import_circle():
    edges = import_edges()
    found = [c for c in circles(edges) if frozenset(c) not in ALLOWED_CIRCLES]
    detail = [f"{a} -> {b} ({where})" for c in found for a, b, where in edges if a in c and b in c]
    assert not found, "import circles:\n" + "\n".join(detail)


def test_no_import_from_a_lower_stage_to_a_higher_one():
    bad = [(a, b, where) for a, b, where in upward(import_edges()) if (a, b) not in ALLOWED_UPWARD]
    assert not bad, "upward imports (stage order: " + " -> ".join(STAGES) + "):\n" + "\n".join(
        f"{a} [{stage_of(a)}] -> {b} [{stage_of(b)}] ({where})" for a, b, where in bad)


def test_the_allowed_exceptions_are_still_needed():
    edges = import_edges()
    live = {frozenset(c) for c in circles(edges)}
    assert not [c for c in ALLOWED_CIRCLES if c not in live], "an allowed circle is gone: drop it from ALLOWED_CIRCLES"
    live_upward = {(a, b) for a, b, _ in upward(edges)}
    assert not [e for e in ALLOWED_UPWARD if e not in live_upward], "an allowed upward import is gone: drop it"


def test_the_checks_catch_a_circle_and_an_upward_import(tmp_path):
    """The graph reader on a made-up package: a function-level import closing a circle, and prep -> train."""
    package = tmp_path / PACKAGE
    for folder in ("prep", "train"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "labels.py").write_text("def f():\n    from ranzcr_tf import config\n")
    (package / "config.py").write_text("from ranzcr_tf import labels\n")
    (package / "prep" / "convert.py").write_text("from ranzcr_tf.train.fit import train\n")
    (package / "train" / "fit.py").write_text("from . import helpers\nif __name__ == '__main__':\n"
                                              "    from ranzcr_tf.prep import convert\n")
    (package / "train" / "helpers.py").write_text("")
    edges = import_edges(str(tmp_path))
    assert circles(edges) == [{"ranzcr_tf.config", "ranzcr_tf.labels"}]
    assert [(a, b) for a, b, _ in upward(edges)] == [("ranzcr_tf.prep.convert", "ranzcr_tf.train.fit")]
    assert ("ranzcr_tf.train.fit", "ranzcr_tf.train.helpers") in {(a, b) for a, b, _ in edges}


# The third-party libraries the package imports set environment variables of their own when imported
# (TensorFlow: TF_CPP_MIN_LOG_LEVEL=1, TF2_BEHAVIOR, ...; OpenCV: LD_LIBRARY_PATH). A first interpreter
# imports only them and reports what they set; the package's modules may change nothing beyond that.
THIRD_PARTY = ("cv2", "tensorflow", "keras", "jax", "matplotlib", "sklearn", "pandas", "pydicom", "h5py")
THIRD_PARTY_ENV = textwrap.dedent("""
    import importlib, json, os, sys
    before = dict(os.environ)
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    print(json.dumps({k: v for k, v in os.environ.items() if before.get(k) != v}))
""")
IMPORT_ALL = textwrap.dedent("""
    import importlib, json, os, sys
    theirs = json.loads(os.environ.pop("THIRD_PARTY_ENV"))
    environ, meta_path = dict(os.environ), list(sys.meta_path)
    skipped = []
    for name in sys.argv[1:]:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an optional dependency (pydicom, jax) that is not installed
            if (exc.name or "").startswith("ranzcr_tf"):
                raise
            skipped.append(name)
            continue
        changed = sorted(k for k in set(environ) | set(os.environ)
                         if environ.get(k) != os.environ.get(k) and theirs.get(k, environ.get(k)) != os.environ.get(k))
        assert not changed, f"importing {name} changed os.environ: {changed}"
        ours = [hook for hook in sys.meta_path if hook not in meta_path
                and (getattr(hook, "__module__", "") or type(hook).__module__).startswith("ranzcr_tf")]
        assert not ours, f"importing {name} changed sys.meta_path: {ours}"  # (absl, six add their own)
    print("IMPORTED", len(sys.argv) - 1 - len(skipped), "SKIPPED", skipped)
""")


def test_importing_any_module_changes_no_global_state():
    """Every module imported in a fresh interpreter: os.environ and sys.meta_path stay as they were (beyond
    what the third-party libraries set and add themselves), so importing a library module starts no CLI and quiets
    nothing (``cli.setup()`` is the entry points' call)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "RANZCR_VERBOSE")}
    env.update(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    baseline = subprocess.run([sys.executable, "-c", THIRD_PARTY_ENV, *THIRD_PARTY], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=600)
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    env["THIRD_PARTY_ENV"] = baseline.stdout.strip().splitlines()[-1]
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL, *sorted(package_modules())], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0 and "IMPORTED" in result.stdout, result.stderr[-3000:]


def test_the_side_effect_check_sees_a_module_that_quiets_tensorflow_at_import():
    """The check above on ``cli.setup()`` itself: what a module calling it at import would do is seen."""
    env = dict(os.environ, PYTHONPATH=ROOT, THIRD_PARTY_ENV="{}")
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    script = IMPORT_ALL.replace("importlib.import_module(name)", "importlib.import_module(name).setup()")
    result = subprocess.run([sys.executable, "-c", script, "ranzcr_tf.cli"], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=120)
    assert result.returncode != 0 and "importing ranzcr_tf.cli changed os.environ" in result.stderr, result.stderr


if __name__ == "__main__":
    for source, target, where in import_edges():
        print(f"{source} [{stage_of(source)}] -> {target} [{stage_of(target)}]  {where}")
    print("circles:", circles(import_edges()) or "none")
