"""Where training runs: one TPU, several GPUs, several hosts, the JAX backend, or the default device.

    placement = choose_placement("auto")     # prints nothing; placement.describe() says what and why
    with placement.scope():
        model = build_model(...)
    global_batch = cfg.train.batch_size * placement.num_replicas

``auto`` picks, in this order:

1. the JAX backend (``KERAS_BACKEND=jax``) -> ``keras.distribution.DataParallel`` over every JAX device
   (TensorFlow, which only feeds tf.data there, is kept off the accelerators), across several processes
   (TPU pod hosts, GPU hosts) when the ``distribute`` settings or the environment name a cluster
   (``train.multihost``);
2. a TPU that ``TPUClusterResolver`` can reach -> ``TPUStrategy``;
3. ``TF_CONFIG`` set -> ``MultiWorkerMirroredStrategy`` (several hosts, or several processes on one);
4. more than one GPU -> ``MirroredStrategy``;
5. otherwise the default strategy (one CPU or one GPU).

A strategy must be created before TensorFlow touches its devices, so call ``choose_placement`` first,
before building datasets or models.

After building and compiling a model for a TensorFlow strategy, call ``prepare_model(model, placement,
input_shape)``: it synchronises BatchNorm statistics across replicas on GPU/CPU strategies (so N replicas
of batch B compute what one device computes on batch N x B) and works around two Keras 3.15 defects
under ``tf.distribute`` (see ``prepare_model``).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from ranzcr_tf import device
from ranzcr_tf.config import STRATEGIES

KINDS = STRATEGIES  # config.STRATEGIES, the one list


@dataclass
class Placement:
    """The chosen distribution and the facts the trainer needs about it."""

    kind: str  # tpu | mirrored | multiworker | jax | default
    reason: str
    num_replicas: int
    accelerator: str = "cpu"  # tpu | gpu | cpu (for the precision policy and the image dtype)
    strategy: Any = None  # tf.distribute.Strategy on the TensorFlow backend, None under JAX
    distribution: Any = None  # keras.distribution.Distribution under JAX
    num_workers: int = 1
    worker_index: int = 0
    is_chief: bool = True
    devices: list = field(default_factory=list)

    def scope(self):
        """Context in which variables (model, optimizer) must be created."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    def global_batch_size(self, per_replica_batch: int) -> int:
        return int(per_replica_batch) * self.num_replicas

    def describe(self) -> str:
        where = f"{self.num_replicas} replica(s) on {self.accelerator}"
        if self.num_workers > 1:
            role = "chief" if self.is_chief else "non-chief"
            where += f", worker {self.worker_index} of {self.num_workers} ({role})"
        return f"placement: {self.kind} -- {where}; because {self.reason}"


def choose_placement(requested: str = "auto", distribute=None) -> Placement:
    """Create the distribution for ``requested`` (one of ``KINDS``); ``auto`` decides as the module says.

    ``distribute``: the config's ``DistributeConfig`` (several JAX processes; ``None`` = the defaults).
    Raises ``ValueError`` when the requested placement cannot run here, saying what to use instead.
    """
    if requested not in KINDS:
        raise ValueError(f"strategy {requested!r} is unknown: use one of {', '.join(KINDS)}")
    backend = device.keras_backend()
    if backend == "jax":
        if requested not in ("auto", "jax", "default"):
            raise ValueError(f"strategy {requested!r} is a TensorFlow strategy but KERAS_BACKEND=jax: "
                             "use --strategy jax (or auto), or run with KERAS_BACKEND=tensorflow")
        return _jax_placement(requested, distribute)
    if backend != "tensorflow":
        raise ValueError(f"Keras backend {backend!r} is not supported: set KERAS_BACKEND to tensorflow or jax")
    if requested == "jax":
        raise ValueError("strategy jax needs the JAX backend: run with KERAS_BACKEND=jax")
    if getattr(distribute, "coordinator", "") or getattr(distribute, "multi_process", "auto") == "on":
        raise ValueError("the distribute.* settings are for the JAX backend: run with KERAS_BACKEND=jax, or give "
                         "TensorFlow its cluster in TF_CONFIG (MultiWorkerMirroredStrategy) and drop them")

    import tensorflow as tf

    if requested == "tpu" or (requested == "auto" and _tpu_hint()):
        placement = _tpu_placement(tf, required=requested == "tpu")
        if placement is not None:
            return placement
    if requested == "multiworker" or (requested == "auto" and os.environ.get("TF_CONFIG")):
        return _multiworker_placement(tf)
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "mirrored" or (requested == "auto" and len(gpus) > 1):
        strategy = tf.distribute.MirroredStrategy()
        devices = list(strategy.extended.worker_devices)
        why = ("--strategy mirrored was asked for" if requested == "mirrored"
               else f"{len(gpus)} GPUs are visible")
        return Placement("mirrored", why, strategy.num_replicas_in_sync, device.detect_accelerator(),
                         strategy=strategy, devices=devices)
    strategy = tf.distribute.get_strategy()
    why = ("--strategy default was asked for" if requested == "default"
           else f"no TPU, no TF_CONFIG and {len(gpus)} GPU(s) visible")
    return Placement("default", why, 1, device.detect_accelerator(), strategy=strategy,
                     devices=["/gpu:0" if gpus else "/cpu:0"])


# ----------------------------------------------------------------------------------------------- TPU
def _tpu_hint() -> bool:
    """Cheap signs that a TPU may exist; the resolver itself can wait on a metadata server elsewhere."""
    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_ACCELERATOR_TYPE"):
        return True
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def _tpu_placement(tf, required: bool) -> Placement | None:
    name = os.environ.get("TPU_NAME")
    if not name and not os.environ.get("COLAB_TPU_ADDR") and (os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")):
        name = "local"  # a TPU VM: the chips are attached to this host
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as exc:
        if required:
            raise ValueError(f"--strategy tpu was asked for but no TPU could be reached ({exc}); "
                             "check TPU_NAME, or use --strategy auto") from None
        return None
    strategy = tf.distribute.TPUStrategy(resolver)
    why = "--strategy tpu was asked for" if required else f"TPUClusterResolver found TPU {resolver.master() or name!r}"
    return Placement("tpu", why, strategy.num_replicas_in_sync, "tpu", strategy=strategy,
                     devices=list(strategy.extended.worker_devices))


# ----------------------------------------------------------------------------------------------- several hosts
def worker_info(tf_config: str | None = None) -> tuple[int, int, bool]:
    """``(num_workers, worker_index, is_chief)`` from ``TF_CONFIG`` (a single worker without it).

    The chief is the ``chief`` task, or worker 0 when the cluster names no chief (TensorFlow's rule).
    """
    raw = os.environ.get("TF_CONFIG") if tf_config is None else tf_config
    if not raw:
        return 1, 0, True
    try:
        conf = json.loads(raw)
        cluster, task = conf["cluster"], conf["task"]
        task_type, task_index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"TF_CONFIG is not valid ({exc}): it must be JSON like "
                         '{"cluster": {"worker": ["host1:port", "host2:port"]}, '
                         '"task": {"type": "worker", "index": 0}}') from None
    num_workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    is_chief = task_type == "chief" or (task_type == "worker" and task_index == 0 and "chief" not in cluster)
    index = task_index + (1 if "chief" in cluster and task_type == "worker" else 0)
    return max(num_workers, 1), index, is_chief


def _multiworker_placement(tf) -> Placement:
    if not os.environ.get("TF_CONFIG"):
        raise ValueError("--strategy multiworker needs TF_CONFIG (the cluster and this task) in the environment")
    num_workers, index, is_chief = worker_info()
    gpus = tf.config.list_physical_devices("GPU")
    # NCCL between GPUs; RING (gRPC) between CPU-only hosts, where NCCL does not exist.
    implementation = (tf.distribute.experimental.CommunicationImplementation.NCCL if gpus
                      else tf.distribute.experimental.CommunicationImplementation.RING)
    options = tf.distribute.experimental.CommunicationOptions(implementation=implementation)
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    return Placement("multiworker", f"TF_CONFIG names {num_workers} workers", strategy.num_replicas_in_sync,
                     device.detect_accelerator(), strategy=strategy, num_workers=num_workers,
                     worker_index=index, is_chief=is_chief, devices=list(strategy.extended.worker_devices))


# ----------------------------------------------------------------------------------------------- JAX
def _jax_placement(requested: str, distribute=None) -> Placement:
    import jax
    import keras

    from ranzcr_tf.train import multihost

    try:  # TensorFlow only feeds tf.data here: it must not reserve GPU/TPU memory that JAX needs.
        device.hide_accelerators_from_tf()
    except ImportError:  # TensorFlow absent: tf.data cannot run either, the data module says so later
        pass
    joined = multihost.multi_process_reason(distribute)
    if joined and requested == "default":
        raise ValueError(f"--strategy default trains on one device, but this process is one of several ({joined}): "
                         "use --strategy jax (or auto), or set distribute.multi_process=off")
    if joined:  # before the first jax.devices(): afterwards JAX cannot join other processes
        multihost.initialize_processes(distribute, joined)
    devices = jax.devices()
    platform = devices[0].platform
    accelerator = device.detect_accelerator()
    if requested == "default":
        return Placement("default", "--strategy default was asked for (JAX backend, first device only)", 1,
                         accelerator, devices=[str(devices[0])])
    keras_devices = keras.distribution.list_devices()
    processes = jax.process_count()
    why = f"KERAS_BACKEND=jax with {len(keras_devices)} {platform} device(s): batch split over all of them"
    if processes > 1:
        multihost.check_device_counts(len(keras_devices), jax.local_device_count(), processes)
        why += f", in {processes} processes joined because {joined or 'JAX was initialised for several'}"
    if len(keras_devices) == 1 and processes == 1:
        # No DataParallel over a one-device mesh: there the first training step's state came back with
        # another sharding than it went in, and JAX compiled the step a second time in every fit.
        return Placement("jax", why, 1, accelerator, devices=keras_devices)
    # Several processes: each reads its own share of the records (train.fit), so Keras must not shard again.
    distribution = keras.distribution.DataParallel(devices=keras_devices, auto_shard_dataset=processes == 1)
    keras.distribution.set_distribution(distribution)
    return Placement("jax", why, len(keras_devices), accelerator, distribution=distribution,
                     num_workers=processes, worker_index=jax.process_index(),
                     is_chief=jax.process_index() == 0, devices=keras_devices)


# ----------------------------------------------------------------------------------------------- models under a strategy
def wants_synchronized_batchnorm(placement: Placement) -> bool:
    """Whether BatchNorm should use statistics of the whole global batch (all replicas) in training.

    Yes on ``mirrored`` and ``multiworker`` with more than one replica: without it each replica normalises
    with its own per-replica batch (4 images, say, at RANZCR resolutions on a GPU), so N replicas train a
    different, noisier function than one device at the global batch. The price is three all-reduces of
    one vector per BatchNorm layer and step, small next to the gradient all-reduce. Not on TPUs (their
    per-core batches are large and cross-core sums per layer cost more there), nor under JAX (Keras
    supports ``synchronized`` only on the TensorFlow backend).
    """
    return placement.kind in ("mirrored", "multiworker") and placement.num_replicas > 1


def batchnorm_layers(model) -> list:
    """Every ``keras.layers.BatchNormalization`` in ``model``, nested sub-models included."""
    import keras

    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        stack.extend(getattr(layer, "layers", []))
    return found


def set_batchnorm_synchronized(model, synchronized: bool) -> int:
    """Switch cross-replica BatchNorm statistics on or off in place; returns the number of BN layers.

    Keras reads the flag each time it traces the training step, so set it before ``fit``. The flag is
    also saved in the layer config; ``callbacks`` saves models with it off, because inference uses the
    moving statistics anyway and the JAX backend refuses ``synchronized=True``.
    """
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.synchronized = bool(synchronized)
    return len(layers)


def prepare_model(model, placement: Placement, input_shape: tuple, input_dtype: str = "float32",
                  num_classes: int = 11, targets=None, inputs=None) -> None:
    """Make a compiled ``model`` train correctly under ``placement``'s TensorFlow strategy (no-op otherwise).

    ``input_shape`` is one image's shape ``(H, W, C)``. ``targets``: the symbolic target structure of a
    batch (``keras.KerasTensor``s) when it is not ``(1, num_classes)`` float32 (``train.recipes``); ``inputs``
    likewise when a batch's input is not one image (the teacher's ``{"image", "masks"}``). Call it
    after every ``compile``. It

    - synchronises BatchNorm across replicas where ``wants_synchronized_batchnorm`` says so;
    - builds the model, loss, metrics and optimizer from symbolic shapes. Under a strategy, Keras 3.15's
      ``fit`` otherwise draws a batch from a throw-away iterator of the training data just to learn the
      shapes: that fills the shuffle buffer twice, makes the first trained batch differ from a
      single-device run with the same seed (the reshuffled second iterator), and under
      ``MultiWorkerMirroredStrategy`` fails outright (it averages the batch with ``strategy.reduce``:
      "Attempt to convert a value (PerReplica...) to a Tensor");
    - under ``MultiWorkerMirroredStrategy``, returns the training step's logs as 1-element vectors:
      Keras 3.15 averages them across workers with ``strategy.reduce("MEAN", v, axis=0)``, which fails
      on scalars ("Invalid reduction dimension 0 for input with 0 dimensions", tensorflow#72388).
    """
    strategy = placement.strategy
    if strategy is None:
        return  # JAX
    from ranzcr_tf import compat

    if not compat.built_under_strategy(model):
        return  # default strategy: Keras builds lazily on the first trace
    import keras

    set_batchnorm_synchronized(model, wants_synchronized_batchnorm(placement))
    if targets is None:
        targets = keras.KerasTensor((1, num_classes), dtype="float32")
    if inputs is None:
        inputs = keras.KerasTensor((1, *tuple(input_shape)), dtype=input_dtype)
    symbolic = (inputs, targets)
    compat.build_from_symbolic_batch(model, strategy, symbolic)
    if placement.kind == "multiworker":
        compat.wrap_train_step(model, _with_vector_logs)


def _with_vector_logs(train_step):
    """``train_step`` whose scalar logs come back as 1-element vectors (see ``prepare_model``)."""
    from keras import ops

    def train_step_vector_logs(data):
        logs = train_step(data)
        return {name: ops.reshape(value, (1,)) if len(getattr(value, "shape", (0,))) == 0 else value
                for name, value in logs.items()}

    return train_step_vector_logs
