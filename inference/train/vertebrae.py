"""Train the vertebra network (``make train-vertebrae``) on real radiographs AND synthetic samples.

    python -m inference.train.vertebrae --data ../shared/data --cache ../cache/synth-v1 \\
        --out inference/models/spine-xr-vertebrae [--work ../cache/train-vertebrae] [--iterations N]

* Real AP radiographs (`inference.train.cadma`, train split only) supervise what their boxes know (see
  `inference.train.targets`); synthetic samples from the data engine's cache (``--cache``, .npz shards
  from ``python -m inference.synth.build``) supervise everything, AP and lateral.  Each batch is half real,
  half synthetic (``--synth-fraction``).  With ``--negative-fraction`` part of the batch is structureless
  images (noise, mottle, gradients, stripes: `inference.synth.negatives`) with nothing to find, taken from the
  real share or (``--negatives-from synthetic``) the synthetic one; measured as fine-tunes with a quarter, not in
  the ``make train-vertebrae`` recipe (`inference/evaluate/vertebrae_notes.md`).
* Every image goes through the same `inference.radiograph.preprocess.prepare` the node uses.
* The checkpoint kept is the one with the best validation score: centroid-in-box F1 on the REAL val
  split (with 24 structureless images whose every vertebra is a false positive, when the run trains on them) plus 0.5 x body/sacrum Dice on held-out synthetic samples.
* Seeds are fixed; progress is logged; ``--work`` holds checkpoints, so a killed run resumes where it
  stopped (same command).  torch uses 2 threads (the node's 2 cores); run it under ``nice -n 10``.
* The output folder gets ``weights.pt`` (state dict) and ``model.json`` (metrics are filled in by
  ``make eval-vertebrae``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference.evaluate.metrics import DetectionCounts, match_centroids_in_boxes
from inference.radiograph import network, postprocess, preprocess
from inference.radiograph.model import SHIPPED_SECOND_PASS
from inference.radiograph.network import BODY, CENTRE, L5, SACRUM, VERTEBRA
from inference.radiograph.postprocess import ChainParams
from inference.registry import sha256_file
from inference.results import LEVELS
from inference.splits import SCHEMES, TRAINING_SCHEME, VERTEBRA_LEGACY_SCHEME, describe
from inference.synth import negatives
from inference.train import cadma, common, targets

log = logging.getLogger("inference.train.vertebrae")

MODEL_NAME = "spine-xr-vertebrae"
#: Structureless training images (drawn like films, each crop augmented, seed --seed) and validation ones
#: (seed --seed + NEGATIVE_VAL_SEED_OFFSET).
NEGATIVE_POOL, NEGATIVE_VAL, NEGATIVE_VAL_SEED_OFFSET = 96, 24, 5003
#: One peak per image (none in most crops): the L5 focal loss is normalised by the peaks it has, so a half
#: weight keeps it from drowning the other channels' gradient.
L5_LOSS_WEIGHT = 0.5
#: Network-grid side a structureless image is mirrored out to (more than a zoomed-out training crop).
NEGATIVE_MIN_SIDE = 448


@dataclass
class RealItem:
    """A real radiograph at network scale with its boxes (network px)."""

    key: str
    image: np.ndarray  # float16
    boxes: np.ndarray  # (n, 4) x0 y0 x1 y1
    scale: float  # network px per source px
    #: An image known to hold no anatomy (`inference.synth.negatives`): every channel is known empty, the sacrum
    #: too (a real film without boxes says nothing about its sacrum).
    structureless: bool = False

    @cached_property
    def anchors(self) -> np.ndarray:
        points = np.stack([(self.boxes[:, 1] + self.boxes[:, 3]) / 2, (self.boxes[:, 0] + self.boxes[:, 2]) / 2], axis=1)
        if len(points) >= 3:
            # As on synthetic samples, a third of the crops centre on the sacrum (one step below L5).
            order = np.argsort(points[:, 0])
            s1 = points[order[-1]] + targets.S1_STEPS_BELOW_L5 * (points[order[-1]] - points[order[-2]])
            s1 = np.clip(s1, 0, np.array(self.image.shape, dtype=np.float64) - 1)
            points = np.concatenate([points, np.repeat(s1[None], max(1, len(points) // 2), axis=0)])
        return points


@dataclass
class SynthItem:
    """A synthetic sample at network scale."""

    image: np.ndarray  # float16
    body: np.ndarray  # int8 label map
    vertebra: np.ndarray  # int8 label map
    centres: list[tuple[float, float, float]]
    ignored: list[tuple[float, float, float]]
    view: str
    source: str
    meta: dict = field(default_factory=dict)

    @cached_property
    def anchors(self) -> np.ndarray:
        # Cached: read for every crop drawn, and the sacrum search scans the whole label map.
        points = [(y, x) for x, y, _ in self.centres]
        rows, cols = np.nonzero(self.body == targets.S1_CODE)
        if len(rows):
            # Crops centred on bodies mostly missed the sacrum (measured: 0.2-2 % of crop pixels), and the
            # sacrum channel never learned; a third of the draws now centre on it when it is in the image.
            points += [(float(rows.mean()), float(cols.mean()))] * max(1, len(points) // 2)
        return np.array(points, dtype=np.float64).reshape(-1, 2)


def prepare_real(item: cadma.RealRadiograph) -> RealItem:
    """Load a real radiograph and bring it to the network grid exactly as the node would."""
    pixels = item.load()
    image, scale = preprocess.prepare(pixels, None)
    s = image.shape[0] / pixels.shape[0]
    return RealItem(item.key, image.astype(np.float16), item.boxes * s, s)


def _resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    t = torch.from_numpy(labels.astype(np.float32))[None, None]
    return F.interpolate(t, size=shape, mode="nearest-exact")[0, 0].numpy().round().astype(np.int8)


def prepare_structureless(image: negatives.Structureless) -> RealItem:
    """A structureless image (`inference.synth.negatives`) as a film without vertebrae: all targets 0."""
    prepared, scale = preprocess.prepare(image.pixels, image.spacing_mm)
    # Mirrored out to 448 px: crops reaching far past a small image's edge (zero outside) taught the network
    # "noise beside a black border is nothing", and on a whole image of noise it still found bodies (measured:
    # 1-3 % of such a crop called body, 15-30 % of the whole image). Crops centred near the edge still hang over
    # it (these images have no anchors to centre on), but hold far more image than black.
    rows, cols = (max(0, NEGATIVE_MIN_SIDE - n) for n in prepared.shape)
    prepared = np.pad(prepared, ((rows // 2, rows - rows // 2), (cols // 2, cols - cols // 2)), mode="symmetric")
    return RealItem(image.key, prepared.astype(np.float16), np.zeros((0, 4)), float(scale[0]), structureless=True)


def prepare_synth(sample) -> SynthItem:  # sample: inference.synth.sample.SynthSample
    """A data-engine sample on the network grid (same preprocessing as the node, labels by nearest)."""
    image, _ = preprocess.prepare(sample.image, tuple(sample.pixel_spacing_mm))
    body = _resize_labels(sample.body, image.shape)
    vert = _resize_labels(sample.vertebra, image.shape)
    marked, ignored = targets.body_centres(body)
    meta = sample.meta or {}
    return SynthItem(
        image.astype(np.float16), body, vert, marked, ignored, sample.view, str(meta.get("source", "")), dict(meta)
    )


#: Minimum body-vs-surroundings contrast (normalised intensity) for a synthetic sample to teach anything.
MIN_VISIBILITY = 0.05


def visibility(item: SynthItem) -> float:
    """Median over vertebral bodies of (mean intensity inside - mean in a thin ring around it), on the
    normalised network image.  Many lateral DRRs show no vertebra at all (bone contrast lost in the
    soft tissue); a network asked to find bodies there learns to hallucinate them."""
    from scipy import ndimage

    img = item.image.astype(np.float32)
    scores = []
    for code in np.unique(item.body):
        if code < 1 or code == targets.S1_CODE:
            continue
        m = item.body == code
        if m.sum() < 20:
            continue
        ring = ndimage.binary_dilation(m, iterations=3) & ~ndimage.binary_dilation(m, iterations=1) & (item.body <= 0)
        if ring.sum() < 10:
            continue
        scores.append(float(img[m].mean() - img[ring].mean()))
    return float(np.median(scores)) if scores else float("nan")


def load_synth(cache: Path, sources: set[str] | None, limit: int | None, min_visibility: float = MIN_VISIBILITY) -> tuple[list[SynthItem], dict]:
    """Samples of a data-engine cache (optionally only from CT `sources`), on the network grid, without
    those whose vertebrae are not visible; returns the items and counts of what was dropped."""
    from inference.synth.build import iter_cache

    items = []
    dropped: dict[str, int] = {}
    t0 = time.time()
    for sample in iter_cache(cache):
        meta = sample.meta or {}
        if meta.get("real_image"):
            continue  # implant overlays on real images: the real path already covers those images
        if sources and str(meta.get("source", "")) not in sources:
            continue
        item = prepare_synth(sample)
        vis = visibility(item)
        if not (vis >= min_visibility):
            key = f"{item.view} {item.source}"
            dropped[key] = dropped.get(key, 0) + 1
            continue
        items.append(item)
        if limit and len(items) >= limit:
            break
        if len(items) % 500 == 0:
            log.info("synthetic samples prepared: %d (%.0f s)", len(items), time.time() - t0)
    log.info("synthetic samples dropped as not visible (contrast < %.2f): %s", min_visibility, dropped)
    return items, dropped


def render_item(item: RealItem | SynthItem, sacrum_hint: bool,
                structureless_channels: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, target, weight) on the network grid; a structureless image supervises `structureless_channels`
    (None: all) with its all-zero targets."""
    image = item.image.astype(np.float32)
    if isinstance(item, RealItem):
        t, w = targets.real_targets(image.shape, item.boxes, sacrum_hint=sacrum_hint)
        if item.structureless:
            w = np.zeros_like(w)
            w[list(range(len(w)) if structureless_channels is None else structureless_channels)] = 1.0
    else:
        t, w = targets.synth_targets(item.body, item.vertebra, item.centres, item.ignored)
    return image, t, w


def loss_fn(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
            l5_weight: float = L5_LOSS_WEIGHT) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum of the per-channel losses (segmentation: BCE + Dice; centres: focal)."""
    parts = {}
    for ch, name in ((BODY, "body"), (VERTEBRA, "vertebra")):
        parts[name] = common.masked_bce_dice(logits[:, ch], target[:, ch], weight[:, ch])
    # The sacrum covers ~1-2 % of a crop and is unknown on most real pixels: with equal weights the channel
    # settled on "never" (Dice 0 after 800 iterations, and still after 200 more with pos_weight 5), while
    # the same loss alone learned it in 50 iterations; it gets a larger share of the clipped gradient.
    parts["sacrum"] = common.masked_bce_dice(logits[:, SACRUM], target[:, SACRUM], weight[:, SACRUM], pos_weight=10.0)
    parts["centre"] = common.centre_focal(logits[:, CENTRE], target[:, CENTRE], weight[:, CENTRE])
    parts["l5"] = common.centre_focal(logits[:, L5], target[:, L5], weight[:, L5])
    total = parts["body"] + 0.5 * parts["vertebra"] + 2.0 * parts["sacrum"] + parts["centre"] + l5_weight * parts["l5"]
    return total, {k: float(v.detach()) for k, v in parts.items()}


def predicted_centroids(prob: np.ndarray, params: ChainParams) -> np.ndarray:
    """(x, y) network-grid centroids of the vertebrae the full post-processing finds."""
    det = postprocess.detect(prob, params)
    out = []
    for k, node in enumerate(det.nodes):
        rows, cols = np.nonzero(det.labels == k + 1)
        if len(rows):
            out.append((cols.mean() + 0.5, rows.mean() + 0.5))
        else:
            out.append((node.column + 0.5, node.row + 0.5))
    return np.array(out).reshape(-1, 2)


def validate(net: torch.nn.Module, real: list[RealItem], synth: list[SynthItem], params: ChainParams) -> dict[str, float]:
    """Real val centroid-in-box F1 and synthetic body / sacrum Dice."""
    net.eval()
    counts = DetectionCounts()
    l5_hits = []
    for item in real:
        prob = network.predict(net, item.image.astype(np.float32))
        tp, fp, fn, _ = match_centroids_in_boxes(predicted_centroids(prob, params), item.boxes)
        counts.add(tp, fp, fn)
        if len(item.boxes):
            l5_hits.append(_peak_in_box(prob[L5], item.boxes[np.argmax(item.boxes[:, 1] + item.boxes[:, 3])]))
    inter = {"body": 0.0, "sacrum": 0.0}
    total = {"body": 0.0, "sacrum": 0.0}
    for synth_item in synth:
        prob = network.predict(net, synth_item.image.astype(np.float32))
        t, w = targets.synth_targets(synth_item.body, synth_item.vertebra, synth_item.centres, synth_item.ignored)
        for ch, name in ((BODY, "body"), (SACRUM, "sacrum")):
            p = (prob[ch] >= 0.5) & (w[ch] > 0)
            g = (t[ch] >= 0.5) & (w[ch] > 0)
            inter[name] += 2 * float((p & g).sum())
            total[name] += float(p.sum() + g.sum())
    net.train()
    out = {"real_f1": counts.f1, "real_precision": counts.precision, "real_recall": counts.recall,
           "real_l5_peak_in_bottom_box": float(np.mean(l5_hits)) if l5_hits else float("nan")}
    for name in inter:
        out[f"synth_dice_{name}"] = inter[name] / total[name] if total[name] else float("nan")
    return out


def _peak_in_box(heat: np.ndarray, box: np.ndarray) -> bool:
    """Whether the heatmap's highest value lies inside `box` (x0, y0, x1, y1)."""
    r, c = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return bool(box[0] <= c + 0.5 <= box[2] and box[1] <= r + 0.5 <= box[3])


def _synth_detection(centroids: np.ndarray, item: SynthItem) -> tuple[int, int, int]:
    """(tp, fp, fn) of network-grid centroids against a synthetic sample's marked bodies."""
    marked = [(x, y) for x, y, _ in item.centres]
    hit: set[int] = set()
    fp = 0
    for x, y in centroids:
        r, c = int(np.clip(y - 0.5, 0, item.body.shape[0] - 1)), int(np.clip(x - 0.5, 0, item.body.shape[1] - 1))
        code = int(item.body[r, c])
        if code >= 1 and code != targets.S1_CODE and code not in hit:
            hit.add(code)
        elif code < 1 or code == targets.S1_CODE:
            fp += 1
    codes_marked = {int(item.body[int(np.clip(y - 0.5, 0, item.body.shape[0] - 1)), int(np.clip(x - 0.5, 0, item.body.shape[1] - 1))]) for x, y in marked}
    tp = len(hit & codes_marked)
    return tp, fp, len(codes_marked) - tp


def tune_postprocess(net: torch.nn.Module, real: list[RealItem], synth: list[SynthItem]) -> tuple[ChainParams, dict]:
    """Grid-search the chain parameters on the validation images (network outputs computed once)."""
    import itertools
    from dataclasses import replace

    net.eval()
    real_probs = [(network.predict(net, it.image.astype(np.float32)), it) for it in real]
    synth_probs = [(network.predict(net, it.image.astype(np.float32)), it) for it in synth]
    # Any: the keys name ChainParams fields (passed to `replace`), which mypy cannot follow through a dict.
    grid: dict[str, tuple[Any, ...]] = {
        "peak_threshold": (0.1, 0.15, 0.25),
        "reward_offset": (0.15, 0.3, 0.45),
        "spacing_sigma": (0.15, 0.2, 0.3),
        "midpoint_penalty": (0.0, 3.0),
    }
    defaults = {k: getattr(ChainParams(), k) for k in grid}
    results = []
    for values in itertools.product(*grid.values()):
        params = replace(ChainParams(), **dict(zip(grid, values, strict=True)))
        rc, sc = DetectionCounts(), DetectionCounts()
        for prob, it in real_probs:
            tp, fp, fn, _ = match_centroids_in_boxes(predicted_centroids(prob, params), it.boxes)
            rc.add(tp, fp, fn)
        for prob, synth_it in synth_probs:
            sc.add(*_synth_detection(predicted_centroids(prob, params), synth_it))
        score = rc.f1 + (0.5 * sc.f1 if synth_probs else 0.0)
        results.append((score, dict(zip(grid, values, strict=True)), rc.f1, sc.f1))
    results.sort(key=lambda r: -r[0])
    best = results[0]
    default = next((r for r in results if r[1] == defaults), None)
    chain = replace(ChainParams(), **best[1])

    # Then the naming anchor and its threshold, by naming: a wrong name costs three right ones ("never guess").
    choices: list[dict[str, Any]] = [{"naming_anchor": "sacrum", "sacrum_threshold": t} for t in (0.2, 0.3, 0.4, 0.5)]
    choices += [{"naming_anchor": "l5", "l5_threshold": t, "l5_margin": m} for t in (0.2, 0.3, 0.5) for m in (0.35, 0.5, 0.7)]
    naming_rows = []
    for choice in choices:
        params = replace(chain, **choice)
        right = wrong = matched = 0
        for prob, synth_it in synth_probs:
            det = postprocess.detect(prob, params)
            for k, node in enumerate(det.nodes):
                r = int(np.clip(node.row, 0, synth_it.body.shape[0] - 1))
                c = int(np.clip(node.column, 0, synth_it.body.shape[1] - 1))
                code = int(synth_it.body[r, c])
                if not 1 <= code < targets.S1_CODE:
                    continue
                matched += 1
                if det.levels[k] is not None:
                    right += det.levels[k] == LEVELS[code - 1]
                    wrong += det.levels[k] != LEVELS[code - 1]
        for prob, it in real_probs:
            det = postprocess.detect(prob, params)
            cents = np.array([(n.column + 0.5, n.row + 0.5) for n in det.nodes]).reshape(-1, 2)
            _, _, _, pairs = match_centroids_in_boxes(cents, it.boxes)
            for p_idx, g in pairs:
                matched += 1
                assumed = LEVELS.index("L5") - (len(it.boxes) - 1 - g)
                if det.levels[p_idx] is not None:
                    ok = assumed >= 0 and det.levels[p_idx] == LEVELS[assumed]
                    right += ok
                    wrong += not ok
        naming_rows.append({**choice, "right": right, "wrong": wrong, "matched": matched,
                            "score": round((right - 3 * wrong) / max(matched, 1), 4)})
    best_naming = max(range(len(choices)), key=lambda k: naming_rows[k]["score"])
    chain = replace(chain, **choices[best_naming])
    report = {
        "chosen": {**best[1], **choices[best_naming]},
        "score": round(best[0], 4),
        "real_val_f1": round(best[2], 4),
        "synth_val_f1": round(best[3], 4),
        "defaults_score": round(default[0], 4) if default else None,
        "grid": {k: list(v) for k, v in grid.items()},
        "naming": naming_rows,
    }
    net.train()
    return chain, report


def selection_score(metrics: dict[str, float]) -> float:
    """What checkpoint selection maximises."""
    score = metrics.get("real_f1", 0.0) or 0.0
    l5 = metrics.get("real_l5_peak_in_bottom_box")
    if l5 is not None and np.isfinite(l5):
        score += 0.5 * float(l5)
    dice_or_none = [metrics.get(k) for k in ("synth_dice_body", "synth_dice_sacrum")]
    dice = [d for d in dice_or_none if d is not None and np.isfinite(d)]
    if dice:
        score += 0.5 * float(np.mean(dice))
    return score


def write_model_folder(out: Path, weights: Path, info: dict, params: ChainParams | None = None,
                       switches_from: Path | None = None) -> dict:
    """Copy `weights` to ``out/weights.pt`` and write ``out/model.json`` (metrics left for the evaluation), with
    what `switches_from` switched off still off (`common.carry_switches`)."""
    digest = sha256_file(weights)
    meta = {
        "name": MODEL_NAME,
        "version": f"1.0+{digest[:8]}",
        "task": "vertebra segmentation, instance separation and level naming on projection radiographs; "
        "vertebral body heights and Genant grading on lateral views",
        "weights": "weights.pt",
        "sha256": digest,
        "format": "torch state dict",
        "architecture": network.DEFAULT_ARCHITECTURE,
        "parameters": info.get("parameters"),
        "inputs": {
            "image": "one projection radiograph (DX/CR), any size, MONOCHROME1/2, 8-16 bit",
            "preprocessing": {
                "target_spacing_mm": preprocess.TARGET_SPACING_MM,
                "uncalibrated_long_side": preprocess.UNCALIBRATED_LONG_SIDE,
                "max_network_side": preprocess.MAX_NETWORK_SIDE,
                "normalisation": "percentile 1-99.5 to [0,1], CLAHE (skimage equalize_adapthist, kernel 1/8 of the long side, clip 0.01)",
                "second_pass": asdict(SHIPPED_SECOND_PASS),
            },
        },
        "outputs": {name: "sigmoid probability map" for name in network.CHANNELS},
        "postprocess": asdict(params or ChainParams()),
        "training": info,
        "metrics": {},
    }
    common.write_model_files(out, weights, meta, switches_from)
    return meta


def split_batch(n_real: int, n_synth: int, n_negative: int, first: str = "real") -> tuple[int, int]:
    """Real and synthetic places left once ``n_negative`` structureless images take theirs, from ``first``'s
    share first ("real" or "synthetic"), then the other's."""
    if first == "real":
        from_real = min(n_real, n_negative)
    else:
        from_real = n_negative - min(n_synth, n_negative)
    n_real, n_synth = n_real - from_real, n_synth - (n_negative - from_real)
    if min(n_real, n_synth) < 0:
        raise ValueError(f"{n_negative} structureless images do not fit a batch of {n_real + n_synth + n_negative}")
    return n_real, n_synth


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.train.vertebrae", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="shared data folder (radiographs/cadma_train, ct/...)")
    ap.add_argument("--cache", type=Path, default=None, help="data-engine cache of synthetic .npz shards")
    ap.add_argument("--out", type=Path, required=True, help="model folder to write")
    ap.add_argument("--work", type=Path, default=Path("../cache/train-vertebrae"), help="checkpoints and log")
    ap.add_argument("--iterations", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-minutes", type=float, default=100.0, help="stop the loop (keeping the best checkpoint) after this")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--synth-fraction", type=float, default=0.5)
    ap.add_argument("--negative-fraction", type=float, default=0.0,
                    help="share of each batch given to structureless images (noise, mottle, gradients, stripes) "
                         "with all-zero targets, taken from the share --negatives-from names first; in [0, 1)")
    ap.add_argument("--negatives-from", choices=("real", "synthetic"), default="real",
                    help="which share of the batch gives up its places to structureless images first (the other "
                         "gives the rest): 'synthetic' keeps the real films a fine-tune learns boxes from")
    ap.add_argument("--structureless-channels", default="",
                    help="comma list of the output channels structureless images supervise (default all: "
                         f"{','.join(network.CHANNELS)}); e.g. 'centre,sacrum' teaches 'no vertebra here' through the "
                         "peaks alone and leaves the body outlines to the films that have them")
    ap.add_argument("--l5-weight", type=float, default=L5_LOSS_WEIGHT,
                    help="weight of the L5 heatmap's loss; 0 leaves that channel untrained. A four-channel model's L5"
                         " channel starts as a copy of its centre channel, a peak on every vertebra: its first loss"
                         " (~45, the others ~3) takes most of the clipped gradient in a fine-tune")
    ap.add_argument("--synth-sources", default="", help="comma list: only synthetic samples from these CT sources")
    ap.add_argument("--synth-limit", type=int, default=0)
    ap.add_argument("--no-real", action="store_true", help="synthetic only (leave-one-patient-out runs)")
    ap.add_argument("--no-sacrum-hint", action="store_true")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint in --work")
    ap.add_argument("--tune-only", action="store_true", help="no training: re-tune post-processing of --work/best.pt and rewrite --out")
    ap.add_argument("--init-weights", type=Path, default=None,
                    help="start from these weights (e.g. the shipped model's weights.pt) instead of random ones; "
                         "ignored when --work holds a checkpoint.  Weights trained under another split scheme have "
                         "seen films this run's scheme holds out: its evaluation cannot call them unseen")
    ap.add_argument("--split-scheme", default=None, choices=sorted(SCHEMES),
                    help=f"split of the real films (inference.splits; default {TRAINING_SCHEME}, or the scheme of the "
                         "checkpoint or --init-weights model the run continues)")
    ap.add_argument("--switches-from", default=None, help=common.SWITCHES_HELP)
    args = ap.parse_args(argv)
    switches_from = common.switches_source(args.switches_from, args.out, MODEL_NAME)
    if not 0.0 <= args.negative_fraction < 1.0:
        ap.error("--negative-fraction must be in [0, 1)")
    chosen = [c for c in args.structureless_channels.split(",") if c]
    if unknown := sorted(set(chosen) - set(network.CHANNELS)):
        ap.error(f"--structureless-channels: no channel {', '.join(unknown)} (channels: {', '.join(network.CHANNELS)})")
    structureless_channels = [network.CHANNELS.index(c) for c in chosen] if chosen else None
    if args.l5_weight < 0:
        ap.error("--l5-weight must be >= 0")
    n_negative = int(round(args.batch * args.negative_fraction))
    if n_negative and negatives.EVALUATION_SEED in (args.seed, args.seed + NEGATIVE_VAL_SEED_OFFSET):
        ap.error(f"--seed {args.seed} would train or validate on the structureless evaluation set (seed {negatives.EVALUATION_SEED})")

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    common.setup_logging(work / "train.log")
    common.setup(args.seed, args.threads)
    log.info("arguments: %s", vars(args))
    t_start = time.time()

    # ---------------------------------------------------------------- data
    scheme = common.split_scheme(args.split_scheme, work=work, fresh=args.fresh, init_weights=args.init_weights,
                                 legacy=VERTEBRA_LEGACY_SCHEME)
    log.info("real films split by %s", describe(scheme))
    real_train: list[RealItem] = []
    real_val: list[RealItem] = []
    if not args.no_real:
        splits = cadma.split(cadma.load_cadma(args.data), scheme)
        real_train = [prepare_real(r) for r in splits["train"]]
        real_val = [prepare_real(r) for r in splits["val"]]
        log.info("real radiographs: %d train, %d val (%.0f s)", len(real_train), len(real_val), time.time() - t_start)
    synth: list[SynthItem] = []
    dropped: dict = {}
    if args.cache is not None:
        if not (args.cache / "manifest.json").is_file():
            raise SystemExit(
                f"{args.cache}/manifest.json not found: build the synthetic cache first, e.g.\n"
                f"  nice -n 10 python -m inference.synth.build --data {args.data} --out {args.cache} --count 3000 --seed 1"
            )
        sources = {s for s in args.synth_sources.split(",") if s} or None
        if sources is None or any(s.startswith("real") for s in sources):
            common.check_cache_scheme(args.cache, scheme)
        synth, dropped = load_synth(args.cache, sources, args.synth_limit or None)
        log.info("synthetic samples: %d (%.0f s)", len(synth), time.time() - t_start)
    if not real_train and not synth:
        raise SystemExit("no training data: give --data with real radiographs and/or --cache with synthetic shards")
    # Structureless images teach "nothing here"; the validation ones count their vertebrae as false positives
    # of the real F1, so checkpoint selection and the chain tuning pay for a spine found in noise.
    negative_train = (
        [prepare_structureless(n) for n in negatives.structureless_set(NEGATIVE_POOL, args.seed)] if n_negative else []
    )
    n_real_val = len(real_val)
    if real_val and negative_train:
        real_val += [prepare_structureless(n)
                     for n in negatives.structureless_set(NEGATIVE_VAL, args.seed + NEGATIVE_VAL_SEED_OFFSET)]
    # Hold out every 20th synthetic sample for checkpoint selection.
    synth_val = synth[::20][:60]
    synth_train = [s for i, s in enumerate(synth) if i % 20 != 0] if synth else []

    # ---------------------------------------------------------------- model
    net = network.build_network()
    n_params = network.parameter_count(net)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    rng = np.random.default_rng(args.seed)
    step, best, spent = 0, -1.0, 0.0
    history: list[dict] = []
    ckpt_path, best_path = work / "checkpoint.pt", work / "best.pt"
    state = None if args.fresh else common.load_checkpoint(ckpt_path)
    # What the run started from, read before it may overwrite that folder, and kept in its checkpoint: a resumed
    # run still knows its ancestor, whose films count as seen by the result (`splits.lineage`).
    initialised_from: dict | None = None

    def record_start(weights: Path) -> dict:
        digest = sha256_file(weights)
        ancestor = common.init_model_record(weights, digest)
        if ancestor is None:
            log.warning("%s is not described by a model.json beside it: the films it learnt from are not recorded,"
                        " and the evaluation will count them as unseen", weights)
        return {"path": str(weights), "sha256": digest, **({"model": ancestor} if ancestor else {})}

    if state is not None:
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["data_rng"]
        step, best, spent, history = state["step"], state["best"], state["spent"], state["history"]
        # A checkpoint written before starts were kept in it: the --init-weights given again, as was recorded then.
        initialised_from = (state["initialised_from"] if "initialised_from" in state
                            else record_start(args.init_weights) if args.init_weights is not None else None)
        log.info("resumed at iteration %d (best %.4f, %.0f s spent)", step, best, spent)
    elif args.init_weights is not None:
        # Fine-tuning: a loss change (e.g. the sacrum's positive weight) need not cost a whole new run.
        init = torch.load(args.init_weights, map_location="cpu", weights_only=True)
        # A model's weights.pt or a training checkpoint; a four-channel one gets its L5 channel added.
        net.load_state_dict(network.widen_state(init.get("net", init.get("segmentation", init)), len(network.CHANNELS)))
        initialised_from = record_start(args.init_weights)
        log.info("initialised from %s", args.init_weights)
    clock = common.Stopwatch(spent)
    params = ChainParams()
    aug = common.AugmentConfig()
    sacrum_hint = not args.no_sacrum_hint
    n_synth = int(round(args.batch * args.synth_fraction)) if synth_train else 0
    if not real_train:
        n_synth = args.batch
    n_real = args.batch - n_synth
    try:
        n_real, n_synth = split_batch(n_real, n_synth, n_negative, args.negatives_from)
    except ValueError as exc:
        ap.error(str(exc))
    log.info("network: %d parameters; batch %d real + %d synthetic + %d structureless", n_params, n_real, n_synth, n_negative)

    def draw(pool: list, count: int) -> list:
        return [pool[int(i)] for i in rng.integers(0, len(pool), size=count)] if count else []

    # Laterals are scarce after the visibility filter but carry the heights: draw views evenly.
    by_view: dict[str, list[SynthItem]] = {}
    for item in synth_train:
        by_view.setdefault(item.view, []).append(item)
    views = sorted(by_view)

    def draw_synth(count: int) -> list:
        out = []
        for _ in range(count):
            pool = by_view[views[int(rng.integers(0, len(views)))]]
            out.append(pool[int(rng.integers(0, len(pool)))])
        return out

    net.train()
    t_log, losses = time.time(), []
    stop_reason = "iterations done"
    if args.tune_only:
        stop_reason = "post-processing re-tuned on the saved best checkpoint"
    while step < args.iterations and not args.tune_only:
        if clock.elapsed > args.max_minutes * 60:
            stop_reason = f"time budget of {args.max_minutes} min reached"
            break
        # Progress by iterations or by the time budget, whichever is further: on a busy machine the
        # learning rate still anneals before the budget ends.
        progress = max(step / args.iterations, clock.elapsed / (args.max_minutes * 60))
        lr = common.cosine_lr(int(progress * args.iterations), args.iterations, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        items = draw(real_train, n_real) + draw_synth(n_synth) + draw(negative_train, n_negative)
        xs, ts, ws = [], [], []
        for item in items:
            image, t, w = render_item(item, sacrum_hint, structureless_channels)
            x, t2, w2 = common.augment(image, t, w, rng, aug, item.anchors)
            xs.append(x)
            ts.append(t2)
            ws.append(w2)
        batch_x, batch_t, batch_w = torch.stack(xs), torch.stack(ts), torch.stack(ws)
        logits = net(batch_x)
        loss, parts = loss_fn(logits, batch_t, batch_w, args.l5_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        step += 1
        losses.append([float(loss.detach())] + [parts[k] for k in ("body", "vertebra", "sacrum", "centre", "l5")])
        if step % 25 == 0:
            m = np.mean(losses, axis=0)
            log.info(
                "it %d lr %.2e loss %.3f (body %.3f vert %.3f sacrum %.3f centre %.3f l5 %.3f) %.2f s/it elapsed %.1f min",
                step, lr, *m, (time.time() - t_log) / 25, clock.elapsed / 60,
            )
            t_log, losses = time.time(), []
        if step % args.eval_every == 0 or step == args.iterations:
            metrics = validate(net, real_val, synth_val, params)
            score = selection_score(metrics)
            history.append({"iteration": step, "score": round(score, 4), **{k: round(float(v), 4) for k, v in metrics.items()}})
            log.info("validation at %d: %s score %.4f (best %.4f)", step, metrics, score, best)
            if score > best:
                best = score
                torch.save(net.state_dict(), best_path)
            common.save_checkpoint(
                ckpt_path, net=net.state_dict(), opt=opt.state_dict(), data_rng=rng.bit_generator.state,
                step=step, best=best, spent=clock.elapsed, history=history, split_scheme=scheme,
                initialised_from=initialised_from,
            )
    if not best_path.is_file():
        torch.save(net.state_dict(), best_path)
    net.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
    tuned, tuning = tune_postprocess(net, real_val, synth_val)
    log.info("post-processing tuned on the validation images: %s", tuning)
    best_entry = max(history, key=lambda h: h["score"]) if history else {}
    info = {
        "command": "python -m inference.train.vertebrae " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "initialised_from": initialised_from,
        "iterations": step,
        "stop": stop_reason,
        "batch": {"real": n_real, "synthetic": n_synth, "structureless": n_negative,
                  **({"structureless_from": args.negatives_from,
                      "structureless_channels": args.structureless_channels or "all"} if n_negative else {})},
        "l5_weight": args.l5_weight,
        "wall_minutes": round(clock.elapsed / 60, 1),
        "threads": args.threads,
        "parameters": n_params,
        "selected_checkpoint": best_entry,
        "validation_history": history,
        "postprocess_tuning": tuning,
        "data": {
            "real": {
                "source": str(cadma.SUBDIR),
                "images_train": len(real_train),
                "images_val": n_real_val,
                "split": f"inference.splits {describe(scheme)}",
                "split_scheme": scheme,
                "sacrum_hint": sacrum_hint,
            },
            "structureless": {
                "kinds": list(negatives.KINDS),
                "images_train": len(negative_train),
                "images_val": len(real_val) - n_real_val,
                "seed": args.seed,
                "seed_val": args.seed + NEGATIVE_VAL_SEED_OFFSET,
            },
            "synthetic": {
                "cache": str(args.cache) if args.cache else None,
                "samples_train": len(synth_train),
                "samples_val": len(synth_val),
                "sources": sorted({s.source for s in synth}),
                "views": {v: sum(1 for s in synth if s.view == v) for v in sorted({s.view for s in synth})},
                "dropped_not_visible": dropped,
                "visibility_threshold": MIN_VISIBILITY,
            },
        },
    }
    if args.cache is not None and (args.cache / "manifest.json").is_file():
        manifest = json.loads((args.cache / "manifest.json").read_text())
        info["data"]["synthetic"]["manifest"] = {k: manifest.get(k) for k in ("count", "seed", "parameters", "provenance") if k in manifest}
    run_info = work / "run_info.json"
    if args.tune_only and (run_info.is_file() or (args.out / "model.json").is_file()):
        # Keep the record of the training run; only the tuning changes.
        if run_info.is_file():
            previous = json.loads(run_info.read_text())
        else:
            previous = json.loads((args.out / "model.json").read_text())["training"]
        previous["postprocess_tuning"] = tuning
        info = previous
        common.write_json(run_info, info)
    else:
        common.write_json(run_info, info)
    write_model_folder(args.out, best_path, info, tuned, switches_from)
    log.info("wrote %s (best score %.4f at %s); %s", args.out, best, best_entry.get("iteration"), stop_reason)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
