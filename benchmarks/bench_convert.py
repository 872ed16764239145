#!/usr/bin/env python
"""Converter throughput against a naive serial reference, on the same full-size synthetic images.

    python benchmarks/bench_convert.py                      # 200 images at 768 px, all cores
    python benchmarks/bench_convert.py --n 200 2000         # memory flatness: peak RSS at both sizes

(a) the converter (``ranzcr_tf.prep.convert``: DCT-scaled decode, CLAHE on the scaled image, bilinear
resize, encode, on ``--workers`` threads, written to TFRecord shards) and (b) the naive reference (serial,
full-resolution decode, CLAHE at full resolution, resize, encode) process the same images in the
same run. Printed: images/s of each and their ratio, the mean PSNR of the converter's stored images
against the reference's (speed must not come from worse pictures: target >= 35 dB), and the peak
resident memory of the converter (its process, plus any children, sampled every 50 ms) for each ``--n``.
Target on a 2-core machine at 768 px: ratio >= 4x, peak memory flat from 200 to 2,000 images.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def cpu_seconds() -> float:
    """User + system CPU time of this process and all its descendants, reaped or alive.

    The converter's workers are threads of this process; children are counted all the same, so the
    figure stays right if any work ever moves to processes (a live child counts with its own reaped children).
    """
    import resource

    import psutil

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
    for child in psutil.Process().children():
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


class PeakRSS:
    """Peak of the summed RSS of this process and all its children, sampled in a thread."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._process, self._interval = psutil.Process(), interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in [self._process, *self._process.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                total += rss
            self.peak = max(self.peak, total)
            self._stop.wait(self._interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def make_images(data_dir: str, n: int, seed: int) -> None:
    """Full-size synthetic studies in the Kaggle layout (the shared generator when present)."""
    if os.path.exists(os.path.join(data_dir, "train.csv")):
        import pandas as pd

        if len(pd.read_csv(os.path.join(data_dir, "train.csv"))) >= n:
            return
    try:
        from ranzcr_tf.synth import generate as synthetic
    except ImportError:
        synthetic = None
    if getattr(synthetic, "make_dataset", None) is not None:
        synthetic.make_dataset(data_dir, n, 1, seed=seed, workers=0, scale=1.0)
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from helpers_convert import make_tiny_dataset

    make_tiny_dataset(data_dir, n_train=n, n_test=0, seed=seed, size_range=(1500, 2600))


def reference_convert(paths: list[str], settings) -> list[bytes]:
    """The naive pipeline: full-resolution decode, CLAHE at full resolution, resize, encode (serial)."""
    import cv2

    grid = (settings.clahe_tile_grid, settings.clahe_tile_grid)
    clahe = cv2.createCLAHE(clipLimit=settings.clahe_clip_limit, tileGridSize=grid)
    size = settings.image_size
    out = []
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
        image = cv2.resize(clahe.apply(image), (size, size), interpolation=cv2.INTER_AREA)
        out.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, settings.jpeg_quality])[1].tobytes())
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[200], help="images to convert (one run per value)")
    parser.add_argument("--reference-n", type=int, default=200, help="images the serial reference converts")
    parser.add_argument("--image-size", type=int, default=768)
    parser.add_argument("--workers", type=int, default=0,
                        help="threads (in this process) converting images; 0 = one per available core")
    parser.add_argument("--data-dir", help="reuse/keep the generated images here (default: a temp folder)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating reference/converter rounds (median)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def timed_rounds(args, paths, settings, data_dir, work, workers):
    """Rounds alternating the serial reference and the converter; each round's ratio uses that round's
    reference, so the ratio survives the minutes-long speed swings of a shared virtual machine.

    Returns the reference's stored JPEGs, its [(images/s, CPU ms/image)] per round, and per ``n`` the
    converter's [(images/s, ratio, peak RSS, CPU ms/image)] per round.
    """
    import cv2

    from ranzcr_tf.prep.convert import ConvertOptions, convert

    default_threads = cv2.getNumThreads()
    results = {n: [] for n in args.n}
    reference_runs = []
    for _ in range(args.rounds):
        cv2.setNumThreads(1)  # strictly serial: one image at a time on one core
        start, cpu_start = time.perf_counter(), cpu_seconds()
        reference = reference_convert(paths, settings)
        reference_runs.append((len(paths) / (time.perf_counter() - start),
                               1000 * (cpu_seconds() - cpu_start) / len(paths)))
        cv2.setNumThreads(default_threads)
        for n in args.n:
            out = os.path.join(work, f"out{n}")
            options = ConvertOptions(data_dir=data_dir, out_dir=out, preprocess=settings, num_folds=2,
                                     workers=workers, include_test=False, limit=n, progress=False, overwrite=True)
            with PeakRSS() as memory:
                start, cpu_start = time.perf_counter(), cpu_seconds()
                manifest = convert(options)
                seconds = time.perf_counter() - start
                cpu = cpu_seconds() - cpu_start
            count = manifest["num_train"]
            rate = count / seconds
            results[n].append((rate, rate / reference_runs[-1][0], memory.peak, 1000 * cpu / count))
    return reference, reference_runs, results


def fidelity(records_dir: str, ids: list[str], reference: list[bytes]) -> tuple[list[float], list[float]]:
    """Per-image squared errors and PSNRs of the converter's stored images against the reference's (an
    image both pipelines decode in full at the same size is identical: its PSNR is capped at 99 dB)."""
    import cv2
    import tensorflow as tf

    from ranzcr_tf.labels import ID_COLUMN
    from ranzcr_tf.prep import records

    stored = {}
    for path in records.list_shards(records_dir, "train"):
        for raw in tf.data.TFRecordDataset(path):
            parsed = records.parse_example(raw)
            stored[parsed[ID_COLUMN].numpy().decode()] = parsed[records.IMAGE].numpy()
    errors, scores = [], []
    for study, ref in zip(ids, reference):
        ours = records.decode_image_numpy(stored[study]).astype(np.float64)
        mse = float(np.mean((ours - cv2.imdecode(np.frombuffer(ref, np.uint8), 0)) ** 2))
        errors.append(mse)
        scores.append(min(99.0, 10 * np.log10(255.0 ** 2 / max(mse, 1e-10))))
    return errors, scores


def print_converter_rows(results: dict, workers: int, threaded_rate: float, reference_cpu: float) -> None:
    """One line per n: median rate, ratio to the reference, CPU ms/image and peak RSS over the rounds."""
    for n, runs in results.items():
        rate, ratio = float(np.median([r[0] for r in runs])), float(np.median([r[1] for r in runs]))
        cpu = float(np.median([r[3] for r in runs]))
        peak = max(r[2] for r in runs)
        print(f"converter ({workers} workers), n={n:5d}: {rate:7.1f} images/s   ratio {ratio:4.2f}x (median; rounds "
              f"{' '.join(f'{r[1]:.2f}' for r in runs)}; {rate / threaded_rate:.1f}x vs threaded reference)   "
              f"{cpu:.1f} CPU ms/image (reference/converter CPU {reference_cpu / cpu:.2f}x)   "
              f"peak RSS {peak / 2**20:6.0f} MiB")


def print_fidelity(errors, scores, settings, example: dict) -> None:
    """PSNR of the converter's images against the reference's (per image and pooled), with the settings used."""
    pooled = 10 * np.log10(255.0 ** 2 / max(float(np.mean(errors)), 1e-10))
    print(f"PSNR converter vs reference: mean {np.mean(scores):.2f} dB over {len(scores)} images (min "
          f"{np.min(scores):.2f}), {pooled:.2f} dB pooled (target >= 35); converter settings: "
          f"interpolation={settings.interpolation}, reduced_decode={settings.reduced_decode} (e.g. the first "
          f"image, {example['orig_width']}x{example['orig_height']}, decoded at scale {example['decode_scale']})")


def main(argv=None) -> int:
    args = parse_args(argv)
    import cv2
    import pandas as pd
    import tensorflow as tf  # noqa: F401  imported before timing: the reference does not need it, the converter does

    from ranzcr_tf.config import PreprocessConfig
    from ranzcr_tf.prep.convert import available_cores
    from ranzcr_tf.prep.preprocess import decode_source

    workers = args.workers or available_cores()
    work = tempfile.mkdtemp(prefix="bench_convert_")
    data_dir = args.data_dir or os.path.join(work, "data")
    started = time.perf_counter()
    make_images(data_dir, max(args.n), args.seed)
    print(f"images: {max(args.n)} full-size synthetic studies in {data_dir} "
          f"(made in {time.perf_counter() - started:.0f} s); workers={workers}, image_size={args.image_size}")
    settings = PreprocessConfig(image_size=args.image_size)

    # The reference converts the first reference_n studies of train.csv (the converter's --limit keeps
    # the head of train.csv, so they are among its records whatever n).
    ids = pd.read_csv(os.path.join(data_dir, "train.csv"), dtype=str)["StudyInstanceUID"].tolist()
    ids = ids[: min(args.reference_n, *args.n)]
    paths = [os.path.join(data_dir, "train", f"{i}.jpg") for i in ids]
    default_threads = cv2.getNumThreads()
    start = time.perf_counter()
    reference_convert(paths, settings)  # as naive code runs: OpenCV may use its thread pool inside one call
    threaded_rate = len(paths) / (time.perf_counter() - start)

    reference, reference_runs, results = timed_rounds(args, paths, settings, data_dir, work, workers)
    errors, scores = fidelity(os.path.join(work, f"out{args.n[0]}"), ids, reference)
    with open(paths[0], "rb") as fh:
        example = decode_source(fh.read(), settings)[1]

    reference_rate = float(np.median([r[0] for r in reference_runs]))
    reference_cpu = float(np.median([r[1] for r in reference_runs]))
    print(f"\nreference (serial, full-resolution decode + CLAHE, area resize), 1 OpenCV thread: "
          f"{reference_rate:.1f} images/s over {len(paths)} (median of {args.rounds}: "
          f"{' '.join(f'{r[0]:.1f}' for r in reference_runs)}), {reference_cpu:.1f} CPU ms/image "
          f"({threaded_rate:.1f} images/s with OpenCV's default {default_threads} threads)")
    print_converter_rows(results, workers, threaded_rate, reference_cpu)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
          f"(timings are only comparable on an otherwise idle machine)")
    print_fidelity(errors, scores, settings, example)
    if len(results) > 1:
        first, last = args.n[0], args.n[-1]
        growth = max(r[2] for r in results[last]) / max(r[2] for r in results[first])
        print(f"peak memory n={last} / n={first}: {growth:.2f}x (flat means ~1.0)")
    shutil.rmtree(work, ignore_errors=True)  # outputs, and the images unless --data-dir keeps them
    return 0

if __name__ == "__main__":
    sys.exit(main())
