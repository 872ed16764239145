"""Raw test JPEGs -> test TFRecords with a run's own preprocessing, so both kernel inputs are one path.

    records_dir, skipped = preprocess_test_images("data", ids, settings, "/tmp/ranzcr-test/g0")

Each image goes through the converter's function (``preprocess.preprocess_file``: decode, CLAHE,
resize, JPEG encode) with the settings saved in the run folder (``preprocess.json``), on the
converter's worker threads; the calling thread writes the stored JPEGs, in ``ids`` order, into one
``test`` shard plus a minimal ``manifest.json``. Prediction then reads
them with ``data.build_eval_dataset`` exactly like the converter's own test records, so raw-JPEG
and TFRecord inference decode the same bytes with the same function and see the same pixels.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from ranzcr_tf import io_utils
from ranzcr_tf.prep import records
from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.prep.workers import available_cores, ordered_map, process_image, start_threads
from ranzcr_tf.prep.shard_plan import preprocess_settings

TEST_IMAGE_DIR = "test"


class DeadlineReached(RuntimeError):
    """The time budget ran out before the work finished (the caller falls back)."""


def preprocess_test_images(data_dir: str, ids: list[str], settings: PreprocessConfig, out_dir: str, *,
                           workers: int = 0, expired: Callable[[], bool] | None = None,
                           progress: bool = True, on_first: Callable[[int, float], None] | None = None
                           ) -> tuple[str, list[dict]]:
    """Preprocess ``data_dir/test/{id}.jpg`` for every ID into ``out_dir`` (a test-only records folder).

    Returns ``(out_dir, skipped)`` where ``skipped`` lists ``{'id', 'reason'}`` of unreadable images
    (left out of the records; the kernel fills their rows). ``expired()`` is polled per image; when it
    says the budget is spent, :class:`DeadlineReached` is raised and nothing usable is left behind.
    ``on_first(n, seconds)`` is called once after the first ``n`` images with their wall time.
    """
    import tensorflow as tf
    from tqdm.auto import tqdm

    settings.validate()
    folder = os.path.join(out_dir, records.TEST_DIR)
    os.makedirs(folder, exist_ok=True)
    tasks = [(os.path.join(data_dir, TEST_IMAGE_DIR, f"{sid}.jpg"), settings) for sid in ids]
    workers = workers or available_cores()
    tmp = io_utils.temp_name(os.path.join(folder, "test.tfrec"))
    skipped, written, start = [], 0, time.monotonic()
    bar = tqdm(total=len(tasks), desc=f"preprocess {settings.image_size}px", unit="img", disable=not progress,
               file=sys.stderr)
    # The converter's worker threads; results come back in ``ids`` order.
    try:
        with start_threads(workers if len(tasks) > 1 else 1) as pool, tf.io.TFRecordWriter(tmp) as writer:
            results = ordered_map(process_image, tasks, pool, window=4 * workers)
            for index, (sid, (status, payload, info)) in enumerate(zip(ids, results)):
                bar.update(1)
                if expired is not None and expired():
                    raise DeadlineReached(f"time budget spent while preprocessing test images ({index}/{len(ids)})")
                if on_first is not None and index + 1 == min(len(ids), max(8, 2 * workers)):
                    on_first(index + 1, time.monotonic() - start)
                if status == "bad":
                    bar.write(f"warning: unreadable test image {tasks[index][0]}, its row gets the column means: "
                              f"{payload}", file=sys.stderr)
                    skipped.append({"id": sid, "reason": payload})
                    continue
                writer.write(records.serialize_example(
                    payload, sid, target=None, fold=-1, height=info["height"], width=info["width"],
                    orig_height=info["orig_height"], orig_width=info["orig_width"]))
                written += 1
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        bar.close()
    if written:
        os.replace(tmp, os.path.join(folder, records.shard_name(None, 0, written)))
    else:
        os.remove(tmp)
    # The fields build_eval_dataset reads, as the converter writes them.
    io_utils.atomic_write_json(os.path.join(out_dir, records.MANIFEST), {
        "schema_version": records.SCHEMA_VERSION,
        "preprocess": preprocess_settings(settings),
        "image_size": settings.image_size,
        "num_folds": 2,  # unused for the test split; present because readers expect it
        "num_test": written,
        "test_count": written,
        "shards": {records.TRAIN_DIR: [], records.TEST_DIR: [f"test/{records.shard_name(None, 0, written)}"]},
        "skipped": [{"split": "test", **s} for s in skipped],
        "source": {"data_dir": os.path.abspath(data_dir)},
    })
    return out_dir, skipped
