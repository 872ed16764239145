"""Training-step and inference throughput of the real model: Keras on TensorFlow and JAX vs timm (PyTorch).

    python benchmarks/bench_step.py                                   # B0, 256 px, batch 8, float32 (CPU: minutes)
    python benchmarks/bench_step.py --backbone efficientnet_b7 --size 768 --batch 16 --precision bfloat16
    python benchmarks/bench_step.py --rows keras-tf,keras-jax --steps-per-execution 4 --json out.json

Each row runs in its own subprocess of this script (``--worker``), because Keras fixes its backend at import:

* ``keras-tf``       Keras on TensorFlow, ``train.jit_compile`` off (the trainer's default on TensorFlow);
* ``keras-tf-xla``   the same with ``jit_compile`` on (XLA);
* ``keras-jax``      Keras on JAX (always XLA-compiled);
* ``timm-eager``     timm's ``tf_efficientnet_bN`` (the architecture lRomul/ranzcr-clip trained) in PyTorch;
* ``timm-compile``   the same under ``torch.compile``.

The Keras rows are the trainer's own step: ``recipes.build_training_model`` (``build_model`` + the configured
loss) compiled by ``step.compile_for_training`` under ``placement.choose_placement("auto")`` with the dtype
policy of ``--precision`` (``model.precision``), random initial weights. The timm rows train the same-named
network with Adam and BCE-with-logits; bfloat16 / float16 run them under ``torch.autocast`` (AMP, plus a
GradScaler for float16). Every row trains and predicts on one synthetic batch already on the device (uint8
pixels for Keras, as the trainer feeds them), so the input pipeline is out of the picture: first ``--warmup``
steps (tracing, compilation), then ``--steps`` timed ones, for ``model.fit`` and for ``model.predict``.

Beside the step rates the table shows the input pipeline's own rate (``pipeline.data.build_train_dataset``
with the default augmentation, on records made by ``bench_pipeline.write_dataset``, timed by
``bench_pipeline.measure``), so a reader sees whether input would bound training at that setting. On a CPU
the pipeline and the step share the cores; the two rates are each measured alone.

timm rows need ``torch`` and ``timm`` importable by ``--torch-python`` (default: this interpreter); without
them they are skipped with a note and the ratios refer to the ``keras-tf`` row instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))  # this checkout's ranzcr_tf, also in the workers

from ranzcr_tf import cli  # noqa: E402  (light: imports no TensorFlow, no Keras)

PROG = "bench_step.py"
RESULT_MARK = "BENCH_STEP_RESULT "
# row name -> (worker, backend, compiled)
ROWS = {
    "keras-tf": ("keras", "tensorflow", False),
    "keras-tf-xla": ("keras", "tensorflow", True),
    "keras-jax": ("keras", "jax", True),
    "timm-eager": ("torch", "torch", False),
    "timm-compile": ("torch", "torch", True),
}
POLICY = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
TIMM_NAMES = {**{f"efficientnet_b{i}": f"tf_efficientnet_b{i}" for i in range(8)},
              **{f"efficientnetv2_{v}": f"tf_efficientnetv2_{v}" for v in ("b0", "b1", "b2", "b3", "s")},
              "mobilenetv3_small": "tf_mobilenetv3_small_100"}


class WorkerSkipped(Exception):
    """A row that cannot run here (a framework not installed): a note in the table, not a failure."""


def _timed(run, steps: int) -> float:
    start = time.perf_counter()
    run(steps)
    return time.perf_counter() - start


def _rates(train, infer, warmup: int, steps: int, batch: int) -> dict:
    """Warm-up calls (timed separately: they include tracing and compilation), then the timed calls."""
    first_s = _timed(train, warmup) + _timed(infer, warmup)
    train_s, infer_s = _timed(train, steps), _timed(infer, steps)
    return {"train_images_per_s": steps * batch / train_s, "infer_images_per_s": steps * batch / infer_s,
            "warmup_s": first_s, "batch": batch, "timed_steps": steps}


def step_clock(keras, warmup: int, total: int):
    """A Keras callback that times steps ``warmup + 1 .. total`` of one ``fit`` and one ``predict`` (``keras``:
    the module, imported by the worker after choosing the backend). It waits for a step's result only at
    those two ends (JAX dispatches asynchronously), so the steps in between run as they do in training."""

    class Clock(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.marks = {}

        def _mark(self, kind: str, done: int, value) -> None:
            if done in (warmup, total):
                keras.ops.convert_to_numpy(value)  # blocks until the step has finished
                self.marks[(kind, done)] = time.perf_counter()

        def on_train_begin(self, logs=None):
            self.marks[("train", 0)] = time.perf_counter()

        def on_predict_begin(self, logs=None):
            self.marks[("infer", 0)] = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self._mark("train", batch + 1, logs["loss"])

        def on_predict_batch_end(self, batch, logs=None):
            self._mark("infer", batch + 1, keras.tree.flatten(logs["outputs"])[0])

        def rates(self, batch_size: int) -> dict:
            m = self.marks
            timed = (total - warmup) * batch_size
            return {"train_images_per_s": timed / (m[("train", total)] - m[("train", warmup)]),
                    "infer_images_per_s": timed / (m[("infer", total)] - m[("infer", warmup)]),
                    "warmup_s": m[("train", warmup)] - m[("train", 0)] + m[("infer", warmup)] - m[("infer", 0)],
                    "batch": batch_size, "timed_steps": total - warmup}

    return Clock()


# ----------------------------------------------------------------------------------------------- workers
def build_keras_step(args):
    """The trainer's compiled model for a Keras row: ``(keras, model, cfg, placement, policy, build_s)``.

    ``recipes.build_training_model`` (``train.recipe`` = ``args.recipe``: plain, or aux_seg with its mask
    decoder) compiled by ``step.compile_for_training``, random initial weights. Imports no TensorFlow on JAX.
    """
    os.environ["KERAS_BACKEND"] = args.backend  # Keras reads it once, at import
    import keras
    import numpy as np

    from ranzcr_tf.config import Config, load_config
    from ranzcr_tf.labels import NUM_CLASSES
    from ranzcr_tf.model import precision
    from ranzcr_tf.presets import DEFAULT_PRESET, find_preset
    from ranzcr_tf.train import recipes, step
    from ranzcr_tf.train.placement import choose_placement

    cfg = Config()
    cfg.model.backbone, cfg.model.weights, cfg.model.mixed_precision = args.backbone, None, POLICY[args.precision]
    cfg.train.batch_size, cfg.train.steps_per_execution = args.batch, args.steps_per_execution
    cfg.train.jit_compile, cfg.train.recipe = args.compiled, args.recipe
    if args.recipe == "aux_seg":  # as the mission preset trains it: line masks, its tip term and head if it sets them
        mission = load_config(find_preset(DEFAULT_PRESET))
        cfg.train.tip_loss_weight, cfg.model.head = mission.train.tip_loss_weight, mission.model.head
    cfg.validate()
    placement = choose_placement("auto")
    policy = precision.apply_policy(precision.choose_policy(cfg.model, placement.accelerator))
    start = time.perf_counter()
    with placement.scope():
        model, loss = recipes.build_training_model(cfg, args.size, np.full(NUM_CLASSES, 10), 100,
                                                   from_logits=cfg.model.output == "logits")
    step.compile_for_training(model, cfg, loss, cfg.train.learning_rate, placement, args.size)
    return keras, model, cfg, placement, policy, time.perf_counter() - start


def synthetic_batch(cfg, args, batch: int, accelerator: str, seed: int = 0):
    """``(images, targets)`` as numpy, shaped and typed as the trainer's batches of ``train.recipe``
    (``train.plan.synthetic_batch``: the structure ``recipes.symbolic_targets`` gives the model)."""
    from ranzcr_tf.train import plan

    if args.backend == "jax":  # pipeline.data.image_dtype_for on JAX: uint8 unless data.image_dtype says otherwise
        dtype = "uint8" if cfg.data.image_dtype == "auto" else cfg.data.image_dtype
    else:
        from ranzcr_tf.pipeline import data

        dtype = data.image_dtype_for(cfg, args.backend, accelerator).as_numpy_dtype
    return plan.synthetic_batch(cfg, args.size, batch, dtype, seed=seed)


class CompileLog:
    """Seconds of every XLA compilation of a JAX function, by name (``jax_log_compiles``' lines)."""

    PATTERN = re.compile(r"Finished XLA compilation of jit\((\w+)\) in ([\d.]+) sec")

    def __init__(self):
        import logging

        import jax

        self.seconds: dict[str, list[float]] = {}
        jax.config.update("jax_log_compiles", True)
        handler = logging.Handler()
        handler.emit = self._emit
        logging.getLogger("jax").addHandler(handler)

    def _emit(self, record) -> None:
        match = self.PATTERN.search(record.getMessage())
        if match:
            self.seconds.setdefault(match.group(1), []).append(round(float(match.group(2)), 2))


def keras_worker(args) -> dict:
    compiles = CompileLog() if args.backend == "jax" else None
    keras, model, cfg, placement, policy, build_s = build_keras_step(args)
    batch = placement.global_batch_size(args.batch)
    images, targets = synthetic_batch(cfg, args, batch, placement.accelerator)
    if args.backend == "jax":
        import jax

        images, targets = jax.device_put(images), jax.device_put(targets)

        def train_data():
            while True:
                yield images, targets

        def infer_data():
            while True:
                yield (images,)
        device = jax.devices()[0].device_kind
    else:
        import tensorflow as tf

        images, targets = tf.constant(images), tf.nest.map_structure(tf.constant, targets)

        def train_data():
            return tf.data.Dataset.from_tensors((images, targets)).repeat()

        def infer_data():
            return tf.data.Dataset.from_tensors(images).repeat()
        device = placement.accelerator

    # Whole executions only: fit runs steps_per_execution steps per call of its compiled function.
    def whole(steps: int) -> int:
        return -(-steps // args.steps_per_execution) * args.steps_per_execution

    warmup, steps = whole(args.warmup), whole(args.steps)
    clock = step_clock(keras, warmup, warmup + steps)
    # One fit and one predict call, timed from inside: a second fit call would compile again on JAX (the
    # trained state's sharding differs from the freshly placed one), which a real run pays once per fit.
    model.fit(train_data(), epochs=1, steps_per_epoch=warmup + steps, verbose=0, callbacks=[clock])
    model.predict(infer_data(), steps=warmup + steps, verbose=0, callbacks=[clock])
    result = clock.rates(batch)
    result.update(device=device, build_s=build_s, policy=policy, peak_mb=keras_peak_mb(args.backend),
                  versions=f"keras {keras.__version__}, {args.backend} {_version(args.backend)}",
                  steps_per_execution=args.steps_per_execution, recipe=args.recipe,
                  tensorflow_imported="tensorflow" in sys.modules,
                  compile_s={name: compiles.seconds.get(name, []) for name in ("train_step", "predict_step")}
                  if compiles else None)
    return result


def _version(module: str) -> str:
    return getattr(sys.modules.get(module), "__version__", "?")


def keras_peak_mb(backend: str):
    """Peak accelerator memory in MB, or None where the backend reports none (CPUs)."""
    if backend == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}  # None on CPUs
        peak = stats.get("peak_bytes_in_use")
        return peak / 2**20 if peak else None
    import tensorflow as tf

    if not tf.config.list_logical_devices("GPU"):
        return None
    return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20


def torch_worker(args) -> dict:
    try:
        import timm
        import torch
    except ImportError as exc:
        raise WorkerSkipped(f"{exc.name} is not importable by {sys.executable} (pip install torch timm, or pass "
                            "--torch-python)") from None
    name = args.timm_model or TIMM_NAMES.get(args.backbone)
    if name is None:
        raise WorkerSkipped(f"no timm counterpart of {args.backbone} (pass --timm-model NAME)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.precision)
    start = time.perf_counter()
    # One input channel, as our model takes it (timm sums the stem's RGB filters), dropout as ours.
    model = timm.create_model(name, pretrained=False, num_classes=11, in_chans=args.channels, drop_rate=0.2)
    model = model.to(device).to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if args.compiled else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    build_s = time.perf_counter() - start
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, args.channels, args.size, args.size), dtype=torch.uint8,
                           generator=generator).to(device).contiguous(memory_format=torch.channels_last)
    targets = (torch.rand((args.batch, 11), generator=generator) < 0.2).float().to(device)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

    def train(steps: int) -> None:
        model.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(step_model(images.float()).float(), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        _synchronize(torch, device)

    def infer(steps: int) -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            for _ in range(steps):
                step_model(images.float()).float().sigmoid()
        _synchronize(torch, device)

    result = _rates(train, infer, args.warmup, args.steps, args.batch)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    result.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", build_s=build_s,
                  policy=f"AMP {args.precision}" if amp_dtype else "float32", peak_mb=peak, timm_model=name,
                  versions=f"torch {torch.__version__}, timm {timm.__version__}")
    return result


def _synchronize(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def pipeline_worker(args) -> dict:
    """The training input pipeline alone, at the benchmark's size and batch (bench_pipeline's records and timer)."""
    sys.path.insert(0, BENCH_DIR)
    import bench_pipeline

    from ranzcr_tf.config import Config
    from ranzcr_tf.pipeline import data
    from ranzcr_tf.prep import records

    cfg = Config()
    with tempfile.TemporaryDirectory(prefix="bench_step_") as tmp:
        root = args.records or tmp
        if not os.path.exists(os.path.join(root, records.MANIFEST)):
            bench_pipeline.write_dataset(root, args.pipeline_records, args.size)
        dataset = data.build_train_dataset(cfg, root, fold=0, global_batch_size=args.batch, image_size=args.size,
                                           image_dtype=data.image_dtype_for(cfg, "tensorflow", "cpu"), seed=0)
        rate, cpu_ms = bench_pipeline.measure(dataset, args.pipeline_batches, 3, "input pipeline")
    return {"images_per_s": rate, "cpu_ms_per_image": cpu_ms, "records": args.pipeline_records}


def run_worker(args) -> int:
    """Worker mode: one row, one JSON line on stdout (after the result mark); exit 2 on bad input."""
    body = {"keras": keras_worker, "torch": torch_worker, "pipeline": pipeline_worker}[args.worker]
    try:
        result = body(args)
    except WorkerSkipped as exc:
        result = {"skipped": str(exc)}
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- parent
def _worker_command(args, worker: str, backend: str, compiled: bool) -> list[str]:
    python = args.torch_python if worker == "torch" else sys.executable
    command = [python, os.path.abspath(__file__), "--worker", worker, "--backend", backend,
               "--backbone", args.backbone, "--size", str(args.size), "--batch", str(args.batch),
               "--precision", args.precision, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--steps-per-execution", str(args.steps_per_execution), "--channels", str(args.channels),
               "--recipe", args.recipe,
               "--pipeline-records", str(args.pipeline_records), "--pipeline-batches", str(args.pipeline_batches)]
    command += ["--compiled"] if compiled else []
    command += ["--timm-model", args.timm_model] if args.timm_model else []
    command += ["--records", args.records] if args.records else []
    return command


def call_worker(args, name: str, worker: str, backend: str, compiled: bool) -> dict:
    """Run one worker subprocess; its result, ``{"skipped": why}`` or ``{"failed": why}``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    print(f"running {name} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(_worker_command(args, worker, backend, compiled), env=env, capture_output=True,
                              text=True, timeout=args.worker_timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"no result within its time cap of {args.worker_timeout} s (--worker-timeout)"}
    except OSError as exc:  # a --torch-python that does not exist
        return {"skipped": f"cannot start {exc.filename}: {exc.strerror}"}
    if done.returncode == 2:  # bad input (e.g. an unknown backbone): every row would fail the same way
        lines = [line for line in done.stderr.splitlines() if "error:" in line] or done.stderr.splitlines()[-1:]
        message = lines[-1].split("error:", 1)[-1].strip()[:300] if lines else "bad input"
        raise ValueError(f"row {name}: {message}")
    print(f"  {name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()][-15:]
    print("\n".join(f"  {name}| {line}" for line in tail), file=sys.stderr)
    if done.returncode < 0:  # stopped from outside (the last line it printed would mislead)
        return {"failed": f"killed by signal {-done.returncode} before it reported"}
    return {"failed": f"exit {done.returncode}: {tail[-1][:160] if tail else 'no output'}"}


def reference_row(results: dict) -> str | None:
    """The fastest timm row that ran, else keras-tf (the trainer's TensorFlow default), else the first row."""
    ran = {name: r for name, r in results.items() if "train_images_per_s" in r}
    timm_rows = [name for name in ran if ROWS[name][0] == "torch"]
    if timm_rows:
        return max(timm_rows, key=lambda name: ran[name]["train_images_per_s"])
    return "keras-tf" if "keras-tf" in ran else next(iter(ran), None)


def _fmt(value, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def print_table(args, results: dict, pipeline: dict | None) -> str | None:
    reference = reference_row(results)
    ref = results.get(reference, {})
    print(f"\n{args.backbone} at {args.size} px, batch {args.batch}, {args.precision}, {args.channels} input "
          f"channel(s); {args.warmup} warm-up + {args.steps} timed steps; Keras steps_per_execution "
          f"{args.steps_per_execution}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"ratios (x) are to the {reference or '-'} row" + ("" if reference is None or ROWS[reference][0] == "torch"
                                                             else " (timm absent or not run)"))
    pipe_rate = pipeline.get("images_per_s") if pipeline else None
    print(f"{'row':<13} {'device':<12} {'train img/s':>11} {'x':>6} {'infer img/s':>11} {'x':>6} "
          f"{'input/train':>11} {'warm-up s':>9} {'peak MB':>8}  note")
    for name, r in results.items():
        if "train_images_per_s" not in r:
            print(f"{name:<13} {'-':<12} {'-':>11} {'':>6} {'-':>11} {'':>6} {'':>11} {'':>9} {'':>8}  "
                  f"{'skipped' if 'skipped' in r else 'FAILED'}: {r.get('skipped') or r.get('failed')}")
            continue
        train, infer = r["train_images_per_s"], r["infer_images_per_s"]
        train_x = train / ref["train_images_per_s"] if ref else None
        infer_x = infer / ref["infer_images_per_s"] if ref else None
        headroom = pipe_rate / train if pipe_rate else None
        note = r["policy"] + (f", {r['timm_model']}" if "timm_model" in r else "") + f"; {r['versions']}"
        print(f"{name:<13} {r['device'][:12]:<12} {train:>11.2f} {_fmt(train_x, '.2f'):>6} {infer:>11.2f} "
              f"{_fmt(infer_x, '.2f'):>6} {_fmt(headroom, '.2f', '-'):>11} {r['warmup_s']:>9.1f} "
              f"{_fmt(r['peak_mb'], '.0f'):>8}  {note}")
    if pipeline is None:
        print("input pipeline: not measured (--no-pipeline)")
    elif "images_per_s" in pipeline:
        print(f"input pipeline (pipeline.data train dataset, default augmentation, {pipeline['records']} synthetic "
              f"records at {args.size} px, uint8, measured alone on this CPU): {pipe_rate:.1f} images/s, "
              f"{pipeline['cpu_ms_per_image']:.1f} CPU ms/image. input/train < 1: input would bound that row's training.")
    else:
        print(f"input pipeline: {'skipped' if 'skipped' in pipeline else 'FAILED'}: "
              f"{pipeline.get('skipped') or pipeline.get('failed')}")
    return reference


def run_parent(args) -> int:
    names = [name.strip() for name in args.rows.split(",") if name.strip()]
    unknown = [name for name in names if name not in ROWS]
    if unknown or not names:
        raise ValueError(f"--rows {args.rows!r}: expected a comma-separated subset of {', '.join(ROWS)}")
    if args.json:
        cli.check_output_file(args.json, "--json")
    results = {name: call_worker(args, name, *ROWS[name]) for name in names}
    pipeline = None if args.no_pipeline else call_worker(args, "pipeline", "pipeline", "tensorflow", False)
    reference = print_table(args, results, pipeline)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"settings": {k: v for k, v in vars(args).items() if k != "worker"}, "rows": results,
                       "pipeline": pipeline, "reference": reference}, fh, indent=2)
    failed = [name for name, r in {**results, "pipeline": pipeline or {}}.items() if "failed" in r]
    return 1 if failed else 0


def build_parser():
    parser = cli.build_parser(PROG, __doc__.split("\n\n")[0])
    parser.description = __doc__
    parser.add_argument("--backbone", default="efficientnet_b0", help="model.backbone (ranzcr_tf.model.backbones)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (768 for the B7 setting)")
    parser.add_argument("--batch", type=int, default=8, help="images per step (per replica for Keras)")
    parser.add_argument("--precision", choices=tuple(POLICY), default="float32",
                        help="float32, or mixed bfloat16 / float16 (Keras dtype policy; torch.autocast for timm)")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="model.input_channels")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (tracing, compilation)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of training and of inference")
    parser.add_argument("--steps-per-execution", type=int, default=1, help="train.steps_per_execution (Keras rows)")
    parser.add_argument("--recipe", choices=("plain", "aux_seg"), default="plain",
                        help="train.recipe of the Keras rows: plain, or aux_seg as configs/b7_768_tpu.yaml trains it "
                             "(+ the line-mask decoder, its tip head and losses, the preset's model.head)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {','.join(ROWS)})")
    parser.add_argument("--timm-model", help="timm architecture of the timm rows (default: tf_ twin of --backbone)")
    parser.add_argument("--torch-python", default=sys.executable, help="Python that has torch + timm (timm rows)")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the input-pipeline measurement")
    parser.add_argument("--pipeline-records", type=int, default=48, help="synthetic records for the pipeline rate")
    parser.add_argument("--pipeline-batches", type=int, default=20, help="timed input batches")
    parser.add_argument("--records", help="records folder for the pipeline rate (made there when missing)")
    parser.add_argument("--worker-timeout", type=int, default=1800, help="seconds one row may take")
    parser.add_argument("--json", help="also write every figure to this JSON file")
    parser.add_argument("--worker", choices=("keras", "torch", "pipeline"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="tensorflow", help=argparse.SUPPRESS)
    parser.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    return parser


def body(args) -> int:
    for flag in ("size", "batch", "warmup", "steps", "steps_per_execution", "pipeline_records", "pipeline_batches"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: expected an integer >= 1")
    if args.worker:
        return run_worker(args)
    return run_parent(args)


def main(argv=None) -> int:
    return cli.main(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
