"""The 11 RANZCR CLiP targets: the only place their order is written.

The order is the column order of Kaggle's ``sample_submission.csv`` and
``train.csv``; every array of 11 targets or probabilities in this project
follows it.
"""

from __future__ import annotations

import re

LABELS: tuple[str, ...] = (
    "ETT - Abnormal",
    "ETT - Borderline",
    "ETT - Normal",
    "NGT - Abnormal",
    "NGT - Borderline",
    "NGT - Incompletely Imaged",
    "NGT - Normal",
    "CVC - Abnormal",
    "CVC - Borderline",
    "CVC - Normal",
    "Swan Ganz Catheter Present",
)
NUM_CLASSES = len(LABELS)

ID_COLUMN = "StudyInstanceUID"
PATIENT_COLUMN = "PatientID"
TRAIN_COLUMNS: tuple[str, ...] = (ID_COLUMN, *LABELS, PATIENT_COLUMN)
SUBMISSION_COLUMNS: tuple[str, ...] = (ID_COLUMN, *LABELS)
ANNOTATION_COLUMNS: tuple[str, ...] = (ID_COLUMN, "label", "data")

# Tube families, in label order; each maps to the slice of LABELS it owns.
GROUPS: dict[str, tuple[str, ...]] = {
    "ETT": LABELS[0:3],
    "NGT": LABELS[3:7],
    "CVC": LABELS[7:10],
    "Swan Ganz": LABELS[10:11],
}


# Line-mask targets (``train.recipe`` aux_seg, teacher): one channel per tube family, at 1/4 of the model's
# input size (the decoder's output resolution). Shared by the tf.data pipeline that rasterises them
# (``pipeline.masks``) and the Keras model that predicts them (``model.decoder``), which runs without TensorFlow.
FAMILIES: tuple[str, ...] = tuple(GROUPS)  # ETT, NGT, CVC, Swan Ganz: the mask channels, in this order
NUM_FAMILIES = len(FAMILIES)
MASK_STRIDE = 4


def mask_size(image_size: int) -> int:
    """Side of the masks for a model input of ``image_size`` px (1/4: the decoder's output size)."""
    if image_size % 32:
        raise ValueError(f"train.recipe aux_seg needs an image size divisible by 32 (the decoder upsamples "
                         f"stride-16 features to stride 4), got {image_size}: set data.image_size")
    return image_size // MASK_STRIDE


def group_slices() -> dict[str, slice]:
    """Slice of the 11-vector owned by each tube family, in label order."""
    slices, start = {}, 0
    for name, members in GROUPS.items():
        slices[name] = slice(start, start + len(members))
        start += len(members)
    return slices


def group_of(label: str) -> str:
    """The tube family ('ETT', 'NGT', 'CVC', 'Swan Ganz') a label belongs to."""
    for name, members in GROUPS.items():
        if label in members:
            return name
    raise ValueError(f"unknown label {label!r}; expected one of {list(LABELS)}")


def label_slug(label: str) -> str:
    """``"NGT - Incompletely Imaged"`` -> ``"ngt_incompletely_imaged"`` (for log keys and CSV columns)."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
