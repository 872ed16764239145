"""The one prediction function: validation (every epoch), OOF writing and the kernel all call it.

    data = pipeline.data.build_eval_dataset(cfg, "tfrecords", "valid", 64, fold=0)   # or split "test", tta "hflip"
    predictor = build_predictor(model, from_logits=True)       # once per model; reused for every epoch / view
    probs = predict_eval(model, data, from_logits=True, predictor=predictor)   # (data.num_examples, 11), data.ids order

Written with ``keras`` only, so training (``train``) and inference (``serve``) both import it from here.
The row index travels through the model beside the image (:func:`build_predictor`), so whatever order
a strategy hands batches to replicas or workers in, each prediction lands on its own row and the
padding rows of the last batch drop out by index, never by position. Probabilities are computed in
the graph (a float32 sigmoid over logits), so validation AUC, ``oof.csv`` and the submission come
from the same numbers. Keras ``predict`` compiles the predictor once; a Keras callback passed in
``callbacks`` may stop a pass early (``model.stop_predicting = True``, the kernel's time budget), and
``allow_partial=True`` then returns NaN rows for the rows not reached.

Several JAX processes (``train.multihost``): each feeds its share of the rows (``EvalData.num_shards``)
and the predictor ends in ``GatherFromAllProcesses``, an all-gather in the graph, so every process gets
every row back and places it by its index: the exact metric over every study once, on every process.
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np


class GatherFromAllProcesses(keras.layers.Layer):
    """Identity whose output every process holds in full: the batch rows of all processes, gathered in
    the graph (``keras.distribution.distribute_tensor`` to a replicated layout over the global mesh).

    Keras' JAX ``predict`` returns the batch-sharded outputs of a multi-process ``DataParallel`` as arrays
    that span other hosts' devices, which no process can read ("Fetching value for `jax.Array` that
    spans non-addressable ... devices is not possible"); replicated, each process reads all of them.
    """

    def call(self, inputs):
        mesh = keras.distribution.distribution().device_mesh
        return keras.distribution.distribute_tensor(
            inputs, keras.distribution.TensorLayout([None] * len(inputs.shape), mesh))


def _indexed_model(model: keras.Model, from_logits: bool, gather: bool = False) -> keras.Model:
    """``{"image", "index"} -> {"probabilities", "index"}`` sharing ``model``'s weights; ``gather``: every
    process receives every process's rows (``GatherFromAllProcesses``).

    A model of several named inputs (the teacher's ``{"image", "masks"}``) gets each of them beside ``index``.
    """
    inputs = {source.name: keras.Input(shape=tuple(source.shape[1:]), dtype=source.dtype, name=source.name)
              for source in model.inputs}
    if len(inputs) == 1:
        inputs = {"image": next(iter(inputs.values()))}
        outputs = model(inputs["image"])
    else:
        outputs = model(inputs)
    index = keras.Input(shape=(), dtype="int32", name="index")
    if from_logits:
        outputs = keras.layers.Activation("sigmoid", dtype="float32", name="to_probabilities")(outputs)
    row_index = keras.layers.Identity(name="row_index")(index)
    if gather:
        outputs = GatherFromAllProcesses(name="gather_probabilities")(outputs)
        row_index = GatherFromAllProcesses(name="gather_row_index")(row_index)
    return keras.Model({**inputs, "index": index}, {"probabilities": outputs, "index": row_index},
                       name="indexed_predictor")


def build_predictor(model: keras.Model, *, from_logits: bool, placement=None) -> keras.Model:
    """The indexed predictor of ``model`` (shares its weights); build once and reuse, so ``predict`` is traced
    (and on a TPU, compiled) once rather than every epoch or every TTA view."""
    # Several workers: each predicts the whole set by itself (a predictor built outside the strategy runs
    # on this worker's copy of the weights, which equals every other's), with no collective ops. Keras'
    # multi-worker predict hands each worker the same first part of an unsharded set, and a sharded set
    # would leave workers with unequal numbers of batches.
    local = placement is not None and placement.kind == "multiworker"
    # Several JAX processes predict one set together (each its share), then gather (the module docstring).
    gather = placement is not None and placement.kind == "jax" and placement.num_workers > 1
    with placement.scope() if placement is not None and not local else contextlib.nullcontext():
        return _indexed_model(model, from_logits, gather=gather)


def predict_eval(model: keras.Model, eval_data, *, from_logits: bool, placement=None,
                 predictor: keras.Model | None = None, callbacks=None, allow_partial: bool = False) -> np.ndarray:
    """Probabilities ``(eval_data.num_examples, 11)`` float32 in ``eval_data.ids`` order (padding removed).

    ``eval_data`` is a ``pipeline.data.EvalData`` (validation fold or test split, any TTA view); its
    ``indexed_dataset()`` carries each row's record index through the model.
    ``callbacks`` are Keras callbacks for ``predict`` (progress, time budget). A pass stopped early
    raises ``RuntimeError`` unless ``allow_partial``, in which case the rows not predicted are NaN.
    """
    if predictor is None:
        predictor = build_predictor(model, from_logits=from_logits, placement=placement)
    out = predictor.predict(eval_data.indexed_dataset(), verbose=0, callbacks=callbacks)
    index = np.asarray(out["index"]).reshape(-1)
    probs = np.asarray(out["probabilities"], dtype=np.float32).reshape(len(index), -1)
    keep = index < eval_data.num_examples  # padding rows sit past the real ones
    index, probs = index[keep], probs[keep]
    unique, first = np.unique(index, return_index=True)
    if len(unique) == eval_data.num_examples:
        return probs[first]
    if not allow_partial:
        raise RuntimeError(f"prediction returned {len(unique)} of {eval_data.num_examples} {eval_data.split} rows")
    full = np.full((eval_data.num_examples, probs.shape[1]), np.nan, dtype=np.float32)
    full[unique] = probs[first]
    return full
