"""The run-time budget of the kernel: which (model, fold, TTA view) passes still fit, in a stated order.

A *pass* is one forward pass of one fold's model over the whole test set with one TTA view. The full
plan is every model x every fold x every view. When the estimate says the plan would overrun the
budget, passes are dropped in this order (``degrade_levels``), coarsest last:

1. fewer TTA views: the last view in ``--tta`` goes first, down to the first view only;
2. fewer folds: every model keeps its first K folds, K shrinking down to 1;
3. fewer models: the last model (with ``weighted``, the lowest weight) goes first, down to one model.

Passes that already finished always stay in the ensemble. The plan is re-chosen before every pass
from measured times (model loading, preprocessing per image, prediction per image), so a slow second
model or a slow disk is noticed as soon as it is measured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

Pass = tuple[int, int, int]  # (model index, fold index, view index)

DEGRADE_ORDER = ("fewer TTA views (last view first)", "fewer folds per model (last folds first)",
                 "fewer models (last model, or lowest weight, first)")


def degrade_levels(fold_counts: Sequence[int], num_views: int, model_priority: Sequence[int] | None = None
                   ) -> list[frozenset[Pass]]:
    """Plans from the full one to the minimum (one model, one fold, one view), in degrade order.

    ``fold_counts[m]`` is the number of folds of model ``m``; ``model_priority`` lists model indices
    most important first (default: the given order); models are dropped from its end.
    """
    num_models = len(fold_counts)
    if num_models == 0 or num_views < 1 or min(fold_counts) < 1:
        raise ValueError("a plan needs at least one model with one fold and one TTA view")
    priority = list(model_priority) if model_priority is not None else list(range(num_models))
    if sorted(priority) != list(range(num_models)):
        raise ValueError(f"model_priority {priority} must be a permutation of 0..{num_models - 1}")

    def plan(models: Iterable[int], max_folds: int, views: int) -> frozenset[Pass]:
        return frozenset((m, f, v) for m in models for f in range(min(max_folds, fold_counts[m]))
                         for v in range(views))

    max_folds = max(fold_counts)
    levels = [plan(priority, max_folds, v) for v in range(num_views, 0, -1)]
    levels += [plan(priority, k, 1) for k in range(max_folds - 1, 0, -1)]
    levels += [plan(priority[:n], 1, 1) for n in range(num_models - 1, 0, -1)]
    unique: list[frozenset[Pass]] = []
    for level in levels:  # a model with fewer folds than max_folds makes some levels identical
        if not unique or level != unique[-1]:
            unique.append(level)
    return unique


def describe_plan(plan: Iterable[Pass], fold_counts: Sequence[int], num_views: int) -> str:
    """``'2/2 models, 5/5 folds, 2/2 views (20 passes)'``-style summary."""
    plan = set(plan)
    models = sorted({m for m, _, _ in plan})
    folds = sum(len({f for mm, f, _ in plan if mm == m}) for m in models)
    views = max((len({v for mm, ff, v in plan if (mm, ff) == (m, f)}) for m, f, _ in plan), default=0)
    return (f"{len(models)}/{len(fold_counts)} models, {folds}/{sum(fold_counts)} folds, "
            f"{views}/{num_views} views ({len(plan)} passes)")


@dataclass
class Budget:
    """Wall-clock budget with an injectable clock (tests pass a fake one to simulate slowness).

    ``reserve_seconds`` is kept back at the end for writing the submission and exiting.
    """

    max_seconds: float | None
    clock: Callable[[], float] = time.monotonic
    reserve_seconds: float = 0.0
    start: float = field(default=None)

    def __post_init__(self):
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"--max-minutes must be > 0, got {self.max_seconds / 60:g}")
        if self.start is None:
            self.start = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        """Seconds left before the deadline (budget minus reserve); ``inf`` without a budget."""
        if self.max_seconds is None:
            return float("inf")
        return self.max_seconds - self.reserve_seconds - self.elapsed()

    def expired(self) -> bool:
        return self.remaining() <= 0


@dataclass
class CostModel:
    """Measured costs, and the estimate of what a plan still needs.

    Unknown costs are filled from the closest measurement: another fold of the same model, else the
    slowest model measured so far scaled by pixel count; before any measurement a pass costs 0
    (the first pass always runs, and is what gets measured).
    """

    num_images: int
    image_sizes: dict  # (model, fold) -> model input size
    groups: dict  # (model, fold) -> preprocessing group key
    safety: float = 1.15  # estimates are inflated by this factor before comparing with the budget
    predict_seconds_per_image: dict = field(default_factory=dict)  # (model, fold, view) -> s/image
    load_seconds: list = field(default_factory=list)
    preprocess_seconds_per_image: dict = field(default_factory=dict)  # group -> s/image (decode dominates)
    done: set = field(default_factory=set)  # finished passes
    passed: set = field(default_factory=set)  # passes skipped for good (their fold's turn is over): cost 0
    loaded: set = field(default_factory=set)  # (model, fold) whose loading is already paid
    prepared: set = field(default_factory=set)  # preprocessing groups ready

    def pass_seconds(self, item: Pass) -> float:
        m, f, v = item
        measured = self.predict_seconds_per_image
        if item in measured:
            return measured[item] * self.num_images
        same_fold = [s for (mm, ff, _), s in measured.items() if (mm, ff) == (m, f)]
        same_model = [s for (mm, _, _), s in measured.items() if mm == m]
        if same_fold or same_model:
            return max(same_fold or same_model) * self.num_images
        if not measured:
            return 0.0
        size = self.image_sizes.get((m, f), 0)
        scaled = [s * (size / self.image_sizes[(mm, ff)]) ** 2 if size else s
                  for (mm, ff, _), s in measured.items()]
        return max(scaled) * self.num_images

    def preprocess_seconds(self, group) -> float:
        if group in self.prepared or not self.preprocess_seconds_per_image:
            return 0.0
        return max(self.preprocess_seconds_per_image.values()) * self.num_images

    def estimate(self, plan: Iterable[Pass]) -> float:
        """Seconds the not-yet-done passes of ``plan`` still need (loading and preprocessing included)."""
        todo = [p for p in plan if p not in self.done and p not in self.passed]
        load = max(self.load_seconds) if self.load_seconds else 0.0
        folds = {(m, f) for m, f, _ in todo} - self.loaded
        groups = {self.groups.get(mf) for mf in {(m, f) for m, f, _ in todo}}
        total = sum(self.pass_seconds(p) for p in todo) + load * len(folds)
        total += sum(self.preprocess_seconds(g) for g in groups)
        return total * self.safety


def choose_plan(levels: Sequence[frozenset[Pass]], costs: CostModel, remaining_seconds: float, start: int = 0
                ) -> tuple[int, frozenset[Pass]]:
    """The first (largest) level from ``start`` on whose remaining estimate fits; the minimum if none does.

    The kernel passes its current level as ``start``: plans only ever get smaller, so work skipped
    once is never half-restored later and the result follows the stated order.
    """
    for index in range(start, len(levels)):
        if costs.estimate(levels[index]) <= remaining_seconds:
            return index, levels[index]
    return len(levels) - 1, levels[-1]
