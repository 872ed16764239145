"""The device check: what one borrowed accelerator says about the mission model, in one run of <= 8 minutes.

    python benchmarks/device_check.py --out device.json            # EfficientNet-B7 at 768 px (an H100: ~7 min)
    python benchmarks/device_check.py --smoke --out smoke.json      # compact model, 64 px, 2 warm-up + 1 timed step, CPU (CI)

Written for a box with JAX and PyTorch but no TensorFlow and no network (Keras on JAX never imports
TensorFlow here; every row records whether it did). One JSON (``--out``) and a printed table:

* step rows ``keras-jax`` (bfloat16), ``timm-compile`` and ``timm-eager`` (float16 AMP) for EfficientNet-B7
  at 768 px: training and inference images/s, the ratio to the fastest timm row, peak device memory
  (``bench_step.py``'s workers, run as they are: the trainer's own model, loss and compile step);
* the largest per-device batch that fits for B7 at 768 px, plain and with the ``aux_seg`` mask decoder (with the
  mission preset's tip head and ``model.head``, as ``bench_step.py --recipe aux_seg`` builds it; one training
  step per probe; the first probes follow the measured memory, then bisection; a time cap);
* the kernel's throughput (B7 at 768 px, inference with 2 TTA views, from the ``keras-jax`` row's
  ``predict`` rate) and the model-pass time of 3,582 test images x 5 folds x 2 views against Kaggle's 9 hours;
* everything it could not do, each with its one-line reason (``not_done`` in the JSON), never a silent gap.

Every row has its own time cap (``ROW_CAPS_S``, scaled to ``--budget-s``; with ``--smoke`` each row may use
what is left) and the whole stops starting rows when the budget is spent. The batch search lets JAX use 95 %
of the device's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless set): the device's largest batch, not
that of JAX's default 75 %.

Wheels to carry (small, pure Python or manylinux; a JAX + PyTorch image usually has numpy, ml_dtypes,
packaging, filelock, fsspec, typing_extensions, torchvision and requests already). Download them here into
``wheels/`` (set --python-version to the box's Python), carry ``wheels`` and install there with no network:

    pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11 -d wheels \\
        "keras>=3.14,<3.16" namex optree h5py rich markdown-it-py mdurl pygments absl-py PyYAML \\
        timm huggingface_hub safetensors hf-xet tqdm
    pip install --no-index --find-links wheels keras timm PyYAML      # on the box; then run this script

The repository itself needs no installation: this script puts its checkout first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH_DIR))  # this checkout's ranzcr_tf
sys.path.insert(0, BENCH_DIR)

import bench_step  # noqa: E402  (imports no Keras, no TensorFlow: the workers do, each in its own process)

from ranzcr_tf import cli, io_utils  # noqa: E402

PROG = "device_check.py"
PROBE_MARK = "DEVICE_CHECK_PROBE "
STEP_ROWS = ("keras-jax", "timm-compile", "timm-eager")
# The mission setting, and the smallest one (CI: a CPU, seconds).
MISSION = {"backbone": "efficientnet_b7", "size": 768, "batch": 8, "keras_precision": "bfloat16",
           "timm_precision": "float16", "warmup": 2, "steps": 5, "search_start": 8, "max_probes": 6}
SMOKE = {"backbone": "compact_cnn", "size": 64, "batch": 2, "keras_precision": "float32",
         "timm_precision": "float32", "warmup": 2, "steps": 1, "search_start": 2, "max_probes": 2,
         "timm_model": "tf_mobilenetv3_small_minimal_100"}
# Seconds per row at --budget-s 450 (scaled with it); compilation dominates on an accelerator.
ROW_CAPS_S = {"keras-jax": 150, "timm-eager": 50, "timm-compile": 130, "max-batch plain": 60,
              "max-batch aux_seg": 60}
MIN_ROW_S = 20  # a row with less time left than this is not started
# The Kaggle kernel: RANZCR's hidden test set, a 5-fold ensemble, 2 TTA views, the 9-hour GPU limit.
TEST_IMAGES, FOLDS, TTA_VIEWS, LIMIT_HOURS = 3582, 5, 2, 9.0
MEMORY_FRACTION = "0.95"


# ----------------------------------------------------------------------------------------------- settings
def bench_args(setting: dict, **changes) -> argparse.Namespace:
    """``bench_step.py``'s arguments for one row (its parser's defaults, then the setting, then ``changes``)."""
    args = bench_step.build_parser().parse_args([])
    args.backbone, args.size, args.batch = setting["backbone"], setting["size"], setting["batch"]
    args.warmup, args.steps, args.timm_model = setting["warmup"], setting["steps"], setting.get("timm_model")
    args.precision = setting["keras_precision"]
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def step_row(setting: dict, name: str, cap_s: float) -> dict:
    worker, backend, compiled = bench_step.ROWS[name]
    precision = setting["timm_precision"] if worker == "torch" else setting["keras_precision"]
    args = bench_args(setting, precision=precision, worker_timeout=max(1, int(cap_s)))
    return bench_step.call_worker(args, name, worker, backend, compiled)


# ----------------------------------------------------------------------------------------------- largest batch
def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def next_batch(lo: int, hi: int | None, start: int, estimate: int | None) -> int | None:
    """The next batch to try, given the largest that fit (``lo``, 0 = none yet) and the smallest that did not
    (``hi``, None = none yet); None when they are adjacent. Upwards: the memory estimate, else doubling."""
    if lo == 0 and hi is None:
        return start
    if hi is None:
        return max(lo + 1, estimate) if estimate else 2 * lo
    return None if hi - lo <= 1 else (lo + hi) // 2


def memory_estimate(points: list[tuple[int, float]], limit: float | None) -> int | None:
    """The batch at which the peak memory would reach 97 % of ``limit``, linear in the batch through the
    measured ``(batch, peak bytes)`` points (one point: through zero, which underestimates)."""
    if not points or not limit:
        return None
    (b1, p1), (b2, p2) = (points[-2] if len(points) > 1 else (0, 0.0)), points[-1]
    slope = (p2 - p1) / (b2 - b1) if b2 != b1 else 0
    return int(b2 + (0.97 * limit - p2) / slope) if slope > 0 else None


def probe_worker(args) -> int:
    """One process of the search: training steps at growing batches until one does not fit (then the parent
    starts a fresh process: the failed step may have consumed the donated training state), the cap or the
    probe limit. One ``PROBE_MARK`` JSON line per probe."""
    setting = SMOKE if args.smoke else MISSION
    bench = bench_args(setting, backend="jax", compiled=True, recipe=args.recipe, precision=setting["keras_precision"])
    keras, model, cfg, placement, _, _ = bench_step.build_keras_step(bench)
    import jax

    device = jax.devices()[0]
    lo, hi, points, last_s = args.lo, args.hi, [], 0.0
    for _ in range(args.max_probes):
        stats = device.memory_stats() or {}
        batch = next_batch(lo, hi, setting["search_start"], memory_estimate(points, stats.get("bytes_limit")))
        if batch is None or time.time() + last_s > args.deadline:
            break
        images, targets = bench_step.synthetic_batch(cfg, bench, batch, placement.accelerator)
        start = time.monotonic()
        try:
            keras.ops.convert_to_numpy(model.train_on_batch(images, targets, return_dict=True)["loss"])
            fits = True
        except Exception as exc:  # noqa: BLE001  (anything but running out of memory ends the search, said)
            if not is_out_of_memory(exc):
                print(PROBE_MARK + json.dumps({"batch": batch, "error": cli._one_line(exc)[:300]}), flush=True)
                return 0
            fits = False
        last_s = time.monotonic() - start
        stats = device.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use")
        print(PROBE_MARK + json.dumps({"batch": batch, "fits": fits, "seconds": round(last_s, 2),
                                       "peak_mb": peak / 2**20 if peak else None,
                                       "limit_mb": stats["bytes_limit"] / 2**20 if "bytes_limit" in stats else None,
                                       "tensorflow_imported": "tensorflow" in sys.modules}), flush=True)
        if not fits:
            return 0
        lo = batch
        if peak:
            points.append((batch, float(peak)))
    return 0


def _probe_lines(stdout: str) -> list[dict]:
    return [json.loads(line[len(PROBE_MARK):]) for line in stdout.splitlines() if line.startswith(PROBE_MARK)]


def largest_batch(setting: dict, recipe: str, cap_s: float, smoke: bool) -> dict:
    """Search the largest per-device training batch of ``recipe`` within ``cap_s`` seconds (fresh processes)."""
    deadline = time.monotonic() + cap_s
    lo, hi, probes, stopped = 0, None, [], None
    env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                                         MEMORY_FRACTION))
    while stopped is None:
        left = deadline - time.monotonic()
        if left < 5:
            stopped = f"time cap of {cap_s:.0f} s reached"
            break
        command = [sys.executable, os.path.abspath(__file__), "--probe", recipe, "--lo", str(lo), "--deadline",
                   str(time.time() + left), "--max-probes", str(setting["max_probes"] - len(probes))]
        command += ["--hi", str(hi)] if hi is not None else []
        command += ["--smoke"] if smoke else []
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=left)
            output, code, errors = done.stdout, done.returncode, done.stderr
        except subprocess.TimeoutExpired as exc:  # what it printed before the cap still counts
            output, code, errors = _text(exc.stdout), None, ""
        found = _probe_lines(output)
        probes += found
        for probe in found:
            if "error" in probe:
                stopped = f"batch {probe['batch']}: {probe['error']}"
            elif probe["fits"]:
                lo = max(lo, probe["batch"])
            else:
                hi = probe["batch"] if hi is None else min(hi, probe["batch"])
        if stopped is None:
            stopped = _search_stop(lo, hi, probes, setting["max_probes"], code, found, cap_s, errors)
    return {"largest_fit": lo or None, "smallest_failure": hi, "exact": hi is not None and hi - lo <= 1,
            "probes": probes, "stopped": stopped, "recipe": recipe,
            "memory_fraction": env["XLA_PYTHON_CLIENT_MEM_FRACTION"]}


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def _search_stop(lo: int, hi: int | None, probes: list, max_probes: int, code: int | None, found: list,
                 cap_s: float, errors: str) -> str | None:
    """Why the search ends after a probe process, or None to start a fresh one (its last probe ran out)."""
    if hi is not None and hi - lo <= 1:
        return "exact: one more image did not fit" if lo else f"batch {hi} did not fit"
    if len(probes) >= max_probes:
        return f"probe limit of {max_probes} reached"
    if code is None:
        return f"time cap of {cap_s:.0f} s reached"
    if code != 0:
        tail = [line for line in errors.splitlines() if line.strip()][-1:] or ["no output"]
        return f"probe process exit {code}: {tail[0][:200]}"
    if not found or found[-1]["fits"]:
        return f"time cap of {cap_s:.0f} s reached (no time for another probe)"
    return None


# ----------------------------------------------------------------------------------------------- kernel
def kernel_estimate(keras_row: dict) -> dict:
    """The kernel's model passes from the keras-jax row's ``predict`` rate: images/s with 2 TTA views, and the
    hours for the hidden test set x 5 folds x 2 views against the 9-hour limit (decoding and CLAHE aside)."""
    rate = keras_row.get("infer_images_per_s")
    if not rate:
        return {"failed": "no keras-jax inference rate to derive it from: "
                          f"{keras_row.get('failed') or keras_row.get('skipped') or 'not run'}"}
    hours = TEST_IMAGES * FOLDS * TTA_VIEWS / rate / 3600
    return {"images_per_s_tta2": rate / TTA_VIEWS, "model_images_per_s": rate, "test_images": TEST_IMAGES,
            "folds": FOLDS, "views": TTA_VIEWS, "hours": hours, "limit_hours": LIMIT_HOURS,
            "share_of_limit": hours / LIMIT_HOURS, "basis": f"keras-jax predict, batch {keras_row['batch']}, "
                                                            f"{keras_row['policy']}, on {keras_row['device']}"}


# ----------------------------------------------------------------------------------------------- report
def not_done(report: dict) -> list[str]:
    """Every part that did not give its figure, as ``part: reason``."""
    missing = [f"{name}: {row.get('failed') or row.get('skipped')}" for name, row in report["rows"].items()
               if "train_images_per_s" not in row]
    for recipe, search in report["max_batch"].items():
        if "failed" in search or search.get("largest_fit") is None:
            missing.append(f"max-batch {recipe}: {search.get('failed') or search.get('stopped')}")
    if "failed" in report["kernel"]:
        missing.append(f"kernel: {report['kernel']['failed']}")
    return missing


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f}"


def print_report(report: dict) -> None:
    s = report["settings"]
    print(f"\n{s['backbone']} at {s['size']} px, batch {s['batch']}; Keras {s['keras_precision']}, timm "
          f"{s['timm_precision']}; {report['elapsed_s']:.0f} s of a {s['budget_s']} s budget")
    reference = report["reference"]
    print(f"{'row':<13} {'device':<22} {'train img/s':>11} {'x':>6} {'infer img/s':>11} {'x':>6} {'peak MB':>8}  "
          f"(x: to {reference or '-'})")
    for name, row in report["rows"].items():
        if "train_images_per_s" not in row:
            print(f"{name:<13} {'-':<22} {'-':>11} {'':>6} {'-':>11} {'':>6} {'':>8}  "
                  f"{'skipped' if 'skipped' in row else 'FAILED'}: {row.get('skipped') or row.get('failed')}")
            continue
        ratio = report["ratios"].get(name, {})
        print(f"{name:<13} {row['device'][:22]:<22} {row['train_images_per_s']:>11.2f} "
              f"{ratio.get('train', float('nan')):>6.2f} {row['infer_images_per_s']:>11.2f} "
              f"{ratio.get('infer', float('nan')):>6.2f} {_mb(row['peak_mb']):>8}  {row['policy']}")
    compiles = report["rows"]["keras-jax"].get("compile_s")
    if compiles:
        print("keras-jax XLA compilations (s): " + ", ".join(f"{name} {times}" for name, times in compiles.items()))
    for recipe, search in report["max_batch"].items():
        print(f"largest batch, {recipe}: fits {search.get('largest_fit') or '-'}, fails "
              f"{search.get('smallest_failure') or '-'} ({len(search.get('probes', []))} probes; "
              f"{search.get('failed') or search.get('stopped')})")
    kernel = report["kernel"]
    if "failed" in kernel:
        print(f"kernel: FAILED: {kernel['failed']}")
    else:
        print(f"kernel: {kernel['images_per_s_tta2']:.2f} images/s with {TTA_VIEWS} TTA views -> "
              f"{TEST_IMAGES} images x {FOLDS} folds: {kernel['hours']:.2f} h of the {LIMIT_HOURS:.0f} h limit "
              f"({kernel['basis']})")
    print(f"tensorflow imported: {report['tensorflow_imported']}")
    for line in report["not_done"]:
        print(f"NOT DONE: {line}")


def run_check(args) -> int:
    setting = SMOKE if args.smoke else MISSION
    if not args.out:
        raise ValueError("--out FILE.json is required: the JSON that keeps every figure and every reason")
    cli.check_output_file(args.out)
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"  # the workers inherit it
    start = time.monotonic()
    scale = args.budget_s / sum(ROW_CAPS_S.values())

    def cap(name: str) -> float | None:  # the smoke run (CI, a shared CPU) gives each row all that is left
        left = args.budget_s - (time.monotonic() - start)
        share = left if args.smoke else ROW_CAPS_S[name] * scale
        return min(share, left) if left >= MIN_ROW_S else None

    def budget_spent() -> dict:
        return {"failed": f"not started: the {args.budget_s} s budget was spent"}

    rows = {}
    for name in STEP_ROWS:
        seconds = cap(name)
        rows[name] = step_row(setting, name, seconds) if seconds else budget_spent()
    reference = bench_step.reference_row(rows)
    ref = rows.get(reference, {})
    ratios = {name: {kind: row[f"{kind}_images_per_s"] / ref[f"{kind}_images_per_s"] for kind in ("train", "infer")}
              for name, row in rows.items() if "train_images_per_s" in row and ref}
    max_batch = {}
    for recipe in ("plain", "aux_seg"):
        seconds = cap(f"max-batch {recipe}")
        max_batch[recipe] = largest_batch(setting, recipe, seconds, args.smoke) if seconds else budget_spent()
    keras_rows = [row for row in rows.values() if "tensorflow_imported" in row]
    probes = [probe for search in max_batch.values() for probe in search.get("probes", [])]
    report = {"settings": {**setting, "budget_s": args.budget_s, "smoke": args.smoke},
              "rows": rows, "reference": reference, "ratios": ratios, "max_batch": max_batch,
              "kernel": kernel_estimate(rows["keras-jax"]),
              "tensorflow_imported": "tensorflow" in sys.modules or any(
                  item.get("tensorflow_imported") for item in keras_rows + probes),
              "elapsed_s": time.monotonic() - start}
    report["not_done"] = not_done(report)
    io_utils.atomic_write_json(args.out, report)
    print_report(report)
    return 1 if any("failed" in row for row in rows.values()) else 0


def build_parser():
    parser = cli.build_parser(PROG, __doc__.split("\n\n")[0])
    parser.description = __doc__
    parser.add_argument("--out", help="the JSON file to write (every figure and every reason)")
    parser.add_argument("--smoke", action="store_true", help="compact model, 64 px, 2 warm-up steps + 1 timed, on the CPU (CI)")
    parser.add_argument("--budget-s", type=int, default=sum(ROW_CAPS_S.values()),
                        help="seconds for all rows together; each row's cap is its share (default %(default)s)")
    parser.add_argument("--probe", choices=("plain", "aux_seg"), help=argparse.SUPPRESS)
    parser.add_argument("--lo", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--hi", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--max-probes", type=int, default=1, help=argparse.SUPPRESS)
    return parser


def body(args) -> int:
    if args.probe:
        args.recipe = args.probe
        return probe_worker(args)
    if args.budget_s < MIN_ROW_S:
        raise ValueError(f"--budget-s {args.budget_s}: expected at least {MIN_ROW_S} seconds")
    return run_check(args)


def main(argv=None) -> int:
    return cli.main(build_parser(), body, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
