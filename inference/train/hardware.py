"""Train the spinal hardware network (``make train-hardware``) on synthetic radiographs with implants,
real radiographs with implants rendered onto them, and implant-free images of both kinds.

    python -m inference.train.hardware --data ../shared/data --cache ../cache/synth-hardware-v1 \\
        --out inference/models/spine-xr-hardware [--work ../cache/train-hardware] [--iterations N]

* ``--cache``: the data engine's shards (``python -m inference.synth.build ... --implants-prob 0.7
  --real-prob 0.4``): DRRs of the CTs and phantoms with implants inserted before projection, and REAL
  radiographs (train split) with implants added in the log domain; both carry per-instance labels.
* ``--data``: the real radiographs' train split is also used as it is, as images WITHOUT implants, so
  the network learns that buttons, markers, ECG leads and text are not spinal hardware.
* Every image goes through the node's preprocessing (`inference.radiograph.hardware.prepare`); targets
  are made by `inference.radiograph.hardware_targets`.
* Batches mix implants with and without complications, implant-free synthetic images and implant-free real
  images (``--mix``).  Every 10th cache sample and the real val split are held out: checkpoint selection
  uses pixel Dice of the class and complication maps and false hardware on the real val images.  After
  training, the complication classifier is trained as its own stage (`inference.train.hardware_patches`,
  ``--patch-iterations``) and its thresholds tuned on the held-out samples (instance level, Youden's J).
* Seeds are fixed; checkpoints in ``--work`` make a killed run resume (same command).  torch uses 2
  threads; run under ``nice -n 10``.  ``--exclude-sources`` trains the leave-one-patient-out variants.
* Hard negatives (``--hard-negative-share``): part of each batch is drawn from the real train images on
  which the network itself finds implants (scoliosis-brace buckles and snaps, skin markers), mined again
  at every validation (~3.5 min a pass on one thread, counted in ``--max-minutes``).  ``--init-weights``
  starts from a trained network (fine-tuning; the run's record keeps the base run's).  Neither is in the
  shipped recipe: a fine-tune with hard negatives was measured and not shipped (see the model's notes).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from inference.radiograph import network
from inference.radiograph.hardware import (
    DEFAULT_ARCHITECTURE,
    MODEL_NAME,
    SPACING_MM,
    build_network,
    estimated_spacing,
    prepare,
)
from inference.radiograph.hardware_patches import CAGE_PATCH, PATCH_MM, ROD_PATCH, SCREW_PATCH
from inference.radiograph.hardware_post import (
    CAGE,
    CHANNELS,
    COMPLICATION_CHANNEL,
    METAL,
    PLATE,
    ROD,
    SCREW,
    SCREW_CENTRE,
    HardwareParams,
    VertebraGeom,
    find_pieces,
)
from inference.radiograph.hardware_targets import TargetItem, dense_targets, make_item
from inference.registry import sha256_file
from inference.splits import HARDWARE_LEGACY_SCHEME, SCHEMES, TRAINING_SCHEME, describe
from inference.train import common

log = logging.getLogger("inference.train.hardware")

SEG_CHANNELS = (METAL, SCREW, ROD, CAGE, PLATE)
COMP_CHANNELS = tuple(COMPLICATION_CHANNEL.values())
POOLS = ("complication", "implants", "clean", "real_negative")
#: Hard negatives are mined with instance thresholds near the tuned ones (as the false-hardware check of
#: `validate`), so the faint blobs the tuned model would drop anyway do not fill the pool.
MINING_PARAMS = HardwareParams(min_score=0.6, min_total_mm2=80.0, min_area_mm2={"pedicle screw": 30.0})


def real_negative(path: Path) -> TargetItem:
    """A real radiograph without implants, scaled from its vertebra boxes as the node scales from vertebrae."""
    from inference.synth.real import load_real

    pixels, boxes = load_real(path)
    geoms = [VertebraGeom(None, ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2), np.ones((1, 1), bool), (0, 0)) for b in boxes]
    spacing = estimated_spacing(geoms)
    image, scale = prepare(pixels, spacing)
    anchors = np.stack([(boxes[:, 1] + boxes[:, 3]) / 2 * scale[0], (boxes[:, 0] + boxes[:, 2]) / 2 * scale[1]], axis=1)
    return TargetItem(
        image=image.astype(np.float16),
        bits=np.zeros(image.shape, dtype=np.uint16),
        centres=np.zeros((0, 2), np.float32),
        view="AP",
        kind="real",
        source="cadma",
        meta={"key": path.name, "anchors": anchors},
    )


def pool_of(item: TargetItem) -> str:
    """Which sampling pool an item belongs to."""
    if item.kind == "real":
        return "real_negative"
    if item.complications:
        return "complication"
    return "implants" if item.n_implants else "clean"


def load_cache(
    cache: Path, exclude_sources: set[str], limit: int | None, val_every: int
) -> tuple[list[TargetItem], list[tuple[TargetItem, Any]], dict]:
    """Cache samples as training items, and every `val_every`-th as (item, sample) for validation."""
    from inference.synth.build import iter_cache

    train, val = [], []
    skipped = 0
    t0 = time.time()
    for k, sample in enumerate(iter_cache(cache)):
        role = common.cache_role(k, sample, exclude_sources, val_every)
        if role is None:
            skipped += 1
            continue
        item = make_item(sample)
        if role == "held_out":
            val.append((item, sample))
        else:
            train.append(item)
        if limit and len(train) >= limit:
            break
        if (len(train) + len(val)) % 250 == 0:
            log.info("cache samples prepared: %d (%.0f s)", len(train) + len(val), time.time() - t0)
    return train, val, {"skipped_sources": sorted(exclude_sources), "skipped": skipped}


def parse_pos_weight(text: str) -> dict[int, float]:
    """``"cage:5,plate:5"`` -> {channel: positive weight} for the class maps (`SEG_CHANNELS`)."""
    out: dict[int, float] = {}
    for kv in filter(None, (w.strip() for w in text.split(","))):
        name, _, value = kv.partition(":")
        ch = CHANNELS.index(name) if name in CHANNELS else -1
        if ch not in SEG_CHANNELS:
            raise ValueError(f"--pos-weight: {name!r} is not one of {[CHANNELS[c] for c in SEG_CHANNELS]}")
        out[ch] = float(value)
    return out


def loss_fn(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, pos_weight: dict[int, float] | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of per-channel losses: BCE + Dice for class and complication maps, focal loss for screw centres.

    `pos_weight` (channel -> weight) makes missed pixels of rare classes cost more: without it the cage and
    plate maps of the first model stayed near zero for the whole run (held-out Dice < 0.01)."""
    pos_weight = pos_weight or {}
    parts: dict[str, torch.Tensor] = {}
    for ch in SEG_CHANNELS + COMP_CHANNELS:
        parts[CHANNELS[ch]] = common.masked_bce_dice(logits[:, ch], target[:, ch], weight[:, ch], pos_weight.get(ch, 1.0))
    parts["screw_centre"] = common.centre_focal(logits[:, SCREW_CENTRE], target[:, SCREW_CENTRE], weight[:, SCREW_CENTRE])
    total = sum(parts[CHANNELS[ch]] for ch in SEG_CHANNELS) + 0.5 * parts["screw_centre"]
    total = total + sum(parts[CHANNELS[ch]] for ch in COMP_CHANNELS)
    return total, {k: float(v.detach()) for k, v in parts.items()}


def validate(net: torch.nn.Module, items: list[TargetItem], negatives: list[TargetItem], params: HardwareParams) -> dict[str, float]:
    """Pooled pixel Dice per class / complication map on held-out samples; false hardware on real images."""
    net.eval()
    inter = np.zeros(len(CHANNELS))
    total = np.zeros(len(CHANNELS))
    for item in items:
        prob = network.predict(net, item.image.astype(np.float32))
        target, weight = dense_targets(item)
        for ch in SEG_CHANNELS + COMP_CHANNELS:
            p = (prob[ch] >= 0.5) & (weight[ch] > 0)
            g = (target[ch] >= 0.5) & (weight[ch] > 0)
            inter[ch] += 2 * float((p & g).sum())
            total[ch] += float(p.sum() + g.sum())
    false_hw = 0
    for item in negatives:
        prob = network.predict(net, item.image.astype(np.float32))
        if find_pieces(prob, SPACING_MM, params):
            false_hw += 1
    net.train()
    out = {f"dice_{CHANNELS[ch]}": (inter[ch] / total[ch] if total[ch] else float("nan")) for ch in SEG_CHANNELS + COMP_CHANNELS}
    out["real_false_hardware_rate"] = false_hw / len(negatives) if negatives else float("nan")
    return out


def mine_hard_negatives(net: torch.nn.Module, negatives: list[TargetItem], params: HardwareParams = MINING_PARAMS) -> list[TargetItem]:
    """The implant-free real images on which `net` finds implants, each with the found pieces' centres as its
    crop anchors: a training crop is then centred on the false implant, not on any vertebra (a whole-spine
    film is three crops tall, and a buckle off the spine would rarely be in view)."""
    net.eval()
    hard = []
    for item in negatives:
        pieces = find_pieces(network.predict(net, item.image.astype(np.float32)), SPACING_MM, params)
        if pieces:
            centres = np.array([p.coords().mean(axis=0) for p in pieces], dtype=np.float32)
            hard.append(replace(item, meta={**item.meta, "anchors": centres}))
    net.train()
    return hard


def read_init_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The segmentation state dict in `path` (a model folder's weights.pt, or a bare state dict) and what is
    known of its training (the folder's model.json record, when it describes these weights: same sha256)."""
    state = network.read_stages(str(path))["segmentation"]
    record: dict[str, Any] = {"weights": str(path), "sha256": sha256_file(path)}
    # Weights copied over a model folder, or a record left from another run: its training is not theirs.
    meta = common.describing_meta(path, record["sha256"])
    if meta is None:
        log.warning("no model.json describes %s (none beside it, or another sha256): the start's training is not"
                    " recorded", path)
    else:
        training = meta.get("training", {})
        record["version"] = meta.get("version")
        keep = ("command", "iterations", "stop", "wall_minutes", "mix", "disc_classifier", "base_training")
        record["training"] = {k: training[k] for k in keep if k in training}
    return state, record


def selection_score(m: dict[str, float]) -> float:
    """What checkpoint selection maximises."""
    seg = [m[f"dice_{CHANNELS[ch]}"] for ch in SEG_CHANNELS if np.isfinite(m.get(f"dice_{CHANNELS[ch]}", np.nan))]
    comp = [m[f"dice_{CHANNELS[ch]}"] for ch in COMP_CHANNELS if np.isfinite(m.get(f"dice_{CHANNELS[ch]}", np.nan))]
    score = float(np.mean(seg)) if seg else 0.0
    if comp:
        score += 0.5 * float(np.mean(comp))
    fp = m.get("real_false_hardware_rate", float("nan"))
    if np.isfinite(fp):
        score -= 0.5 * fp
    return score


def _screw_counts(pieces: list, sample: Any, net_shape: tuple[int, int]) -> tuple[int, int, int]:
    """(tp, fp, fn) of screw pieces against the sample's screws: a piece matches a screw whose centroid it
    covers (grown by 1 px), one to one."""
    from scipy import ndimage

    from inference.results import ImplantKind

    scale = (net_shape[0] / sample.image.shape[0], net_shape[1] / sample.image.shape[1])
    centres = []
    for k, spec in enumerate(sample.implant_specs):
        if spec.kind is ImplantKind.PEDICLE_SCREW:
            rr, cc = np.nonzero(sample.implants == k + 1)
            if len(rr) >= 3:
                centres.append(((rr.mean() + 0.5) * scale[0], (cc.mean() + 0.5) * scale[1]))
    screws = [p for p in pieces if p.kind is ImplantKind.PEDICLE_SCREW]
    used: set[int] = set()
    tp = 0
    for p in screws:
        grown = ndimage.binary_dilation(np.pad(p.mask, 1))
        for j, (r, c) in enumerate(centres):
            if j in used:
                continue
            row, col = int(r - p.offset[0] + 1), int(c - p.offset[1] + 1)
            if 0 <= row < grown.shape[0] and 0 <= col < grown.shape[1] and grown[row, col]:
                used.add(j)
                tp += 1
                break
    return tp, len(screws) - tp, len(centres) - tp


def tune_postprocess(net: torch.nn.Module, val: list[tuple[TargetItem, Any]], negatives: list[TargetItem], params: HardwareParams) -> tuple[HardwareParams, dict]:
    """Grid-search the instance thresholds on held-out data (network outputs computed once): screw F1 on
    held-out samples plus "no implants" on implant-free images (real and synthetic) and "implants" where
    there are some."""
    import itertools
    from dataclasses import replace

    net.eval()
    val_probs = [(network.predict(net, it.image.astype(np.float32)), it, s) for it, s in val[:160]]
    neg_probs = [network.predict(net, it.image.astype(np.float32)) for it in negatives[:80]]
    net.train()
    grid = {
        "class_threshold": (0.5, 0.6),
        "min_score": (0.0, 0.6, 0.7, 0.8),
        "min_total_mm2": (25.0, 80.0, 150.0),
        "screw_min_area_mm2": (12.0, 30.0),
    }
    results = []
    for values in itertools.product(*grid.values()):
        v = dict(zip(grid, values, strict=True))
        trial = replace(params, class_threshold=v["class_threshold"], min_score=v["min_score"], min_total_mm2=v["min_total_mm2"],
                        min_area_mm2={**params.min_area_mm2, "pedicle screw": v["screw_min_area_mm2"]})
        tp = fp = fn = 0
        hw_hit = hw_n = clean_ok = clean_n = 0
        for prob, it, sample in val_probs:
            pieces = find_pieces(prob, SPACING_MM, trial)
            a, b, c = _screw_counts(pieces, sample, it.image.shape)
            tp, fp, fn = tp + a, fp + b, fn + c
            if it.n_implants:
                hw_n += 1
                hw_hit += bool(pieces)
            else:
                clean_n += 1
                clean_ok += not pieces
        real_ok = sum(1 for prob in neg_probs if not find_pieces(prob, SPACING_MM, trial))
        f1 = 2 * tp / max(2 * tp + fp + fn, 1)
        sens = hw_hit / max(hw_n, 1)
        spec_synth = clean_ok / max(clean_n, 1)
        spec_real = real_ok / max(len(neg_probs), 1)
        score = f1 + sens + spec_synth + spec_real
        results.append((score, v, {"screw_f1": round(f1, 4), "implant_images_found": round(sens, 4),
                                   "clean_synthetic_no_implants": round(spec_synth, 4), "real_no_implants": round(spec_real, 4)}))
    results.sort(key=lambda r: -r[0])
    best = results[0]
    v = best[1]
    chosen = replace(params, class_threshold=v["class_threshold"], min_score=v["min_score"], min_total_mm2=v["min_total_mm2"],
                     min_area_mm2={**params.min_area_mm2, "pedicle screw": v["screw_min_area_mm2"]})
    default = next(r for r in results if r[1] == {"class_threshold": 0.5, "min_score": 0.0, "min_total_mm2": 25.0, "screw_min_area_mm2": 12.0})
    report = {"chosen": v, "score": round(best[0], 4), "measured": best[2], "defaults": default[2],
              "grid": {k: list(x) for k, x in grid.items()}, "samples": len(val_probs), "real_negatives": len(neg_probs)}
    return chosen, report


def tune_thresholds(net: torch.nn.Module, val: list[tuple[TargetItem, Any]], params: HardwareParams) -> tuple[HardwareParams, dict]:
    """Per complication, the instance-score threshold with the best Youden's J on the held-out samples."""
    from dataclasses import replace

    from inference.evaluate.hardware import complication_pairs

    net.eval()
    pairs: dict[str, list[tuple[float, bool]]] = {}
    for item, sample in val:
        if not sample.implant_specs:
            continue
        prob = network.predict(net, item.image.astype(np.float32))
        for comp, score, positive in complication_pairs(prob, sample, item.image.shape, params):
            pairs.setdefault(comp, []).append((score, positive))
    net.train()
    chosen = dict(params.complication_threshold)
    report: dict[str, Any] = {}
    for comp, values in pairs.items():
        scores = np.array([v[0] for v in values])
        truth = np.array([v[1] for v in values])
        n_pos, n_neg = int(truth.sum()), int((~truth).sum())
        entry: dict[str, Any] = {"positives": n_pos, "negatives": n_neg}
        if n_pos >= 3 and n_neg >= 3:
            best = (-1.0, 0.5)
            for t in np.round(np.arange(0.1, 0.91, 0.025), 3):
                pred = scores >= t
                j = pred[truth].mean() + (~pred[~truth]).mean() - 1.0
                if j > best[0] + 1e-9:
                    best = (float(j), float(t))
            chosen[comp] = best[1]
            pred = scores >= best[1]
            entry.update({"threshold": best[1], "youden_j": round(best[0], 4), "sensitivity": round(float(pred[truth].mean()), 4), "specificity": round(float((~pred[~truth]).mean()), 4)})
        else:
            entry["threshold"] = chosen[comp]
            entry["note"] = "too few held-out instances to tune: default kept"
        report[comp] = entry
    return replace(params, complication_threshold=chosen), report


def write_model_folder(out: Path, weights: Path, info: dict, params: HardwareParams, switches_from: Path | None = None) -> dict:
    """Copy `weights` to ``out/weights.pt`` and write ``out/model.json`` (metrics left for the evaluation), with
    what `switches_from` switched off still off (`common.carry_switches`)."""
    from inference.radiograph import preprocess

    digest = sha256_file(weights)
    meta = {
        "name": MODEL_NAME,
        "version": f"1.0+{digest[:8]}",
        "task": "spinal implant segmentation (pedicle screws, rods, interbody cages, plates, other), instances, "
        "levels and sides, complication findings (screw loosening, screw breakage, rod fracture, cage subsidence) "
        "and the postoperative hardware verdict on projection radiographs",
        "weights": "weights.pt",
        "sha256": digest,
        "format": "torch: {'segmentation': U-Net state dict, 'complications': patch classifier state dict} "
        "(or the U-Net state dict alone)",
        "architecture": {**DEFAULT_ARCHITECTURE, "patch_width": 16,
                         "patches": {"mm_per_pixel": PATCH_MM, "screw": list(SCREW_PATCH), "rod": list(ROD_PATCH), "cage": list(CAGE_PATCH)}},
        "parameters": info.get("parameters"),
        "inputs": {
            "image": "one projection radiograph (DX/CR), any size, MONOCHROME1/2, 8-16 bit",
            "preprocessing": {
                "network_spacing_mm": SPACING_MM,
                "uncalibrated": "scale estimated from the vertebral step found by spine-xr-vertebrae (30 mm assumed), else "
                f"a {preprocess.UNCALIBRATED_LONG_SIDE * preprocess.TARGET_SPACING_MM / SPACING_MM:.0f} px long side",
                "max_network_side": preprocess.MAX_NETWORK_SIDE,
                "normalisation": "as spine-xr-vertebrae: percentile 1-99.5 to [0,1], CLAHE",
            },
            "needs": "the vertebrae found by spine-xr-vertebrae on the same image (levels); PatientOrientation (sides)",
        },
        "outputs": {name: "sigmoid probability map" for name in CHANNELS},
        "postprocess": params.as_dict(),
        "training": info,
        "metrics": {},
    }
    common.write_model_files(out, weights, meta, switches_from)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.train.hardware", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="shared data folder (radiographs/cadma_train)")
    ap.add_argument("--cache", type=Path, required=True, help="data-engine cache with implants (.npz shards)")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--work", type=Path, default=Path("../cache/train-hardware"), help="checkpoints and log")
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=100.0, help="stop the loop (keeping the best checkpoint) after this")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--mix", default="complication:0.3,implants:0.35,clean:0.12,real_negative:0.23", help="batch pools and weights")
    ap.add_argument("--exclude-sources", default="", help="comma list of CT sources left out (leave-one-patient-out)")
    ap.add_argument("--no-real-negatives", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="at most this many training samples from the cache")
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--crop", default="224,192")
    ap.add_argument("--pos-weight", default="", help="positive BCE weight of rare class maps, e.g. cage:5,plate:5")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --work")
    ap.add_argument("--patch-iterations", type=int, default=3000, help="complication classifier iterations (0: use the maps)")
    ap.add_argument("--found-rods", action="store_true", help="complication classifier: also windows along the rods the "
                    "segmentation finds (`inference.train.hardware_patches`)")
    ap.add_argument("--disc-iterations", type=int, default=1200, help="disc-space cage classifier iterations (0: cages from the network)")
    ap.add_argument("--tune-only", action="store_true", help="no training: tune post-processing for --work's best checkpoint, write --out")
    ap.add_argument("--init-weights", type=Path, default=None, help="start from this trained network (a model folder's "
                    "weights.pt): fine-tuning; its training record is kept as the base")
    ap.add_argument("--hard-negative-share", type=float, default=0.0, help="share of each batch drawn from real train images "
                    "on which the network finds implants (mined at the start with --init-weights or on resuming, and at every "
                    "validation: ~3.5 min a pass on one thread, counted in --max-minutes)")
    ap.add_argument("--split-scheme", default=None, choices=sorted(SCHEMES),
                    help=f"split of the real films (inference.splits; default {TRAINING_SCHEME}, or the scheme of the "
                         "checkpoint or --init-weights model the run continues); the cache must draw on its train films")
    ap.add_argument("--not-assessed", default="", help="comma list of complications the model will never report (model.json "
                    "postprocess.not_assessed), e.g. 'screw loosening,screw breakage'")
    ap.add_argument("--switches-from", default=None, help=common.SWITCHES_HELP)
    args = ap.parse_args(argv)
    try:
        pos_weight = parse_pos_weight(args.pos_weight)
        not_assessed = tuple(c.strip() for c in args.not_assessed.split(",") if c.strip())
        HardwareParams(not_assessed=not_assessed)  # an unknown name fails now, not after the training
    except ValueError as exc:
        ap.error(str(exc))
    if not 0.0 <= args.hard_negative_share < 1.0:
        ap.error("--hard-negative-share must lie in [0, 1)")
    switches_from = common.switches_source(args.switches_from, args.out, MODEL_NAME)
    if args.init_weights is not None and not args.init_weights.is_file():
        ap.error(f"--init-weights: {args.init_weights} not found")
    if args.hard_negative_share and args.no_real_negatives:
        ap.error("--hard-negative-share needs the real radiographs (drop --no-real-negatives)")

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    args.split_scheme = common.split_scheme(args.split_scheme, work=work, fresh=args.fresh, init_weights=args.init_weights,
                                            legacy=HARDWARE_LEGACY_SCHEME)
    common.setup_logging(work / "train.log")
    common.setup(args.seed, args.threads)
    log.info("arguments: %s", vars(args))
    t_start = time.time()

    # ---------------------------------------------------------------- data
    if not (args.cache / "manifest.json").is_file():
        raise SystemExit(
            f"{args.cache}/manifest.json not found: build the cache first, e.g.\n  nice -n 10 python -m inference.synth.build "
            f"--data {args.data} --out {args.cache} --count 2400 --seed 7 --implants-prob 0.7 --real-prob 0.4 --workers 2"
        )
    common.check_cache_scheme(args.cache, args.split_scheme)
    excluded = {s for s in args.exclude_sources.split(",") if s}
    train, val, skipped = load_cache(args.cache, excluded, args.limit or None, args.val_every)
    log.info("cache: %d train, %d held-out samples (%.0f s); %s", len(train), len(val), time.time() - t_start, skipped)
    neg_train: list[TargetItem] = []
    neg_val: list[TargetItem] = []
    if not args.no_real_negatives:
        from inference.synth.real import list_real_images

        # The run's split, the cache's too (its overlays use only "train" films): "test" stays unseen.
        neg_train = [real_negative(p) for p in list_real_images(args.data, "train", scheme=args.split_scheme)]
        neg_val = [real_negative(p) for p in list_real_images(args.data, "val", scheme=args.split_scheme)]
        log.info("real radiographs without implants: %d train, %d val", len(neg_train), len(neg_val))
    pools: dict[str, list[TargetItem]] = {p: [] for p in POOLS}
    for item in train + neg_train:
        pools[pool_of(item)].append(item)
    mix = {k: float(v) for k, v in (kv.split(":") for kv in args.mix.split(","))}
    mix = {k: w for k, w in mix.items() if pools.get(k)}
    names = sorted(mix)
    probs = np.array([mix[k] for k in names])
    probs = probs / probs.sum()
    log.info("pools: %s; mix %s", {k: len(v) for k, v in pools.items()}, dict(zip(names, probs.round(3).tolist(), strict=True)))
    val_items = [it for it, _ in val]
    val_quick = val_items[:: max(1, len(val_items) // 80)][:80]

    # ---------------------------------------------------------------- model
    net = build_network()
    base_record: dict[str, Any] | None = None
    if args.init_weights is not None:
        init_state, base_record = read_init_weights(args.init_weights)
        net.load_state_dict(init_state)
        log.info("fine-tuning from %s (%s)", args.init_weights, base_record.get("version"))
    else:
        with torch.no_grad():
            # Implant pixels are rare: start every map near "nothing here" (p ~ 0.02), as CenterNet does for
            # its heatmaps; otherwise the focal loss of crops without screws dwarfs everything at the start.
            # cast: Module.__getattr__ is typed Tensor | Module; BasicUNet's final_conv is a Conv2d with a bias.
            final_bias = cast(torch.nn.Conv2d, net.final_conv).bias
            assert final_bias is not None
            final_bias.fill_(-4.0)
    n_params = network.parameter_count(net)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    step, best, spent = 0, -1e9, 0.0
    history: list[dict] = []
    ckpt_path, best_path = work / "checkpoint.pt", work / "best.pt"
    state = None if args.fresh else common.load_checkpoint(ckpt_path)
    mined: list[dict[str, int]] = []  # hard-negative minings: (iteration, images found) for the record
    if state is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["data_rng"]
        step, best, spent, history = state["step"], state["best"], state["spent"], state["history"]
        mined = state.get("mined", [])
        log.info("resumed at iteration %d (best %.4f, %.0f s spent)", step, best, spent)
    clock = common.Stopwatch(spent)
    params = HardwareParams()
    # False hardware on real images is judged with thresholds near the tuned ones, not the permissive defaults.
    strict = MINING_PARAMS
    crop_rows, crop_cols = (int(v) for v in args.crop.split(","))
    crop = (crop_rows, crop_cols)
    aug = common.AugmentConfig(crop=crop, scale=(0.8, 1.25), rotate_deg=12.0, spine_bias=0.85)
    log.info("network: %d parameters; batch %d", n_params, args.batch)

    net.train()
    # A network trained from scratch finds implants everywhere at first: mining starts at the first
    # validation, except when fine-tuning (the start network is already a detector) or resuming (the pool
    # is not in the checkpoint: it is mined again from the resumed network).
    hard: list[TargetItem] = []
    if args.hard_negative_share and (args.init_weights is not None or step > 0) and not args.tune_only and step < args.iterations:
        hard = mine_hard_negatives(net, neg_train)
        mined.append({"iteration": step, "hard": len(hard), "of": len(neg_train)})
        log.info("hard negatives at iteration %d: %d of %d real train images", step, len(hard), len(neg_train))
    t_log, losses = time.time(), []
    stop_reason = "iterations done"
    if args.tune_only:
        if state is None:
            raise SystemExit(f"--tune-only: no checkpoint in {work}")
        stop_reason = state.get("stop_reason", "loop not run here (--tune-only)")
    while step < args.iterations and not args.tune_only:
        if clock.elapsed > args.max_minutes * 60:
            stop_reason = f"time budget of {args.max_minutes} min reached"
            break
        progress = max(step / args.iterations, clock.elapsed / (args.max_minutes * 60))
        lr = common.cosine_lr(int(progress * args.iterations), args.iterations, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        xs, ts, ws = [], [], []
        for _ in range(args.batch):
            if hard and rng.random() < args.hard_negative_share:
                pool = hard
            else:
                pool = pools[names[int(rng.choice(len(names), p=probs))]]
            item = pool[int(rng.integers(len(pool)))]
            target, weight = dense_targets(item)
            anchors = item.meta.get("anchors") if item.kind == "real" else item.anchors
            x, t, w = common.augment(item.image.astype(np.float32), target, weight, rng, aug, anchors if anchors is not None and len(anchors) else None)
            xs.append(x)
            ts.append(t)
            ws.append(w)
        x, t, w = torch.stack(xs), torch.stack(ts), torch.stack(ws)
        logits = net(x)
        loss, parts = loss_fn(logits, t, w, pos_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        step += 1
        losses.append([float(loss.detach())] + [parts[CHANNELS[ch]] for ch in (METAL, SCREW, ROD, SCREW_CENTRE)])
        if step % 25 == 0:
            m = np.mean(losses, axis=0)
            log.info(
                "it %d lr %.2e loss %.3f (metal %.3f screw %.3f rod %.3f centre %.3f) %.2f s/it elapsed %.1f min",
                step, lr, *m, (time.time() - t_log) / 25, clock.elapsed / 60,
            )
            t_log, losses = time.time(), []
        if step % args.eval_every == 0 or step == args.iterations:
            metrics = validate(net, val_quick, neg_val[:40], strict)
            score = selection_score(metrics)
            history.append({"iteration": step, "score": round(score, 4), **{k: round(float(v), 4) for k, v in metrics.items()}})
            log.info("validation at %d: %s score %.4f (best %.4f)", step, {k: round(v, 3) for k, v in metrics.items()}, score, best)
            if score > best:
                best = score
                torch.save(net.state_dict(), best_path)
            if args.hard_negative_share and step < args.iterations:  # (a pass takes ~3.5 min on one thread)
                hard = mine_hard_negatives(net, neg_train)
                mined.append({"iteration": step, "hard": len(hard), "of": len(neg_train)})
                log.info("hard negatives at iteration %d: %d of %d real train images", step, len(hard), len(neg_train))
            common.save_checkpoint(
                ckpt_path, net=net.state_dict(), opt=opt.state_dict(), data_rng=rng.bit_generator.state,
                step=step, best=best, spent=clock.elapsed, history=history, stop_reason=stop_reason, mined=mined,
                split_scheme=args.split_scheme,
            )
    if not args.tune_only:
        common.save_checkpoint(
            ckpt_path, net=net.state_dict(), opt=opt.state_dict(), data_rng=rng.bit_generator.state,
            step=step, best=best, spent=clock.elapsed, history=history, stop_reason=stop_reason, mined=mined,
            split_scheme=args.split_scheme,
        )
    train_minutes = (spent if args.tune_only else clock.elapsed) / 60
    # The checkpoint kept during training and the last one compete once more, each with its tuned instance
    # thresholds: the periodic selection score is noisy (few real images, untuned thresholds).
    last_path = work / "last.pt"
    torch.save(net.state_dict(), last_path)
    if not best_path.is_file():
        torch.save(net.state_dict(), best_path)
    contest = {}
    for name, path in (("selected during training", best_path), ("last", last_path)):
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        contest[name] = (path, *tune_postprocess(net, val, neg_val, HardwareParams()))
        log.info("instance thresholds tuned for the %s checkpoint: %s", name, contest[name][2])
    chosen_name = max(contest, key=lambda k: contest[k][2]["score"])
    chosen_path, params, post_tuning = contest[chosen_name]
    post_tuning = {**post_tuning, "checkpoint": chosen_name, "scores": {k: v[2]["score"] for k, v in contest.items()}}
    net.load_state_dict(torch.load(chosen_path, map_location="cpu", weights_only=True))
    weights_file = chosen_path
    tuning: dict[str, Any]
    if args.patch_iterations:
        tuned, tuning = params, {}  # the complication classifier's stage tunes them (below)
    else:
        tuned, tuning = tune_thresholds(net, val, params)
        log.info("complication thresholds tuned on %d held-out samples: %s", len(val), tuning)
    best_entry = max(history, key=lambda h: h["score"]) if history else {}
    manifest = json.loads((args.cache / "manifest.json").read_text())
    info = {
        # shlex.join: the recipe is read back with shlex.split (leave-one-patient-out), values may hold spaces.
        "command": "python -m inference.train.hardware " + shlex.join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "iterations": step,
        "stop": stop_reason,
        "batch": args.batch,
        "crop": list(crop),
        "pos_weight": {CHANNELS[ch]: w for ch, w in pos_weight.items()},
        "mix": dict(zip(names, probs.round(3).tolist(), strict=True)),
        "hard_negatives": {"share": args.hard_negative_share, "mined": mined} if args.hard_negative_share else None,
        "base_training": base_record,
        "wall_minutes": round(train_minutes, 1),
        "threads": args.threads,
        "parameters": n_params,
        "selected_checkpoint": best_entry,
        "validation_history": history,
        "postprocess_tuning": post_tuning,
        "complication_tuning": tuning,
        "data": {
            "cache": str(args.cache),
            "samples_train": len(train),
            "samples_held_out": len(val),
            "pools": {k: len(v) for k, v in pools.items()},
            "kinds": {k: sum(1 for it in train if it.kind == k) for k in sorted({it.kind for it in train})},
            "views": {v: sum(1 for it in train if it.view == v) for v in sorted({it.view for it in train})},
            "excluded_sources": sorted(excluded),
            "real": {"split": f"inference.splits {describe(args.split_scheme)}", "split_scheme": args.split_scheme},
            "real_negatives": {"source": "radiographs/cadma_train", "train": len(neg_train), "val": len(neg_val),
                               "split": f"inference.splits {describe(args.split_scheme)}"},
            "manifest": {k: manifest.get(k) for k in ("format", "count", "seed", "parameters", "counts", "provenance") if k in manifest},
        },
    }
    write_model_folder(args.out, weights_file, info, replace(tuned, not_assessed=not_assessed), switches_from)
    if args.patch_iterations:
        from inference.train.hardware_patches import add_stage as add_patch_stage

        add_patch_stage(args.out, args.cache, excluded, args.val_every, args.patch_iterations, args.seed, info["command"], args.found_rods)
    if args.disc_iterations:
        from inference.train.hardware_discs import add_stage, tune_scan

        add_stage(args.out, args.cache, excluded, args.val_every, args.disc_iterations, args.seed, info["command"])
        tune_scan(args.out, args.cache, excluded, args.val_every, info["command"], args.data)
    log.info("wrote %s (best score %.4f at %s); %s; %.1f min total", args.out, best, best_entry.get("iteration"), stop_reason, (time.time() - t_start) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
