"""Evaluate the vertebra model and write its model card (``make eval-vertebrae``).

    python -m inference.evaluate.vertebrae --data ../shared/data --model inference/models/spine-xr-vertebrae \\
        [--holdout ../cache/synth-holdout-v1] [--lopo-work ../cache/lopo-vertebrae] [--skip-lopo]

Three test sets, each beside a trivial baseline:

1. REAL: the held-out test split of the real AP radiographs (never used in training or checkpoint
   selection): vertebra detection, centroid-in-box and box IoU >= 0.3, against evenly spaced midline
   points / boxes whose count and extent were tuned on the training split; level naming under the
   export's convention that the lowest box is L5.
2. SYNTHETIC HOLD-OUT: samples rendered by the data engine with a seed never used for training (built
   on first use into ``--holdout``): Dice per structure, detection, level naming, heights (mm) and
   Genant grade agreement (Cohen's kappa) on laterals.
3. LEAVE-ONE-PATIENT-OUT: the recipe retrained (shorter) without one CT patient, tested on synthetic
   samples of that patient.

Beside 1, the same real test images changed to look like what a hospital sends (16-bit MONOCHROME1 DICOM
with ImagerPixelSpacing, lumbar fields, implants, low contrast, tilt; `real_variants`).

The numbers go into ``model.json`` ("metrics") and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from inference.evaluate import metrics as M
from inference.radiograph import preprocess
from inference.radiograph.model import SpineInstances, VertebraModel
from inference.registry import ModelSpec
from inference.results import LEVELS
from inference.splits import VERTEBRA_LEGACY_SCHEME, scheme_of
from inference.train import cadma, common

log = logging.getLogger("inference.evaluate.vertebrae")
S1_CODE = LEVELS.index("S1") + 1
L5 = LEVELS.index("L5")
LOPO_PAIRS = (("ts-abdomen", "dd-chest"), ("dd-chest", "ts-abdomen"))
HOLDOUT_SEED = 7919  # never used for a training cache
STRUCTURELESS_COUNT = 40


def radiograph_from_array(
    pixels: np.ndarray, spacing: tuple[float, float] | None, view: str | None, anterior_sign: int | None
) -> preprocess.Radiograph:
    """A canonical `Radiograph` for an image that is not DICOM (JPEG exports, synthetic samples)."""
    return preprocess.Radiograph(
        pixels=np.asarray(pixels, dtype=np.float32),
        pixel_spacing_mm=spacing,
        spacing_source="ImagerPixelSpacing" if spacing else "none",
        view=view,
        anterior_sign=anterior_sign,
        orientation=preprocess.Orientation(),
        stored_shape=tuple(pixels.shape),
    )


def instance_boxes(spine: SpineInstances) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(centroids (n, 2) x/y, boxes (n, 4) x0/y0/x1/y1, levels) of the vertebrae (not the sacrum)."""
    cents, boxes, levels = [], [], []
    for v in spine.vertebrae:
        rows, cols = np.nonzero(v.mask)
        cents.append(v.centroid)
        boxes.append((cols.min() + v.offset[1], rows.min() + v.offset[0], cols.max() + 1 + v.offset[1], rows.max() + 1 + v.offset[0]))
        levels.append(v.level)
    return np.array(cents, float).reshape(-1, 2), np.array(boxes, float).reshape(-1, 4), levels


# ------------------------------------------------------------------------------------------- real


class MidlineBaseline(TypedDict, total=False):
    """The tuned midline baseline (`tune_midline`; not total: the search starts from an empty one)."""

    count: int
    top: float
    bottom: float
    width: float


def tune_midline(items: list[cadma.RealRadiograph], shapes: list[tuple[int, int]]) -> MidlineBaseline:
    """Best evenly-spaced-midline baseline on the TRAIN split (count, top, bottom, box width)."""
    best: tuple[float, MidlineBaseline] = (-1.0, {})
    for count in (14, 15, 16, 17, 18):
        for top in (0.05, 0.1, 0.15, 0.2, 0.25):
            for bottom in (0.7, 0.75, 0.8, 0.85, 0.9):
                c = M.DetectionCounts()
                for item, shape in zip(items, shapes, strict=True):
                    tp, fp, fn, _ = M.match_centroids_in_boxes(M.midline_points(shape, count, top, bottom), item.boxes)
                    c.add(tp, fp, fn)
                if c.f1 > best[0]:
                    best = (c.f1, {"count": count, "top": top, "bottom": bottom})
    params = best[1]
    best_w = (-1.0, 0.16)
    for width in (0.1, 0.13, 0.16, 0.2, 0.25):
        c = M.DetectionCounts()
        for item, shape in zip(items, shapes, strict=True):
            tp, fp, fn, _ = M.match_boxes(M.midline_boxes(shape, params["count"], params["top"], params["bottom"], width), item.boxes)
            c.add(tp, fp, fn)
        if c.f1 > best_w[0]:
            best_w = (c.f1, width)
    params["width"] = best_w[1]
    return params


def evaluate_real(model: VertebraModel, data: Path, overlays: Path | None, limit: int | None = None,
                  meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Detection and naming on the real test split the model's training held out (the scheme its model.json
    `meta` names), with the tuned midline baseline."""
    items = cadma.load_cadma(data)
    by_split = cadma.split(items, scheme_of(meta, VERTEBRA_LEGACY_SCHEME))
    test = by_split["test"][:limit] if limit else by_split["test"]
    train = by_split["train"]
    train_shapes = [_shape(i) for i in train]
    base = tune_midline(train, train_shapes)
    log.info("midline baseline tuned on %d train images: %s", len(train), base)
    centroid, iou, base_pts, base_boxes = (M.DetectionCounts() for _ in range(4))
    labelled_region = M.DetectionCounts()
    names: Counter[str] = Counter()
    names_base: Counter[str] = Counter()
    times = []
    per_image: list[dict[str, Any]] = []
    for n, item in enumerate(test):
        pixels = item.load()
        t0 = time.perf_counter()
        spine = model.analyse(radiograph_from_array(pixels, None, "AP", None))
        times.append(time.perf_counter() - t0)
        cents, boxes, levels = instance_boxes(spine)
        tp, fp, fn, pairs = M.match_centroids_in_boxes(cents, item.boxes)
        centroid.add(tp, fp, fn)
        tpi, fpi, fni, _ = M.match_boxes(boxes, item.boxes, 0.3)
        iou.add(tpi, fpi, fni)
        # Predictions above the top box lie where this export does not label (cervical spine).
        top_edge = item.boxes[:, 1].min() if len(item.boxes) else 0
        keep = cents[:, 1] >= top_edge if len(cents) else np.zeros(0, bool)
        tpl, fpl, fnl, _ = M.match_centroids_in_boxes(cents[keep], item.boxes)
        labelled_region.add(tpl, fpl, fnl)
        shape = pixels.shape
        tpb, fpb, fnb, _ = M.match_centroids_in_boxes(M.midline_points(shape, base["count"], base["top"], base["bottom"]), item.boxes)
        base_pts.add(tpb, fpb, fnb)
        base_counts = (tpb, fpb, fnb)
        tpb, fpb, fnb, _ = M.match_boxes(M.midline_boxes(shape, base["count"], base["top"], base["bottom"], base["width"]), item.boxes, 0.3)
        base_boxes.add(tpb, fpb, fnb)
        n_boxes = len(item.boxes)
        named = sum(1 for lv in levels if lv)
        for p, g in pairs:
            assumed = LEVELS[L5 - (n_boxes - 1 - g)] if L5 - (n_boxes - 1 - g) >= 0 else None
            if levels[p] is None:
                names["unnamed"] += 1
            elif levels[p] == assumed:
                names["correct"] += 1
            else:
                names["wrong"] += 1
            # Baseline: the lowest detection is L5, count up (vertebrae are ordered head to foot).
            guess = L5 - (len(levels) - 1 - p)
            names_base["correct" if guess >= 0 and LEVELS[guess] == assumed else "wrong"] += 1
        per_image.append({"key": item.key, "tp": tp, "fp": fp, "fn": fn, "named": named, "sacrum": spine.sacrum is not None,
                          "baseline": base_counts})
        if overlays is not None and n < 40:
            _overlay(pixels, item.boxes, spine, overlays / f"real_{n:02d}_{item.key}.png")
    named_total = names["correct"] + names["wrong"]
    return {
        "images": len(test),
        "vertebrae": int(sum(len(i.boxes) for i in test)),
        "centroid_in_box": centroid.as_dict(),
        "centroid_in_box_labelled_region": labelled_region.as_dict(),
        "box_iou_0.3": iou.as_dict(),
        "baseline_midline_points": base_pts.as_dict(),
        "baseline_midline_boxes": base_boxes.as_dict(),
        "baseline_parameters": base,
        "naming_assuming_lowest_box_is_L5": {
            "matched": int(sum(names.values())),
            "named_fraction": _r(named_total / max(1, sum(names.values()))),
            "accuracy_of_named": _r(names["correct"] / named_total) if named_total else None,
            "wrong_names": int(names["wrong"]),
            "images_named": int(sum(1 for p in per_image if p["named"])),
            "baseline_lowest_is_L5_accuracy": _r(names_base["correct"] / max(1, sum(names_base.values()))),
            "images_with_sacrum_found": int(sum(1 for p in per_image if p["sacrum"])),
        },
        "centroid_in_box_f1_ci95": M.f1_interval([(p["tp"], p["fp"], p["fn"]) for p in per_image]),
        "patient_disjoint": _patient_disjoint(per_image, items, meta or {}),
        "seconds_per_image_mean": _r(float(np.mean(times))),
        "seconds_per_image_p95": _r(float(np.percentile(times, 95))),
        "worst_images": [{k: v for k, v in p.items() if k != "baseline"}
                         for p in sorted(per_image, key=lambda p: -(p["fp"] + p["fn"]))[:8]],
    }


def _patient_disjoint(per_image: list[dict[str, Any]], items: list[cadma.RealRadiograph], meta: dict[str, Any]) -> dict[str, Any]:
    """The test films the model never learnt from, for any film of their patient: the split hashes film
    names (two films of one patient can straddle it), and the synthetic cache drew implants onto real films
    by another split (`inference.splits`)."""
    from inference import splits

    keep = set(splits.patient_disjoint([p["key"] for p in per_image], splits.vertebra_seen([i.path.name for i in items], meta)))
    chosen = [p for p in per_image if p["key"] in keep]
    model, base = M.DetectionCounts(), M.DetectionCounts()
    for p in chosen:
        model.add(p["tp"], p["fp"], p["fn"])
        base.add(*p["baseline"])
    return {"images": len(chosen), "left_out": len(per_image) - len(chosen), "centroid_in_box": model.as_dict(),
            "centroid_in_box_f1_ci95": M.f1_interval([(p["tp"], p["fp"], p["fn"]) for p in chosen]),
            "baseline_midline_points": base.as_dict()}


def _shape(item: cadma.RealRadiograph) -> tuple[int, int]:
    from PIL import Image

    with Image.open(item.path) as im:
        return (im.size[1], im.size[0])


def _overlay(pixels: np.ndarray, boxes: np.ndarray, spine: SpineInstances, path: Path, scale: int = 2) -> None:
    """PNG: reference boxes green, predicted outlines red (sacrum blue), level names."""
    from PIL import Image, ImageDraw
    from skimage.measure import find_contours

    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    img = img.resize((img.width * scale, img.height * scale))
    draw = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in boxes:
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=(0, 220, 0))
    shapes = [(v, (255, 40, 40)) for v in spine.vertebrae]
    if spine.sacrum is not None:
        shapes.append((spine.sacrum, (60, 120, 255)))
    for v, colour in shapes:
        for contour in find_contours(np.pad(v.mask.astype(float), 1), 0.5):
            pts = [((c - 1 + 0.5 + v.offset[1]) * scale, (r - 1 + 0.5 + v.offset[0]) * scale) for r, c in contour]
            if len(pts) > 2:
                draw.line(pts + [pts[0]], fill=colour, width=1)
        draw.text((v.centroid[0] * scale + 14, v.centroid[1] * scale - 6), v.level or "?", fill=(255, 255, 0))
    img.save(path)


# -------------------------------------------------------------------------------------- synthetic


def ensure_holdout(holdout: Path, data: Path, count: int) -> Path:
    """Build the synthetic hold-out cache with the data engine if it is not there yet."""
    if (holdout / "manifest.json").is_file():
        return holdout
    from inference.synth.build import build
    from inference.synth.render import SynthConfig

    log.info("building synthetic hold-out (%d samples, seed %d) in %s", count, HOLDOUT_SEED, holdout)
    build(str(data), str(holdout), count, HOLDOUT_SEED, SynthConfig(data_dir=str(data), max_px=1024), workers=1, log=log.info)
    return holdout


#: The lateral hold-out with compression deformities (heights and grades): the data engine's arguments.
LATERAL_HOLDOUT_ARGS = ("--count", "160", "--seed", "32", "--views", "LAT", "--fracture-prob", "0.9", "--implants-prob", "0.2",
                        "--workers", "2", "--max-side", "768")
#: Leave-one-patient-out folds of the six-point stage: CT source left out (with the stitched volume, which
#: holds both patients) -> its laterals in the lateral hold-out.
LATERAL_LOPO = ("ts-abdomen", "dd-chest")


def ensure_lateral_holdout(holdout: Path, data: Path) -> Path:
    """Build the lateral hold-out with the data engine if it is not there yet."""
    if not (holdout / "manifest.json").is_file():
        from inference.synth import build

        log.info("building the lateral hold-out in %s", holdout)
        build.main(["--data", str(data), "--out", str(holdout), *LATERAL_HOLDOUT_ARGS])
    return holdout


def lateral_lopo(model_folder: Path, cache: Path, holdout: Path, work: Path, iterations: int) -> dict[str, Any]:
    """The six-point stage retrained without one CT patient (and the stitched volume), tested on that
    patient's laterals; the vertebra network stays the shipped one.  A fold is reused when its folder holds a
    stage trained with the same iterations and cache."""
    import shutil

    from inference.synth.build import iter_cache
    from inference.train import endplates as train_endplates

    results = {}
    for test_src in LATERAL_LOPO:
        folder = work / f"endplates-without-{test_src}"
        meta_path = folder / "model.json"
        done = meta_path.is_file() and (json.loads(meta_path.read_text()).get("training", {}).get("endplates") or {})
        if not done or done.get("iterations") != iterations or done.get("cache") != str(cache):
            if folder.exists():
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            shutil.copy(model_folder / "model.json", folder / "model.json")
            shutil.copy(model_folder / "weights.pt", folder / "weights.pt")
            train_endplates.add_stage(folder, cache, 10, iterations, 1, f"lateral LOPO fold without {test_src}",
                                      {test_src, "stitched"}, folder)
        model = VertebraModel.from_spec(ModelSpec.read(folder))
        samples = (s for s in iter_cache(holdout) if (s.meta or {}).get("source") == test_src)
        res = evaluate_synthetic(model, samples, f"six-point stage trained without {test_src}, tested on its laterals")
        ep = json.loads(meta_path.read_text())["training"]["endplates"]
        res["training"] = f"{ep['iterations']} iterations, {ep['bodies']['train']} bodies, {ep['minutes']} min"
        results[f"test_{test_src}"] = res
    return results


def _anterior_sign(meta: dict) -> int | None:
    orient = meta.get("patient_orientation") or []
    return {"A": 1, "P": -1}.get(str(orient[0])[:1]) if orient else None


def sample_record(model: VertebraModel, sample: Any) -> dict[str, Any]:
    """Everything measured on one synthetic sample (aggregated by `aggregate`)."""
    from inference.radiograph import endplates, morphometry
    from inference.train.vertebrae import prepare_synth, visibility

    meta = sample.meta or {}
    rec: dict[str, Any] = {"view": sample.view, "source": str(meta.get("source")), "visibility": visibility(prepare_synth(sample))}
    sign = _anterior_sign(meta) if sample.view == "LAT" else None
    rad = radiograph_from_array(sample.image, tuple(sample.pixel_spacing_mm), sample.view, sign)
    spine = model.analyse(rad)
    if sample.view == "LAT":
        # How often the posterior-element rule alone gets the anterior side right.
        blind = model.analyse(radiograph_from_array(sample.image, tuple(sample.pixel_spacing_mm), "LAT", None))
        rec["anterior"] = "right" if blind.anterior_sign == sign else ("unknown" if blind.anterior_sign is None else "wrong")
    body = sample.body
    known = body != -1
    gt_body = ((body >= 1) & (body != S1_CODE)) & known
    gt_sac = (body == S1_CODE) | (sample.vertebra == S1_CODE)
    pred_body = np.zeros(body.shape, bool)
    for v in spine.vertebrae:
        pred_body[v.offset[0] : v.offset[0] + v.mask.shape[0], v.offset[1] : v.offset[1] + v.mask.shape[1]] |= v.mask
    pred_sac = np.zeros(body.shape, bool)
    if spine.sacrum is not None:
        sc = spine.sacrum
        pred_sac[sc.offset[0] : sc.offset[0] + sc.mask.shape[0], sc.offset[1] : sc.offset[1] + sc.mask.shape[1]] |= sc.mask
    pb = pred_body & known
    rec["body_i"], rec["body_s"] = 2 * float((pb & gt_body).sum()), float(pb.sum() + gt_body.sum())
    rec["sac_i"], rec["sac_s"] = 2 * float((pred_sac & gt_sac).sum()), float(pred_sac.sum() + gt_sac.sum())
    rec["dice_body"] = M.dice(pb, gt_body) if gt_body.any() else None
    rec["dice_sacrum"] = M.dice(pred_sac, gt_sac) if gt_sac.any() else None

    # Detection: a predicted centroid inside a visible body of the truth (one prediction per level).
    truth = {v.level: v for v in sample.vertebrae if v.level and v.level != "S1"}
    codes_present = {LEVELS[c - 1] for c in np.unique(body) if 1 <= c < S1_CODE}
    countable = {lv for lv, v in truth.items() if v.visible_fraction >= 0.5 and lv in codes_present}
    matched: dict[int, str] = {}
    for k, v in enumerate(spine.vertebrae):
        r = int(np.clip(v.centroid[1] - 0.5, 0, body.shape[0] - 1))
        c = int(np.clip(v.centroid[0] - 0.5, 0, body.shape[1] - 1))
        code = int(body[r, c])
        if 1 <= code < S1_CODE and LEVELS[code - 1] not in matched.values():
            matched[k] = LEVELS[code - 1]
    tp = sum(1 for lv in matched.values() if lv in countable)
    ignored = sum(1 for lv in matched.values() if lv not in countable)
    rec["det"] = (tp, len(spine.vertebrae) - tp - ignored, len(countable) - tp)
    # Naming, and the trivial "lowest detection is L5" rule as its baseline.
    naming: Counter[str] = Counter()
    naming_base: Counter[str] = Counter()
    ordered = sorted(range(len(spine.vertebrae)), key=lambda k: spine.vertebrae[k].centroid[1])
    for rank, k in enumerate(ordered):
        if k not in matched:
            continue
        true_level = matched[k]
        pred = spine.vertebrae[k].level
        naming["unnamed" if pred is None else ("correct" if pred == true_level else "wrong")] += 1
        guess = L5 - (len(ordered) - 1 - rank)
        naming_base["correct" if guess >= 0 and LEVELS[guess] == true_level else "wrong"] += 1
    rec["naming"], rec["naming_base"] = naming, naming_base
    rec["dice_inst"] = []
    for k, true_level in matched.items():
        v = spine.vertebrae[k]
        pm = np.zeros(body.shape, bool)
        pm[v.offset[0] : v.offset[0] + v.mask.shape[0], v.offset[1] : v.offset[1] + v.mask.shape[1]] = v.mask
        rec["dice_inst"].append(M.dice(pm, body == LEVELS.index(true_level) + 1))

    # Heights and grades on laterals (the header's anterior side, as a DICOM lateral would give it), by the
    # model's method (six endplate points when it has the stage) and by body silhouettes for comparison.
    rec["heights"], rec["grades"], rec["heights_silhouette"], rec["grades_silhouette"] = [], [], [], []
    if sample.view == "LAT" and sign is not None:
        from inference.radiograph.analysis import chain_heights

        methods = [("", model.endplates)] + ([("_silhouette", None)] if model.endplates is not None else [])
        for suffix, net in methods:
            hs = chain_heights(net, rad, spine.vertebrae, sign)
            measured = [_all_three(h.values()) if h else None for h in hs]
            grades = morphometry.grade_fractures(measured)
            for k, true_level in matched.items():
                spec = truth.get(true_level)
                if spec is None or spec.visible_fraction < 0.99:
                    continue
                heights, assessed = measured[k], grades[k]
                if spec.heights_mm is not None and heights is not None:
                    rec["heights" + suffix].append((true_level, tuple(spec.heights_mm), tuple(heights)))
                if spec.grade is not None and assessed is not None:
                    rec["grades" + suffix].append((int(spec.grade), int(assessed.grade), spec.shape.value, assessed.shape.value))
        if model.endplates is not None:
            # The stage's own reading of the anterior side (no header), over the whole chain.
            placed = endplates.place_points(model.endplates, rad.pixels, [b.centroid for b in spine.vertebrae])
            if placed:
                high = endplates.anterior_is_high(placed, None)[0]
                guess = 1 if (placed[0].frame.across[0] >= 0) == high else -1
                rec["anterior_six_point"] = "right" if guess == sign else "wrong"
    return rec


def _all_three(values: tuple[float | None, float | None, float | None]) -> tuple[float, float, float] | None:
    """(anterior, middle, posterior) heights when all three were measured, else None."""
    anterior, middle, posterior = values
    return (anterior, middle, posterior) if anterior is not None and middle is not None and posterior is not None else None


def aggregate(records: list[dict[str, Any]], label: str) -> dict[str, Any]:
    """Metrics over a set of `sample_record`s."""
    det = M.DetectionCounts()
    naming: Counter[str] = Counter()
    naming_base: Counter[str] = Counter()
    anterior: Counter[str] = Counter()
    inter: defaultdict[str, float] = defaultdict(float)
    for r in records:
        det.add(*r["det"])
        naming.update(r["naming"])
        naming_base.update(r["naming_base"])
        if "anterior" in r:
            anterior[r["anterior"]] += 1
        for k in ("body_i", "body_s", "sac_i", "sac_s"):
            inter[k] += r[k]
    dice_body = [r["dice_body"] for r in records if r["dice_body"] is not None]
    dice_sac = [r["dice_sacrum"] for r in records if r["dice_sacrum"] is not None]
    dice_inst = [d for r in records for d in r["dice_inst"]]
    named_total = naming["correct"] + naming["wrong"]
    out: dict[str, Any] = {
        "set": label,
        "samples": len(records),
        "views": dict(Counter(r["view"] for r in records)),
        "sources": dict(Counter(r["source"] for r in records)),
        "dice_body_pooled": _r(inter["body_i"] / inter["body_s"]) if inter["body_s"] else None,
        "dice_body_mean": _r(float(np.nanmean(dice_body))) if dice_body else None,
        "dice_sacrum_pooled": _r(inter["sac_i"] / inter["sac_s"]) if inter["sac_s"] else None,
        "dice_sacrum_mean": _r(float(np.nanmean(dice_sac))) if dice_sac else None,
        "dice_per_vertebra_mean": _r(float(np.nanmean(dice_inst))) if dice_inst else None,
        "detection": det.as_dict(),
        "naming": {
            "matched": int(sum(naming.values())),
            "named_fraction": _r(named_total / max(1, sum(naming.values()))),
            "accuracy_of_named": _r(naming["correct"] / named_total) if named_total else None,
            "wrong_names": int(naming["wrong"]),
            "baseline_lowest_is_L5_accuracy": _r(naming_base["correct"] / max(1, sum(naming_base.values()))),
            "by_source": _naming_by_source(records),
        },
        "anterior_side_from_image": dict(anterior),
    }
    for suffix in ("", "_silhouette"):
        heights = [h for r in records for h in r.get("heights" + suffix, [])]
        if heights:
            out["heights_mm" + suffix] = _height_metrics(heights)
        grades = [g for r in records for g in r.get("grades" + suffix, [])]
        if grades:
            out["grades" + suffix] = _grade_metrics(grades)
    six = Counter(r["anterior_six_point"] for r in records if "anterior_six_point" in r)
    if six:
        out["anterior_side_six_point"] = dict(six)
    return out


def _height_metrics(heights: list[tuple[str, tuple[float, ...], tuple[float, ...]]]) -> dict[str, Any]:
    """Errors (mm) of measured against true (anterior, middle, posterior) heights, beside the per-level mean."""
    names = ("anterior", "middle", "posterior")
    err = {n: np.array([p[i] - t[i] for _, t, p in heights]) for i, n in enumerate(names)}
    truth = {n: [(lv, "", t[i], p[i]) for lv, t, p in heights] for i, n in enumerate(names)}
    return {
        "pairs": len(heights),
        "mae": {n: _r(float(np.abs(e).mean())) for n, e in err.items()},
        "median_abs": {n: _r(float(np.median(np.abs(e)))) for n, e in err.items()},
        "bias": {n: _r(float(e.mean())) for n, e in err.items()},
        "baseline_level_mean_mae": _level_mean_baseline(truth),
    }


def _grade_metrics(grades: list[tuple[int, int, str, str]]) -> dict[str, Any]:
    """Genant grade agreement: kappa, confusion, fracture (grade >= 1) sensitivity / specificity, shape."""
    gt = np.array([g[0] for g in grades])
    gp = np.array([g[1] for g in grades])
    conf = np.zeros((4, 4), int)
    for g in grades:
        conf[g[0], g[1]] += 1
    frac_t, frac_p = gt > 0, gp > 0
    both = [(ts, ps) for t, p, ts, ps in grades if t > 0 and p > 0]
    moderate_t, moderate_p = gt >= 2, gp >= 2
    return {
        "pairs": len(grades),
        "kappa": _r(M.cohen_kappa(gt, gp)),
        "kappa_linear": _r(M.cohen_kappa(gt, gp, weights="linear")),
        "confusion_true_rows_pred_cols": conf.tolist(),
        "fracture_sensitivity": _r(float((frac_p & frac_t).sum() / frac_t.sum())) if frac_t.any() else None,
        "fracture_specificity": _r(float((~frac_p & ~frac_t).sum() / (~frac_t).sum())) if (~frac_t).any() else None,
        "moderate_or_severe_sensitivity": _r(float((moderate_p & moderate_t).sum() / moderate_t.sum())) if moderate_t.any() else None,
        "moderate_or_severe_false_positive_rate": _r(float((moderate_p & ~frac_t).sum() / (~frac_t).sum())) if (~frac_t).any() else None,
        "shape_agreement_on_found_fractures": _r(float(np.mean([a == b for a, b in both]))) if both else None,
        "baseline_all_normal": {"kappa": 0.0, "accuracy": _r(float((gt == 0).mean()))},
        "accuracy": _r(float((gt == gp).mean())),
    }


def _naming_by_source(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Naming per anatomy source: real CT anatomy and procedural phantoms fail differently."""
    per: dict[str, Counter] = defaultdict(Counter)
    for r in records:
        per[r["source"]].update(r["naming"])
    out = {}
    for source, c in sorted(per.items()):
        named = c["correct"] + c["wrong"]
        out[source] = {
            "matched": int(sum(c.values())),
            "named": int(named),
            "accuracy_of_named": _r(c["correct"] / named) if named else None,
        }
    return out


def evaluate_synthetic(model: VertebraModel, samples: Iterable, label: str, min_visibility: float | None = None) -> dict[str, Any]:
    """Metrics on synthetic samples: on those whose vertebrae are visible (the main numbers) and on all."""
    from inference.train.vertebrae import MIN_VISIBILITY

    threshold = MIN_VISIBILITY if min_visibility is None else min_visibility
    records = [sample_record(model, s) for s in samples]
    visible = [r for r in records if r["visibility"] >= threshold]
    out = aggregate(visible, f"{label}, vertebrae visible (contrast >= {threshold})")
    out["all_samples"] = aggregate(records, f"{label}, all samples")
    out["not_visible"] = dict(Counter(f"{r['view']} {r['source']}" for r in records if not r["visibility"] >= threshold))
    return out


def _level_mean_baseline(truth: dict[str, list[tuple[str, str, float, float]]]) -> dict[str, float | None]:
    """MAE of predicting each height as the mean true height of that level (leave-one-out)."""
    out = {}
    for name, rows in truth.items():
        by_level: dict[str, list[float]] = defaultdict(list)
        for level, _, t, _ in rows:
            by_level[level].append(t)
        errs = []
        for level, _, t, _ in rows:
            others = by_level[level]
            if len(others) < 2:
                continue
            mean_others = (sum(others) - t) / (len(others) - 1)
            errs.append(abs(mean_others - t))
        out[name] = _r(float(np.mean(errs))) if errs else None
    return out


def _r(v: float | None, digits: int = 4) -> float | None:
    if v is None or not np.isfinite(v):
        return None
    return round(float(v), digits)


# ------------------------------------------------------------------------------------------- LOPO


def naming_switched_on(model: VertebraModel) -> VertebraModel:
    """The model with its level naming rule on (in place): every evaluation measures the rule even when the model
    ships with it off, since its numbers are the reason it is off (and what switching it on would do)."""
    model.params = dataclasses.replace(model.params, name_levels=True)
    return model


def lopo(data: Path, cache: Path | None, holdout: Path, work: Path, iterations: int, limit: int, max_minutes: float = 30.0) -> dict[str, Any]:
    """Leave-one-patient-out: retrain without one CT (real + other CT + phantoms), test on that CT."""
    from inference.synth.build import iter_cache
    from inference.train import vertebrae as train

    results = {}
    for train_src, test_src in LOPO_PAIRS:
        folder = work / f"without-{test_src}"
        if not (folder / "weights.pt").is_file():
            if cache is None:
                raise SystemExit("--cache (the training cache) is needed to train the leave-one-patient-out models")
            train.main(
                [
                    "--data", str(data), "--cache", str(cache), "--out", str(folder), "--work", str(folder / "work"),
                    "--iterations", str(iterations), "--eval-every", str(max(100, iterations // 4)),
                    "--synth-sources", f"{train_src},phantom", "--max-minutes", str(max_minutes),
                ]
            )
        spec = ModelSpec.read(folder)
        model = naming_switched_on(VertebraModel.from_spec(spec))
        training = {k: spec.metadata.get("training", {}).get(k) for k in ("iterations", "wall_minutes", "stop")}
        # The unseen patient, and as the control the patient the fold trained on (same short recipe): the gap
        # between the two is the patient effect, not the shorter training.
        for label, source in ((f"test_{test_src}", test_src), (f"control_{train_src}", train_src)):
            samples = (s for s in iter_cache(holdout) if (s.meta or {}).get("source") == source)
            what = f"trained without {test_src}, tested on {source}" + (" (seen in training: control)" if source == train_src else "")
            res = evaluate_synthetic(model, _take(samples, limit), what)
            res["training"] = training
            results[label] = res
    return results


def evaluate_structureless(model: VertebraModel, count: int = STRUCTURELESS_COUNT, seed: int | None = None) -> dict[str, Any]:
    """Vertebrae the model reports on images without anatomy (`inference.synth.negatives`; the right answer is
    none), per kind. The node's own gate for images without contrast is not in this path: it measures the model."""
    from inference.synth.negatives import EVALUATION_SEED, structureless_set

    seed = EVALUATION_SEED if seed is None else seed
    by_kind: dict[str, list[int]] = {}
    for image in structureless_set(count, seed):
        spine = model.analyse(radiograph_from_array(image.pixels, image.spacing_mm, None, None))
        by_kind.setdefault(image.kind, []).append(len(spine.vertebrae))

    def row(found: list[int]) -> dict[str, Any]:
        return {"images": len(found), "images_with_vertebrae": sum(1 for f in found if f),
                "vertebrae_mean": _r(float(np.mean(found)), 2), "vertebrae_max": max(found)}

    return {"seed": seed, **row([f for found in by_kind.values() for f in found]),
            "by_kind": {kind: row(found) for kind, found in by_kind.items()}}


def _take(it: Iterable, n: int) -> Iterable:
    for k, x in enumerate(it):
        if k >= n:
            break
        yield x


# ---------------------------------------------------------------------------------------- card


def write_card(folder: Path, meta: dict[str, Any], m: dict[str, Any]) -> None:
    """MODEL_CARD.md from model.json metadata, metrics and the hand-written notes beside this module."""
    from inference.evaluate.card import render_card

    (folder / "MODEL_CARD.md").write_text(render_card(meta, m))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.evaluate.vertebrae", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("../cache/synth-v1"), help="training cache (for the LOPO retraining)")
    ap.add_argument("--holdout", type=Path, default=Path("../cache/synth-holdout-v1"))
    ap.add_argument("--holdout-count", type=int, default=240)
    ap.add_argument("--lopo-work", type=Path, default=Path("../cache/lopo-vertebrae"))
    ap.add_argument("--lopo-iterations", type=int, default=1400, help="per fold, from random weights (800 left the centre heatmap unlearnt: real F1 0.04 at 600)")
    ap.add_argument("--lopo-limit", type=int, default=120)
    ap.add_argument("--lopo-max-minutes", type=float, default=28.0, help="training budget of each fold")
    ap.add_argument("--skip-lopo", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--lateral-holdout", type=Path, default=Path("../cache/synth-lat-holdout"), help="laterals with deformities (built if missing)")
    ap.add_argument("--lateral-cache", type=Path, default=Path("../cache/synth-lat-fractures"), help="the six-point stage's training cache (LOPO folds)")
    ap.add_argument("--lateral-lopo-iterations", type=int, default=1500)
    ap.add_argument("--skip-lateral", action="store_true")
    ap.add_argument("--skip-lateral-lopo", action="store_true")
    ap.add_argument("--overlays", type=Path, default=Path("../cache/eval-vertebrae-overlays"))
    ap.add_argument("--real-limit", type=int, default=0)
    ap.add_argument("--skip-variants", action="store_true", help="no robustness rows (real test images as DICOM, lumbar fields, implants ...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--carry-lopo-from", type=Path, default=None, metavar="MODEL_JSON",
                    help="with --skip-lopo / --skip-lateral-lopo: keep those sections from this earlier evaluation (the card says so)")
    args = ap.parse_args(argv)
    common.setup_logging()
    common.setup(0, args.threads)

    # The folder given, not whichever folder of that name the registry finds beside it (work folders
    # hold several copies of a model while it is trained).
    spec = ModelSpec.read(args.model)
    spec.verify()
    carried = None
    if args.carry_lopo_from is not None:
        from inference.evaluate.card import carry_source

        carried = carry_source(args.carry_lopo_from, spec.name, ("leave_one_patient_out", "lateral_leave_one_patient_out"))
    model = VertebraModel.from_spec(spec)
    results: dict[str, Any] = {"evaluated": time.strftime("%Y-%m-%d"), "model_version": spec.version,
                               "naming_shipped": model.params.name_levels}
    model = naming_switched_on(model)
    t0 = time.time()
    meta = json.loads((args.model / "model.json").read_text())
    results["split_scheme"] = scheme_of(meta, VERTEBRA_LEGACY_SCHEME)
    results["real_test"] = evaluate_real(model, args.data, args.overlays, args.real_limit or None, meta)
    log.info("real test: %s", json.dumps(results["real_test"], indent=1)[:2000])
    results["structureless"] = evaluate_structureless(model)
    log.info("structureless images: %s", results["structureless"])
    if not args.skip_variants:
        from inference.evaluate.real_variants import evaluate_variants

        test = cadma.split(cadma.load_cadma(args.data), results["split_scheme"])["test"]
        results["real_test_variants"] = evaluate_variants(model, test[: args.real_limit] if args.real_limit else test)
        log.info("real test variants: %s", json.dumps(results["real_test_variants"], indent=1)[:3000])
    if not args.skip_synthetic:
        from inference.synth.build import iter_cache

        holdout = ensure_holdout(args.holdout, args.data, args.holdout_count)
        results["synthetic_holdout"] = evaluate_synthetic(model, iter_cache(holdout), "synthetic hold-out")
        log.info("synthetic hold-out: %s", json.dumps(results["synthetic_holdout"], indent=1)[:3000])
        if not args.skip_lopo:
            results["leave_one_patient_out"] = lopo(args.data, args.cache, holdout, args.lopo_work, args.lopo_iterations, args.lopo_limit,
                                                   args.lopo_max_minutes)
    if not args.skip_lateral:
        from inference.synth.build import iter_cache

        lateral = ensure_lateral_holdout(args.lateral_holdout, args.data)
        results["lateral_fracture_holdout"] = evaluate_synthetic(model, iter_cache(lateral), "lateral hold-out with deformities")
        log.info("lateral hold-out: %s", json.dumps(results["lateral_fracture_holdout"], indent=1)[:3000])
        if model.endplates is not None and not args.skip_lateral_lopo:
            results["lateral_leave_one_patient_out"] = lateral_lopo(
                args.model, args.lateral_cache, lateral, args.lopo_work, args.lateral_lopo_iterations
            )
    if carried is not None:
        from inference.evaluate.card import carry_over

        # Only what this run skipped on purpose, and a lateral fold only for a model that has the stage.
        keys = (("leave_one_patient_out",) if args.skip_lopo or args.skip_synthetic else ()) + (
            ("lateral_leave_one_patient_out",) if model.endplates is not None and (args.skip_lateral_lopo or args.skip_lateral) else ())
        log.info("carried over from %s: %s", args.carry_lopo_from, carry_over(results, carried, keys))
    results["evaluation_minutes"] = round((time.time() - t0) / 60, 1)
    meta = json.loads((args.model / "model.json").read_text())
    meta["metrics"] = results
    common.write_json(args.model / "model.json", meta)
    write_card(args.model, meta, results)
    log.info("wrote %s and MODEL_CARD.md", args.model / "model.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
