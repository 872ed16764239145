"""Every use of Keras private API in ranzcr_tf, in one place.

Each function below names the private attribute it touches, the Keras versions it was checked on and
why no public API does the job. ``tests/test_compat.py`` fails with the attribute's name and the
installed Keras version when one of them disappears, so a Keras upgrade breaks loudly there instead of
silently in resume, EMA, multi-worker training or offline backbone weights. When raising the keras
upper bound in ``pyproject.toml``, re-read this module against the new Keras source and run that test.

No other module may import ``keras.src`` or touch an underscore attribute of a Keras object (the
same test scans the package for it).

Private uses that public API replaced (keep it that way): ``model._initial_epoch`` (the trainer passes
``initial_epoch`` to ``fit``), ``BackupAndRestore._load_model``/``_save_model``/``_current_epoch``
(``train.callbacks.Backup`` is a plain ``Callback``), ``AUC._from_logits`` (read from ``get_config()``).
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import warnings

import keras

# The Keras releases this module was checked on: tests/test_compat.py and the training tests ran on 3.15.1;
# the source of the Keras files it relies on (the TensorFlow trainer, Trainer, SwapEMAWeights,
# BaseOptimizer, backend/config, the three applications) was diffed against 3.14.0, 3.14.1 and 3.15.0:
# the parts used here are the same, except where a docstring below says otherwise.
CHECKED_KERAS_VERSIONS = ("3.14.0", "3.14.1", "3.15.0", "3.15.1")

# Every private name used below, for the test that pins one check per name.
PRIVATE_NAMES = ("keras_home", "file_utils", "_distribute_strategy", "_maybe_symbolic_build", "_symbolic_build",
                 "_swap_variables", "_iterations", "_inbound_nodes", "saving_lib", "_save_state")


def checked_versions() -> str:
    """``"3.14.0, 3.14.1, 3.15.0 and 3.15.1"``: for messages that say what this module was checked on."""
    return ", ".join(CHECKED_KERAS_VERSIONS[:-1]) + " and " + CHECKED_KERAS_VERSIONS[-1]


# ----------------------------------------------------------------------------------------------- backbones
def keras_home() -> str:
    """Keras' home folder (``$KERAS_HOME`` at keras import, else ``~/.keras``, else ``/tmp/.keras``).

    Private: ``keras.src.backend.config.keras_home`` (3.14.0-3.15.1). Keras has no public accessor, and
    its fallback rules (an unwritable home gives ``/tmp``) are worth not copying.
    """
    from keras.src.backend.config import keras_home as _keras_home

    return _keras_home()


# Swapping a module attribute is process-global: serialise concurrent builds.
_APPLICATION_LOCK = threading.Lock()


@contextlib.contextmanager
def application_file_utils(module_name: str, make_replacement):
    """Within the block, ``keras.applications``' module ``module_name`` uses ``make_replacement(original)``
    as its ``file_utils``; yields the replacement.

    Private: the module ``keras.src.applications.<module_name>`` and its global ``file_utils`` (3.14.0-
    3.15.1: ``efficientnet``, ``efficientnet_v2`` and ``mobilenet_v3`` call ``file_utils.get_file`` for
    ``weights="imagenet"``). Needed because the application constructors build a different graph for
    ``"imagenet"`` than for a weights path (see ``model.backbones``), and the only way to get the
    ImageNet graph with a local file, without a download or a hash check, is to answer ``get_file``.
    """
    module = importlib.import_module(f"keras.src.applications.{module_name}")
    with _APPLICATION_LOCK:
        original = module.file_utils
        replacement = make_replacement(original)
        module.file_utils = replacement
        try:
            yield replacement
        finally:
            module.file_utils = original


# ---------------------------------------------------------------------------------------------- fit under a strategy
def built_under_strategy(model) -> bool:
    """Whether the TensorFlow trainer recorded a non-default ``tf.distribute`` strategy for ``model``.

    Private: ``Trainer._distribute_strategy`` of the TensorFlow backend (3.14.0-3.15.1), set at model
    construction to the strategy in scope, ``None`` outside one. The public ``model.distribute_strategy``
    falls back to the default strategy, so it cannot tell the two apart. Always ``False`` under JAX.
    """
    return getattr(model, "_distribute_strategy", None) is not None


def build_from_symbolic_batch(model, strategy, symbolic_batch) -> None:
    """Make ``fit``/``evaluate`` build ``model`` (and its loss, metrics, optimizer) from ``symbolic_batch``
    (a structure of ``keras.KerasTensor``) instead of drawing a real batch from the data.

    Private: ``Trainer._maybe_symbolic_build`` (replaced on this instance only) and
    ``Trainer._symbolic_build`` (3.14.0-3.15.1). Under a strategy, Keras' own version pulls one batch
    from a throw-away iterator of the training data and, when it is a per-replica value, averages it
    with ``strategy.reduce``; that fails under ``MultiWorkerMirroredStrategy`` and changes the first
    trained batch elsewhere (see ``train.placement.prepare_model``). Warns when the hook is missing.
    """

    def build_from_shapes(iterator=None, data_batch=None):
        with strategy.scope():
            model._symbolic_build(data_batch=symbolic_batch)

    if not hasattr(type(model), "_maybe_symbolic_build"):
        warnings.warn(f"Keras {keras.__version__} has no Trainer._maybe_symbolic_build (written against Keras "
                      f"{checked_versions()}, see ranzcr_tf/compat.py): the first batch under a TensorFlow strategy "
                      "may differ from a single-device run, and MultiWorkerMirroredStrategy may fail; please report it",
                      RuntimeWarning, stacklevel=3)
    model._maybe_symbolic_build = build_from_shapes


def wrap_train_step(model, wrapper) -> None:
    """Make ``fit`` call ``wrapper(train_step)`` instead of ``model``'s class ``train_step``, on this instance only.

    ``train_step`` is public as a method to override in a subclass; assigning it on an instance relies
    on ``make_train_function`` reading ``self.train_step`` when it traces (3.14.0-3.15.1). Done here
    rather than with a subclass because the models are plain functional ``keras.Model``s, also saved
    and reloaded.
    """
    model.train_step = wrapper(type(model).train_step.__get__(model))


# ----------------------------------------------------------------------------------------------- optimizer
def swap_ema_weights(model) -> None:
    """Exchange ``model``'s trainable weights with its optimizer's moving averages (``use_ema=True``).

    Private: ``keras.callbacks.SwapEMAWeights._swap_variables`` (3.14.0-3.15.1), the swap the public
    callback performs around evaluation and, with ``swap_on_epoch``, at epoch begin and end. Training
    needs the averages in the model for a different span (validation, checkpoint, early stopping and
    logs at one epoch's end) than the callback's hooks give, and the swap itself (per replica, in
    place, no new variables, through a ``LossScaleOptimizer``) is worth not copying. Keras 3.14 pairs
    the averages with ``model.trainable_variables``, 3.15 with the optimizer's own variable list: the same
    here, because the trainer compiles a fresh optimizer whenever what is trainable changes.
    """
    swapper = keras.callbacks.SwapEMAWeights(swap_on_epoch=False)
    swapper.set_model(model)
    swapper._swap_variables()


def optimizer_step_counter(optimizer):
    """The variable counting ``optimizer``'s steps (every batch, also with gradient accumulation).

    Private: ``BaseOptimizer._iterations`` (3.14.0-3.15.1). The public ``optimizer.iterations`` is
    this variable only without gradient accumulation; with it, it is a computed tensor (steps //
    accumulation), which can be neither assigned nor used to continue the learning-rate schedule,
    which Keras drives from ``_iterations``.
    """
    return optimizer._iterations


def optimizer_steps(optimizer) -> int:
    """``optimizer_step_counter(optimizer)`` as a Python int."""
    return int(keras.ops.convert_to_numpy(optimizer_step_counter(optimizer)))


# ----------------------------------------------------------------------------------------------- saving
def weights_file_bytes(model) -> bytes:
    """What ``model.save_weights(path)`` writes to ``path`` (a ``.weights.h5``: weights and optimizer state), as
    bytes built in memory, for the caller to write and close itself; ``model.load_weights`` reads the file back.

    Private: ``keras.src.saving.saving_lib.H5IOStore`` and ``saving_lib._save_state`` (3.14.0-3.15.1), the two
    steps of ``saving_lib.save_weights_only``. That function opens the h5py file on disk and closes it only
    when every write succeeded: a full disk leaves the h5py file open, referenced from the exception, and
    h5py's close of it at interpreter shutdown printed tracebacks after the one-line error and crashed the
    process (SIGSEGV, CI: test_real_full_disk). An in-memory h5py file cannot fail that way, and the disk
    write is then one plain file the caller opens and closes. (``keras.saving.save_model`` accepts a file
    object publicly, but it also serialises the model's config, which training models need not support.)
    """
    import io

    from keras.src.saving import saving_lib

    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    try:
        saving_lib._save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
    finally:
        store.close()
    return buffer.getvalue()


def model_file_bytes(model) -> bytes:
    """What ``model.save(path.keras)`` writes, as bytes built in memory (see ``weights_file_bytes``: why).

    Private: ``keras.src.saving.saving_lib.save_model`` (3.14.0-3.15.1), which takes a file object; the public
    ``keras.saving.save_model`` refuses one ("Invalid filepath extension").
    """
    import io

    from keras.src.saving import saving_lib

    buffer = io.BytesIO()
    saving_lib.save_model(model, buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- graph
def _first_call(layer, side: str):
    nodes = layer._inbound_nodes
    if not nodes:
        raise ValueError(f"layer {layer.name!r} is not called inside a functional model")
    tensors = getattr(nodes[0], f"{side}_tensors")
    if len(tensors) != 1:
        raise ValueError(f"layer {layer.name!r} has {len(tensors)} {side}s; expected one")
    return tensors[0]


def called_input(layer):
    """The input tensor of ``layer``'s (first) call inside the functional model that contains it: the outer
    graph's tensor fed to a nested backbone (private ``Node.input_tensors``, as :func:`called_output`).
    Grad-CAM at an inner stage of the backbone runs the outer model up to here, then the backbone's own graph.
    """
    return _first_call(layer, "input")


def called_output(layer):
    """The output tensor of ``layer``'s (first) call inside the functional model that contains it.

    Private: ``Operation._inbound_nodes`` and ``Node.output_tensors`` (3.14.0-3.15.1). For a nested
    functional model (our backbone), the public ``layer.output`` is the output of the nested model's own
    graph, which cannot serve as an output of the outer model; the Grad-CAM of the run report
    (``report.gradcam``) needs the backbone's feature map as a tensor of the outer graph, to split the
    classifier into features and head without rebuilding either.
    """
    return _first_call(layer, "output")
