"""A folder of unlabeled radiographs -> ``extra/`` TFRecords (``make_tfrecords.py --unlabeled DIR --out-dir X``).

    manifest = convert_unlabeled("nih_images/", "extra_records/", PreprocessConfig(image_size=768))

Every image (``.jpg``/``.jpeg``/``.png``, 8- or 16-bit, and DICOM radiographs ``.dcm``/``.dicom``, read as
displayed by ``prep.dicom.read_radiograph``: VOI LUT or window, MONOCHROME1 flipped) goes through the
converter's own preprocessing (``preprocess.preprocess_file`` on the converter's worker threads) and is written by the one shard
writer into ``X/extra/extra-{i:03d}-{count}.tfrec``: ``has_target = 0``, ``fold = -1``, the study ID is
the file name without its extension. No folds, no labels: these records get soft labels from
``python -m ranzcr_tf.serve.pseudo predict --split extra`` and are mixed into training with
``train.extra_records`` (never into validation or OOF). ``X/manifest.json`` records the preprocessing
(the kernel's and training's size checks read it), ``num_extra`` and every skipped file with its reason.

Unreadable files are skipped and listed, as the converter does; so are DICOM files where pydicom (the
``dicom`` extra) is not installed.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from ranzcr_tf import io_utils
from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.locks import FolderLock
from ranzcr_tf.prep import records
from ranzcr_tf.prep.preprocess import DICOM_SUFFIXES
from ranzcr_tf.prep.shard_plan import preprocess_settings
from ranzcr_tf.prep.shard_writer import ShardWriter, write_manifest
from ranzcr_tf.prep.workers import available_cores, ordered_map, process_image, start_threads

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_SHARD_RECORDS = 1024


def list_images(source_dir: str) -> tuple[list[tuple[str, str]], list[dict]]:
    """``([(study ID, path)], skipped)``: image files by name, and the other files with why they are left out."""
    if not os.path.isdir(source_dir):
        raise ValueError(f"--unlabeled {source_dir} is not a folder: pass the folder holding the images")
    images, skipped, seen = [], [], {}
    for name in sorted(os.listdir(source_dir)):
        path = os.path.join(source_dir, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        stem, suffix = os.path.splitext(name)
        suffix = suffix.lower()
        if suffix in DICOM_SUFFIXES and importlib.util.find_spec("pydicom") is None:
            from ranzcr_tf.prep.dicom import INSTALL_HINT

            skipped.append({"split": records.EXTRA_DIR, "id": stem, "path": path,
                            "reason": f"a DICOM file, and pydicom is not installed: {INSTALL_HINT}"})
            continue
        if suffix not in IMAGE_SUFFIXES + DICOM_SUFFIXES:
            skipped.append({"split": records.EXTRA_DIR, "id": stem, "path": path,
                            "reason": f"not an image file ({', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)})"})
            continue
        if stem in seen:
            raise ValueError(f"--unlabeled {source_dir}: {seen[stem]} and {name} would both be study {stem!r}; "
                             f"rename or remove one (IDs come from file names)")
        seen[stem] = name
        images.append((stem, path))
    return images, skipped


def convert_unlabeled(source_dir: str, out_dir: str, settings: PreprocessConfig, *, workers: int = 0,
                      shard_records: int = 0, progress: bool = True) -> dict:
    """Preprocess every image of ``source_dir`` into ``out_dir/extra/`` shards; returns the manifest. One
    converter per folder (``locks.FolderLock``, as for the competition converters)."""
    settings.validate()
    _refuse_converted(out_dir)
    images, skipped = list_images(source_dir)
    for entry in skipped:
        print(f"skipped {entry['path']}: {entry['reason']}", file=sys.stderr)
    if not images:
        raise ValueError(f"--unlabeled {source_dir} holds no {'/'.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)} file")
    with FolderLock(out_dir, "make_tfrecords.py"):
        _refuse_converted(out_dir)  # another converter may have finished while this one listed the images
        return _write_unlabeled(source_dir, out_dir, settings, images, skipped, workers, shard_records, progress)


def _refuse_converted(out_dir: str) -> None:
    if io_utils.exists(io_utils.join(out_dir, records.MANIFEST)):
        raise ValueError(f"--out-dir {out_dir} already holds converted records ({records.MANIFEST}): pass a new "
                         f"folder for the unlabeled records")


def _write_unlabeled(source_dir: str, out_dir: str, settings: PreprocessConfig, images: list, skipped: list,
                     workers: int, shard_records: int, progress: bool) -> dict:
    from tqdm.auto import tqdm

    per_shard = shard_records or DEFAULT_SHARD_RECORDS
    workers = workers or available_cores()
    tasks = [(path, settings) for _, path in images]
    shards, written = [], 0
    bar = tqdm(total=len(tasks), desc=f"unlabeled {settings.image_size}px", unit="img", disable=not progress,
               file=sys.stderr)
    try:
        with start_threads(workers if len(tasks) > 1 else 1) as pool:
            results = ordered_map(process_image, tasks, pool, window=4 * workers)
            for index, start in enumerate(range(0, len(images), per_shard)):
                with ShardWriter(out_dir, records.EXTRA_DIR, None, index) as writer:
                    for sid, path in images[start:start + per_shard]:
                        status, payload, info = next(results)
                        bar.update(1)
                        if status == "bad":
                            bar.write(f"skipped {path}: {payload}", file=sys.stderr)
                            skipped.append({"split": records.EXTRA_DIR, "id": sid, "path": path, "reason": payload})
                            continue
                        writer.write(records.serialize_example(
                            payload, sid, target=None, fold=-1, height=info["height"], width=info["width"],
                            orig_height=info["orig_height"], orig_width=info["orig_width"]))
                        written += 1
                if writer.name:
                    shards.append(writer.name)
    finally:
        bar.close()
    if not written:
        raise ValueError(f"--unlabeled {source_dir}: none of its {len(images)} images could be read "
                         f"(first: {skipped[-1]['path']}: {skipped[-1]['reason']})")
    return write_manifest(out_dir, preprocess=preprocess_settings(settings), image_size=settings.image_size,
                          num_folds=0, num_train=0, num_test=0,
                          shards={records.TRAIN_DIR: [], records.TEST_DIR: [], records.EXTRA_DIR: shards},
                          skipped=skipped, num_extra=written, source={"unlabeled_dir": os.path.abspath(source_dir)})
