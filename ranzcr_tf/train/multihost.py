"""Several processes (hosts) training one model on the JAX backend: a TPU pod slice or several GPU hosts.

    reason = multi_process_reason(cfg.distribute)     # None: this process trains alone
    if reason:
        initialize_processes(cfg.distribute, reason)  # before JAX touches a device
    ...
    num_shares, share = process_share(placement)      # which part of the records this process reads

How the pieces fit (``train.placement`` creates the distribution, ``train.fit`` uses the rest):

- ``keras.distribution.initialize`` (``jax.distributed.initialize``) joins the processes: from the
  ``distribute`` settings, from Keras' ``KERAS_DISTRIBUTION_*`` variables, or from what JAX detects (the
  TPU pod's metadata, SLURM, Open MPI, Kubernetes). Afterwards ``jax.devices()`` lists every process's
  devices and ``keras.distribution.DataParallel`` splits each global batch over all of them.
- Each process reads only its share of the training records (``input_context``: by shard, or by record
  when there are fewer shards than processes) in batches of global / processes; Keras puts the
  processes' parts together into the global batch. Keras' own auto-sharding is switched off: it would
  have every host read and decode every record and keep every n-th batch.
- Validation: each process decodes its share of the fold; the predictor gathers the rows of every
  process in the graph (``model.predict``), so every process holds every study's prediction once, by
  row index, and computes the same metric. That keeps the callbacks' decisions (best checkpoint, early
  stopping, plateau) identical on every process, which they must be: a process that stopped early
  would leave the others waiting in a collective.
- Only process 0 (the chief) writes the run folder, as under ``MultiWorkerMirroredStrategy``. A resume
  reads the chief's folder on every process, so ``--out-dir`` must be storage every host reads (GCS,
  NFS); ``check_same_everywhere`` stops a run whose processes disagree about where to start instead of
  letting them hang.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

# Environment variables that name a cluster to join: Keras' own, and JAX's coordinator address.
CLUSTER_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "JAX_COORDINATOR_ADDRESS")
# Set on every worker of a multi-host TPU slice (GKE; Cloud TPU VMs where the runtime exports them): the hosts.
TPU_HOST_VARIABLES = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def multi_process_reason(distribute) -> str | None:
    """Why this process should join a multi-process run, or ``None`` to train alone.

    ``distribute`` is the config's ``DistributeConfig`` (``None``: the defaults). ``multi_process: off``
    never joins; ``auto`` joins when ``coordinator`` is set or the environment names a cluster
    (``CLUSTER_VARIABLES``, or ``TPU_HOST_VARIABLES`` listing more than one host); ``on`` always joins and
    lets JAX find the cluster (a TPU pod slice whose workers only its metadata server describes).
    """
    mode = getattr(distribute, "multi_process", "auto")
    if mode == "off":
        return None
    coordinator = getattr(distribute, "coordinator", "")
    if coordinator:
        return (f"distribute.coordinator = {coordinator} (process {distribute.process_id} of "
                f"{distribute.num_processes})")
    for name in CLUSTER_VARIABLES:
        if os.environ.get(name):
            return f"{name} is set"
    for name in TPU_HOST_VARIABLES:
        hosts = [host for host in os.environ.get(name, "").split(",") if host.strip()]
        if len(hosts) > 1:
            return f"{name} names {len(hosts)} TPU hosts"
    if mode == "on":
        return "distribute.multi_process = on (JAX finds the cluster: TPU pod metadata, SLURM, Open MPI, Kubernetes)"
    return None


def initialize_processes(distribute, reason: str) -> None:
    """Join the multi-process run (``keras.distribution.initialize``); waits for every process to arrive.

    Must run before JAX uses any device. Raises ``ValueError`` naming what to check when it cannot join.
    """
    import jax
    import keras

    if jax.distributed.is_initialized():  # joined already (a second placement in one process)
        return
    coordinator = getattr(distribute, "coordinator", "")
    try:
        if coordinator:
            keras.distribution.initialize(coordinator, int(distribute.num_processes), int(distribute.process_id))
        else:  # Keras reads KERAS_DISTRIBUTION_*; JAX detects the rest
            keras.distribution.initialize()
    except (RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        hint = ("check that process 0 runs and that every host reaches its HOST:PORT"
                if coordinator else "set distribute.coordinator, distribute.num_processes and distribute.process_id "
                "on every process, or distribute.multi_process=off to train alone")
        raise ValueError(f"could not join the multi-process run ({reason}): {first}; {hint}") from None


@contextlib.contextmanager
def process_local_objects():
    """Within: Keras objects created are this process's own, outside the global device mesh.

    For work one process does alone, such as the chief writing a backup: Keras' ``save_weights`` builds
    a throw-away optimizer, and creating its variables under a multi-process distribution is a
    collective (JAX checks that every process puts the same value) that the other processes never join,
    so the processes fall out of step ("passed to device_put is not the same on each process").
    Reading the model's replicated variables needs no collective. A no-op without a distribution.
    """
    import keras

    current = keras.distribution.distribution()
    if current is None:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(current)


def check_device_counts(num_devices: int, num_local_devices: int, num_processes: int) -> None:
    """``ValueError`` unless every process holds the same number of devices (the per-process batch is the
    global batch / processes, which only lines up with the devices when each process has its share)."""
    if num_local_devices * num_processes != num_devices:
        raise ValueError(f"this process has {num_local_devices} of the {num_devices} devices of {num_processes} "
                         "processes: give every process the same number of devices (e.g. one process per host "
                         "with all its GPUs, or CUDA_VISIBLE_DEVICES alike on every host)")


def is_multi_process(placement) -> bool:
    return placement is not None and placement.kind == "jax" and placement.num_workers > 1


def process_share(placement) -> tuple[int, int]:
    """``(number of shares, this process's share)`` of the input: ``(1, 0)`` unless several JAX processes."""
    if is_multi_process(placement):
        return placement.num_workers, placement.worker_index
    return 1, 0


def input_context(placement):
    """The ``tf.distribute.InputContext`` that gives this JAX process its share of the training records in
    batches of global / processes (``pipeline.data.build_train_dataset``)."""
    import tensorflow as tf

    shares, share = process_share(placement)
    return tf.distribute.InputContext(num_input_pipelines=shares, input_pipeline_id=share, num_replicas_in_sync=shares)


def check_same_everywhere(placement, what: str, *values: int) -> None:
    """``ValueError`` unless every process of a multi-process run has the same ``values`` (a collective:
    also a barrier). Used where each process decides from the run folder, e.g. which epoch to resume."""
    if not is_multi_process(placement):
        return
    from jax.experimental import multihost_utils

    mine = np.asarray(values, dtype=np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(placement.num_workers, len(values))
    if (everyone != mine).any():
        seen = "; ".join(f"process {i}: {tuple(int(v) for v in row)}" for i, row in enumerate(everyone))
        raise ValueError(f"the processes disagree on {what} ({seen}): the run folder must be on storage every "
                         "host reads (gs://, NFS) and the same for all; rerun with --out-dir there")


def any_everywhere(placement, flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (a collective): one decision from per-host clocks."""
    if not is_multi_process(placement):
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(flag)], dtype=np.int32))).max())
