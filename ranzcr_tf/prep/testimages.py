"""Raw test JPEGs -> test TFRecords with a run's own preprocessing, so both kernel inputs are one path.

    records_dir, skipped = preprocess_test_images("data", ids, settings, "/tmp/ranzcr-test/g0")

Each image goes through the converter's function (``preprocess.preprocess_file``: decode, CLAHE,
resize, JPEG encode) with the settings saved in the run folder (``preprocess.json``), on the
converter's worker threads; the calling thread writes the stored JPEGs, in ``ids`` order, into one
``test`` shard plus a ``manifest.json`` (the converter's shard and manifest writers, ``shard_writer.py``). Prediction then reads
them with ``data.build_eval_dataset`` exactly like the converter's own test records, so raw-JPEG
and TFRecord inference decode the same bytes with the same function and see the same pixels.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from ranzcr_tf.config import PreprocessConfig
from ranzcr_tf.prep import records
from ranzcr_tf.prep.shard_plan import preprocess_settings
from ranzcr_tf.prep.shard_writer import ShardWriter, write_manifest
from ranzcr_tf.prep.workers import available_cores, ordered_map, process_image, start_threads

TEST_IMAGE_DIR = "test"


class DeadlineReached(RuntimeError):
    """The time budget ran out before the work finished (the caller falls back)."""


def preprocess_test_images(data_dir: str, ids: list[str], settings: PreprocessConfig, out_dir: str, *,
                           workers: int = 0, expired: Callable[[], bool] | None = None,
                           progress: bool = True, on_first: Callable[[int, float], None] | None = None,
                           shard_index: int = 0, image_dir: str = TEST_IMAGE_DIR,
                           extension: str = ".jpg") -> tuple[str, list[dict]]:
    """Preprocess ``data_dir/test/{id}.jpg`` for every ID into ``out_dir`` (a test-only records folder;
    another task: ``data_dir/{image_dir}/{id}{extension}``, its first ``task.test_images`` and ``task.extension``).

    Returns ``(out_dir, skipped)`` where ``skipped`` lists ``{'id', 'reason'}`` of unreadable images
    (left out of the records; the kernel fills their rows). ``expired()`` is polled per image; when it
    says the budget is spent, :class:`DeadlineReached` is raised and nothing usable is left behind.
    ``on_first(n, seconds)`` is called once after the first ``n`` images with their wall time.
    ``shard_index`` numbers the one shard written (the kernel adds such a shard beside converted records).
    """
    from tqdm.auto import tqdm

    settings.validate()
    tasks = [(os.path.join(data_dir, image_dir, f"{sid}{extension}"), settings) for sid in ids]
    workers = workers or available_cores()
    skipped, start = [], time.monotonic()
    bar = tqdm(total=len(tasks), desc=f"preprocess {settings.image_size}px", unit="img", disable=not progress,
               file=sys.stderr)
    # The converter's worker threads and shard writer; results come back in ``ids`` order.
    try:
        with start_threads(workers if len(tasks) > 1 else 1) as pool, \
                ShardWriter(out_dir, records.TEST_DIR, None, shard_index) as writer:
            results = ordered_map(process_image, tasks, pool, window=4 * workers)
            for index, (sid, (status, payload, info)) in enumerate(zip(ids, results)):
                bar.update(1)
                if expired is not None and expired():
                    raise DeadlineReached(f"time budget spent while preprocessing test images ({index}/{len(ids)})")
                if on_first is not None and index + 1 == min(len(ids), max(8, 2 * workers)):
                    on_first(index + 1, time.monotonic() - start)
                if status == "bad":
                    reason = payload if os.path.exists(tasks[index][0]) else "no such file"
                    bar.write(f"warning: test image {tasks[index][0]} cannot be used ({reason}): its row gets the "
                              f"column means", file=sys.stderr)
                    skipped.append({"split": records.TEST_DIR, "id": sid, "path": tasks[index][0], "reason": reason})
                    continue
                writer.write(records.serialize_example(
                    payload, sid, target=None, fold=-1, height=info["height"], width=info["width"],
                    orig_height=info["orig_height"], orig_width=info["orig_width"]))
    finally:
        bar.close()
    write_manifest(out_dir, preprocess=preprocess_settings(settings), image_size=settings.image_size, num_folds=0,
                   num_train=0, num_test=writer.count, shards={records.TRAIN_DIR: [],
                                                               records.TEST_DIR: [writer.name] if writer.name else []},
                   skipped=skipped, source={"data_dir": os.path.abspath(data_dir)})
    return out_dir, skipped
