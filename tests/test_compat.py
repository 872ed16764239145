"""Keras private API: one check per private attribute ``ranzcr_tf/compat.py`` uses, and a scan that keeps
every other module of the package off Keras internals.

A failing check here means the installed Keras changed something compat.py relies on: the message names
the attribute, the installed Keras version and the versions compat.py was checked on.
"""

import ast
import importlib
import inspect
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from ranzcr_tf import compat

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ranzcr_tf")


def require(owner, name: str, where: str):
    """``getattr(owner, name)``, or a test failure naming ``where.name`` and the Keras versions."""
    if not hasattr(owner, name):
        pytest.fail(f"Keras {keras.__version__} has no {where}.{name}, which ranzcr_tf/compat.py uses (checked on "
                    f"Keras {compat.checked_versions()}): adapt compat.py, or keep keras below {keras.__version__} "
                    "in pyproject.toml", pytrace=False)
    return getattr(owner, name)


def test_a_missing_attribute_fails_naming_it_and_the_keras_version():
    with pytest.raises(pytest.fail.Exception, match=rf"Keras {keras.__version__} has no Trainer\._gone_in_a_release"):
        require(keras.Model, "_gone_in_a_release", "Trainer")


# ----------------------------------------------------------------------------------------------- one test per name
def test_keras_home():
    config = importlib.import_module("keras.src.backend.config")
    require(config, "keras_home", "keras.src.backend.config")
    home = compat.keras_home()
    assert isinstance(home, str) and os.path.isabs(os.path.expanduser(home))


class _Served(Exception):
    pass


@pytest.mark.parametrize("module_name", ["efficientnet", "efficientnet_v2", "mobilenet_v3"])
def test_file_utils(module_name):
    module = importlib.import_module(f"keras.src.applications.{module_name}")
    require(require(module, "file_utils", f"keras.src.applications.{module_name}"), "get_file",
            f"keras.src.applications.{module_name}.file_utils")


def test_file_utils_answers_the_imagenet_download():
    """The constructor really asks the swapped-in object for the ImageNet file, and the original comes back."""
    module = importlib.import_module("keras.src.applications.mobilenet_v3")
    original = module.file_utils

    class Answer:
        def __init__(self, wrapped):
            self.wrapped, self.asked = wrapped, []

        def get_file(self, fname=None, origin=None, **kwargs):
            self.asked.append(fname)
            raise _Served(fname)

    with pytest.raises(_Served), compat.application_file_utils("mobilenet_v3", Answer) as answer:
        keras.applications.MobileNetV3Small(include_top=False, weights="imagenet", input_shape=(32, 32, 3))
    assert answer.wrapped is original and answer.asked and answer.asked[0].endswith(".h5")
    assert module.file_utils is original


def test_distribute_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        inside = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    outside = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    require(inside, "_distribute_strategy", "Trainer (TensorFlow backend)")
    assert compat.built_under_strategy(inside) and not compat.built_under_strategy(outside)


def _counting_dataset(starts: list):
    def rows():
        starts.append(1)
        for i in range(8):
            yield np.full((4,), i, "float32"), np.ones((1,), "float32")

    spec = (tf.TensorSpec((4,), tf.float32), tf.TensorSpec((1,), tf.float32))
    dataset = tf.data.Dataset.from_generator(rows, output_signature=spec).batch(4)
    return dataset.apply(tf.data.experimental.assert_cardinality(2))


def _fit_under_strategy(replace: bool) -> int:
    """How many times one ``fit`` epoch under a (one-device) MirroredStrategy starts reading the data."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    if replace:
        compat.build_from_symbolic_batch(model, strategy, (keras.KerasTensor((1, 4)), keras.KerasTensor((1, 1))))
    starts = []
    model.fit(_counting_dataset(starts), epochs=1, verbose=0, shuffle=False)
    assert model.optimizer.built and model.built
    return len(starts)


def test_maybe_symbolic_build():
    require(keras.Model, "_maybe_symbolic_build", "Trainer")
    # Keras' own hook reads a throw-away batch from a second pass over the data; ours builds from shapes.
    assert _fit_under_strategy(replace=False) == 2
    assert _fit_under_strategy(replace=True) == 1


def test_symbolic_build():
    require(keras.Model, "_symbolic_build", "Trainer")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    compat.build_from_symbolic_batch(model, strategy, (keras.KerasTensor((1, 4)), keras.KerasTensor((1, 1))))
    assert not model.optimizer.built
    model._maybe_symbolic_build()  # what fit calls first, before reading any data
    assert model.optimizer.built and len(model.optimizer.variables) > 1


def test_wrap_train_step_is_what_fit_calls():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    traced = []

    def vector_loss(train_step):
        def step(data):
            traced.append(1)
            logs = train_step(data)
            return {name: keras.ops.reshape(value, (1,)) for name, value in logs.items()}

        return step

    compat.wrap_train_step(model, vector_loss)
    history = model.fit(_counting_dataset([]), epochs=1, verbose=0, shuffle=False).history
    assert traced and np.shape(history["loss"][0]) in ((), (1,))


def _ema_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.1, use_ema=True, ema_momentum=0.5), loss="mse")
    for value in (1.0, -1.0, 2.0):  # train_on_batch: fit would copy the averages into the model at its end
        model.train_on_batch(np.full((4, 4), value, "float32"), np.ones((4, 1), "float32"))
    return model


def test_swap_variables():
    require(keras.callbacks.SwapEMAWeights, "_swap_variables", "keras.callbacks.SwapEMAWeights")
    model = _ema_model()
    trained = [w.copy() for w in model.get_weights()]
    optimizer_values = [np.asarray(v) for v in model.optimizer.variables]
    compat.swap_ema_weights(model)
    swapped = model.get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(trained, swapped))  # the averages differ after training
    for w in swapped:  # ... and they are the optimizer's moving averages (Keras swaps by adding and subtracting)
        assert any(v.shape == w.shape and np.allclose(v, w, rtol=1e-6, atol=1e-6) for v in optimizer_values)
    compat.swap_ema_weights(model)
    for a, b in zip(trained, model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_iterations():
    optimizer = keras.optimizers.SGD(learning_rate=lambda_schedule(), gradient_accumulation_steps=2)
    optimizer.build([keras.Variable(np.zeros(2, "float32"))])
    counter = require(optimizer, "_iterations", "keras.optimizers.Optimizer")
    assert counter is compat.optimizer_step_counter(optimizer)
    compat.optimizer_step_counter(optimizer).assign(6)
    assert compat.optimizer_steps(optimizer) == 6
    # Why the private counter: the public one is steps // accumulation, and the schedule reads the raw one.
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 3
    assert float(keras.ops.convert_to_numpy(optimizer.learning_rate)) == 6.0


def test_inbound_nodes():
    inner_input = keras.Input((4,))
    inner = keras.Model(inner_input, keras.layers.Dense(3, name="inner_dense")(inner_input), name="inner")
    outer_input = keras.Input((4,))
    features = inner(outer_input)
    outer = keras.Model(outer_input, keras.layers.Dense(2, name="outer_head")(features))
    require(inner, "_inbound_nodes", "keras.Operation")
    tensor = compat.called_output(outer.get_layer("inner"))
    assert tensor is features and tensor is not inner.output  # the outer graph's tensor, not the nested one
    assert compat.called_input(outer.get_layer("inner")) is outer_input  # Node.input_tensors: what feeds it
    split = keras.Model(outer.inputs, [tensor, outer.output])  # what report.gradcam builds
    x = np.ones((1, 4), "float32")
    hidden, out = split(x)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(inner(x)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out), np.asarray(outer(x)), rtol=1e-6)


def lambda_schedule():
    class StepAsRate(keras.optimizers.schedules.LearningRateSchedule):
        def __call__(self, step):
            return keras.ops.cast(step, "float32")

        def get_config(self):
            return {}

    return StepAsRate()


def test_weights_file_bytes(tmp_path):
    """H5IOStore and _save_state: the in-memory weights file loads back into the model, optimizer state too."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 4), "float32"), np.zeros((4, 3), "float32"), epochs=1, verbose=0)
    path = tmp_path / "m.weights.h5"
    path.write_bytes(compat.weights_file_bytes(model))
    copy = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    copy.compile(optimizer="adam", loss="mse")
    copy.optimizer.build(copy.trainable_variables)
    copy.load_weights(str(path))
    for a, b in zip(model.get_weights() + [v.numpy() for v in model.optimizer.variables],
                    copy.get_weights() + [v.numpy() for v in copy.optimizer.variables]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    saved = tmp_path / "m.keras"
    saved.write_bytes(compat.model_file_bytes(model))
    np.testing.assert_array_equal(keras.saving.load_model(str(saved)).get_weights()[0], model.get_weights()[0])


CHECKS = {"keras_home": test_keras_home, "file_utils": test_file_utils,
          "_distribute_strategy": test_distribute_strategy, "_maybe_symbolic_build": test_maybe_symbolic_build,
          "_symbolic_build": test_symbolic_build, "_swap_variables": test_swap_variables,
          "_iterations": test_iterations, "_inbound_nodes": test_inbound_nodes,
          "saving_lib": test_weights_file_bytes, "_save_state": test_weights_file_bytes}


def test_every_private_name_of_compat_has_a_check_here():
    assert set(compat.PRIVATE_NAMES) == set(CHECKS), "compat.PRIVATE_NAMES and CHECKS here must list the same names"
    source = package_sources()[os.path.join("ranzcr_tf", "compat.py")]
    used = {v.split(":")[-1].strip()
            for v in scan(source, "compat.py", own_names(package_sources()), kinds=("attribute", "getattr"))}
    assert used == {name for name in compat.PRIVATE_NAMES if name.startswith("_")}, used


# ----------------------------------------------------------------------------------------------- the package scan
def package_sources() -> dict:
    sources = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                with open(path, encoding="utf-8") as handle:
                    sources[os.path.relpath(path, os.path.dirname(PACKAGE))] = handle.read()
    return sources


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _targets(node):
    if isinstance(node, (ast.Tuple, ast.List)):
        for item in node.elts:
            yield from _targets(item)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)
    else:
        yield node


def own_names(sources: dict) -> set:
    """Underscore names ranzcr_tf defines itself: functions, classes, module and class-level names, and
    ``self.<name>`` / ``cls.<name>`` assignments (an assignment to another object's attribute defines nothing).

    A method or ``self`` attribute of a Keras subclass that the Keras class has too (an overridden private
    hook such as ``BackupAndRestore._load_model``) stays Keras' name, so calling it elsewhere is still caught.
    """
    names = set()
    for source in sources.values():
        tree = ast.parse(source)
        bound = _imported_modules(tree)
        keras_owned = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                bases = [b for b in (_keras_base(base, bound) for base in node.bases) if b is not None]
                keras_owned.update(id(item) for item in ast.walk(node)
                                   if _defined_name(item) and any(_keras_has(b, _defined_name(item)) for b in bases))
        for node in ast.walk(tree):
            if id(node) not in keras_owned and _defined_name(node):
                names.add(_defined_name(node))
            targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                       if isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For)) else [])
            for target in (t for top in targets for t in _targets(top)):
                if isinstance(target, ast.Name):
                    names.add(target.id)
                elif _self_attribute(target) and id(target) not in keras_owned:
                    names.add(target.attr)
    return {name for name in names if _private(name)}


def _self_attribute(node) -> bool:
    return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")


def _defined_name(node) -> str | None:
    """The name a function, class or ``self.<name>`` assignment target defines."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if _self_attribute(node) and isinstance(node.ctx, ast.Store):
        return node.attr
    return None


def _keras_has(cls, name: str) -> bool:
    """Whether Keras class ``cls`` has ``name`` as a class attribute or sets ``self.<name>`` in its source."""
    return hasattr(cls, name) or _keras_sets_attribute(cls, name)


def _imported_modules(tree) -> dict:
    """Local name -> the module path it was imported as (``np`` -> ``numpy``, ``callbacks`` -> ``keras.callbacks``)."""
    bound = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                bound[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return bound


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _keras_base(base, bound: dict):
    """The Keras class a class-definition base expression names, or None."""
    dotted = _dotted(base)
    if dotted is None:
        return None
    head, _, rest = dotted.partition(".")
    path = bound.get(head, "")
    if path.split(".")[0] != "keras":
        return None
    obj = importlib.import_module(path.split(".")[0])
    for part in (path.split(".")[1:] + (rest.split(".") if rest else [])):
        obj = getattr(obj, part, None)
    return obj if inspect.isclass(obj) else None


def _keras_sets_attribute(cls, name: str) -> bool:
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] != "keras":
            continue
        try:
            if f"self.{name} " in inspect.getsource(klass) or f"self.{name}=" in inspect.getsource(klass):
                return True
        except (OSError, TypeError):
            continue
    return False


ALL_KINDS = ("import", "attribute", "getattr", "hook")


def scan(source: str, filename: str, own: set, kinds=ALL_KINDS) -> list[str]:
    """``"file:line: what"`` for each use of Keras internals in ``source``:

    - ``import``: an import of ``keras.src`` or a ``"keras.src..."`` string (``importlib.import_module``);
    - ``attribute``: ``x._name`` where ``_name`` is not one of ``own`` and ``x`` is not a non-Keras module
      (``os._exit`` is fine);
    - ``getattr``: ``getattr``/``hasattr``/``setattr``/``delattr`` with such a name as a string;
    - ``hook``: a subclass of a Keras class defining a method the Keras class has under an underscore
      name (overriding a private hook), or assigning ``self._name`` that the Keras class sets itself.
    """
    tree = ast.parse(source)
    bound = _imported_modules(tree)
    in_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    found = []

    def report(kind, node, what):
        if kind in kinds:
            found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "keras.src" or alias.name.startswith("keras.src."):
                    report("import", node, f"import of {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("keras.src") or (node.module == "keras"
                                                       and any(a.name == "src" for a in node.names)):
                report("import", node, f"import from {node.module}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("keras.src") \
                and id(node) not in in_fstrings:
            report("import", node, f"string naming {node.value}")
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value).startswith("keras.src"):
            report("import", node, f"f-string naming {node.values[0].value}...")
        elif isinstance(node, ast.Attribute) and node.attr == "src" and isinstance(node.value, ast.Name) \
                and bound.get(node.value.id, "").split(".")[0] == "keras":
            report("import", node, "access to keras.src")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            base = node.value
            module = bound.get(base.id) if isinstance(base, ast.Name) else None
            if module is None or module.split(".")[0] == "keras":
                report("attribute", node, f"private attribute access .{node.attr}: {node.attr}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2 \
                and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str) \
                and _private(node.args[1].value) and node.args[1].value not in own:
            report("getattr", node, f"{node.func.id}(..., {node.args[1].value!r}): {node.args[1].value}")
        elif isinstance(node, ast.ClassDef):
            keras_bases = [b for b in (_keras_base(base, bound) for base in node.bases) if b is not None]
            if not keras_bases:
                continue
            for item in ast.walk(node):
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _private(item.name) \
                        and any(hasattr(b, item.name) for b in keras_bases):
                    report("hook", item, f"{node.name} overrides Keras' private {item.name}: {item.name}")
                targets = item.targets if isinstance(item, ast.Assign) else [item.target] \
                    if isinstance(item, (ast.AnnAssign, ast.AugAssign)) else []
                for target in (t for top in targets for t in _targets(top)):
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id == "self" and _private(target.attr) \
                            and any(_keras_sets_attribute(b, target.attr) for b in keras_bases):
                        report("hook", target, f"{node.name} sets Keras' private self.{target.attr}: {target.attr}")
    return found


def test_no_module_but_compat_touches_keras_internals():
    sources = package_sources()
    own = own_names(sources)
    violations = [v for path, source in sorted(sources.items()) if path != os.path.join("ranzcr_tf", "compat.py")
                  for v in scan(source, path, own)]
    assert not violations, ("Keras private API outside ranzcr_tf/compat.py (move it there, with the Keras versions "
                            "it was checked on, and add a check to tests/test_compat.py):\n" + "\n".join(violations))


VIOLATIONS = {
    "from keras.src.utils import file_utils": "import from keras.src.utils",
    "import keras.src.backend.config as config": "import of keras.src.backend.config",
    "from keras import src": "import from keras",
    "import importlib\nm = importlib.import_module(f'keras.src.applications.{name}')": "f-string naming keras.src",
    "import keras\nmodel = keras.Model()\nmodel._initial_epoch = 3": "private attribute access ._initial_epoch",
    "step = int(optimizer._iterations)": "private attribute access ._iterations",
    "import keras\nkeras.src.backend.config.keras_home()": "access to keras.src",
    "if hasattr(type(model), '_maybe_symbolic_build'): pass": "hasattr(..., '_maybe_symbolic_build')",
    ("import keras\nclass Backup(keras.callbacks.BackupAndRestore):\n"
     "    def _save_model(self):\n        pass"): "Backup overrides Keras' private _save_model",
    ("from keras import callbacks\nclass Backup(callbacks.BackupAndRestore):\n"
     "    def on_epoch_end(self, epoch, logs=None):\n        self._current_epoch = epoch"):
        "Backup sets Keras' private self._current_epoch",
    ("import keras\nclass Backup(keras.callbacks.BackupAndRestore):\n    def _load_model(self):\n        pass\n"
     "def restore(backup):\n    backup._load_model()"): "private attribute access ._load_model",
}


@pytest.mark.parametrize("snippet", list(VIOLATIONS))
def test_scan_catches(snippet):
    found = scan(snippet, "snippet.py", own_names({"snippet.py": snippet}))
    assert any(VIOLATIONS[snippet] in line for line in found), found


ALLOWED = [
    "import os\nos._exit(1)",  # a private name of a non-Keras module
    "class Proxy:\n    def __init__(self, x):\n        self._x = x\n    def get(self):\n        return self._x",
    ("import keras\nclass Guard(keras.callbacks.Callback):\n    def __init__(self):\n        super().__init__()\n"
     "        self._epoch = 0\n    def _check(self):\n        return self._epoch"),  # names Keras' Callback lacks
    "x = type(model).train_step.__get__(model)",  # dunders are Python's, not Keras'
]


@pytest.mark.parametrize("snippet", ALLOWED)
def test_scan_allows(snippet):
    assert scan(snippet, "snippet.py", own_names({"snippet.py": snippet})) == []


# ----------------------------------------------------------------------------------------------- accelerator
def test_one_accelerator_detection_feeds_placement_precision_and_data(monkeypatch):
    """Placement (hence the precision policy) and the pipeline's image dtype ask the same function."""
    from ranzcr_tf import device
    from ranzcr_tf.config import load_config
    from ranzcr_tf.pipeline import data
    from ranzcr_tf.train import placement

    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert device.detect_accelerator() == "cpu"  # conftest hides the GPUs; no TPU here
    assert placement.choose_placement("default").accelerator == "cpu"
    calls = []
    monkeypatch.setattr(device, "detect_accelerator", lambda: calls.append(1) or "tpu")
    assert placement.choose_placement("default").accelerator == "tpu"
    cfg = load_config(None, [])
    assert data._resolve_dtype(cfg, None) == tf.bfloat16  # what image_dtype_for gives a TensorFlow TPU
    assert len(calls) == 2
