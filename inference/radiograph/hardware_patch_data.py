"""Training data and tuning of the complication classifier (`hardware_patches`), from data-engine samples.

`PatchBank.add(sample)` keeps the sample's image and, per true implant, what a patch needs (mask crop,
frame, labels).  Patches are cut on the fly with random jitter (centre, angle, scale, flips) so every draw
differs; labels:

* screws: (loosening, breakage) from the implant spec;
* cages: (subsidence,);
* rods: one window every `ROD_STEP_MM` along the rod; a window is positive when its centre lies within
  6 mm of the fracture gap (found where the rod, joined through screw heads, falls apart in two pieces),
  ignored between 6 and 12 mm, negative elsewhere; a fractured rod whose gap cannot be seen (hidden behind
  a head or the other rod) gives no windows.

`PatchBank.add_found_rods(model, sample)` adds windows along the rod pieces a segmentation model finds on
the sample, labelled the same way by the true gap under them.  At run time the classifier sees those pieces,
not true masks: rods split under screw heads, merged with hooks and heads into wide blobs (a real
postoperative film raised a false rod fracture on such a blob).  A found piece over no true rod gives
negative windows.

`complication_scores(...)` runs the whole model on held-out samples and pairs each predicted implant's
scores with the truth of the true implant under it, for threshold tuning and evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from inference.radiograph.hardware_patches import (
    CAGE_PATCH,
    HEADS,
    ROD_PATCH,
    SCREW_PATCH,
    Frame,
    axis_frame,
    cage_frame,
    cut,
    intensity_window,
    rod_frames,
)
from inference.results import FAILURE_MODES, Complication, ImplantKind

PATCH_OF = {"screw": SCREW_PATCH, "rod": ROD_PATCH, "cage": CAGE_PATCH}
MIN_VISIBLE_MM2 = 8.0


@dataclass
class PatchItem:
    image: int  # index into PatchBank.images
    head: str
    mask: np.ndarray
    offset: tuple[int, int]
    frame: Frame
    labels: np.ndarray  # float32 (outputs of the head,)

    @property
    def positive(self) -> bool:
        return bool(self.labels.max() >= 0.5)


@dataclass
class PatchBank:
    """Images and true implants of many samples; draws jittered patches."""

    images: list[tuple[np.ndarray, tuple[float, float], float]] = field(default_factory=list)  # pixels, window, mm/px
    items: dict[str, list[PatchItem]] = field(default_factory=lambda: {k: [] for k in HEADS})

    def _store(self, sample: Any) -> tuple[int, float]:
        """Keep a sample's image: (its index, mm per pixel)."""
        src_mm = sample.mm_per_pixel
        self.images.append((np.asarray(sample.image, dtype=np.float16), intensity_window(sample.image), src_mm))
        return len(self.images) - 1, src_mm

    def add(self, sample: Any) -> int | None:
        """Every visible implant of a sample (screws, rods, cages); the index of its kept image (None: no implants)."""
        if not sample.implant_specs:
            return None
        idx, src_mm = self._store(sample)
        inst = sample.implants
        specs = sample.implant_specs
        boxes = ndimage.find_objects(np.clip(inst, 0, None).astype(np.int32))
        min_px = MIN_VISIBLE_MM2 / src_mm**2
        joinable = np.isin(inst, [k + 1 for k, s in enumerate(specs) if s.kind is ImplantKind.PEDICLE_SCREW])
        for k, spec in enumerate(specs):
            if k >= len(boxes) or boxes[k] is None:
                continue
            sl = boxes[k]
            mask = inst[sl] == k + 1
            if mask.sum() < min_px:
                continue
            offset = (sl[0].start, sl[1].start)
            comps = spec.complications
            if spec.kind is ImplantKind.PEDICLE_SCREW:
                labels = np.array([Complication.SCREW_LOOSENING in comps, Complication.SCREW_BREAKAGE in comps], np.float32)
                self.items["screw"].append(PatchItem(idx, "screw", mask, offset, axis_frame(mask, offset), labels))
            elif spec.kind is ImplantKind.INTERBODY_CAGE:
                labels = np.array([Complication.CAGE_SUBSIDENCE in comps], np.float32)
                self.items["cage"].append(PatchItem(idx, "cage", mask, offset, cage_frame(mask, offset), labels))
            elif spec.kind is ImplantKind.ROD:
                frames = rod_frames(mask, offset, src_mm)
                gap = None
                if Complication.ROD_FRACTURE in comps:
                    gap = rod_gap_xy(inst == k + 1, joinable, src_mm)
                    if gap is None:
                        continue
                self._add_rod_windows(idx, mask, offset, frames, gap, src_mm)
        return idx

    def _add_rod_windows(self, idx: int, mask: np.ndarray, offset: tuple[int, int], frames: list[Frame],
                         gap: tuple[float, float] | None, src_mm: float) -> None:
        """Windows along one rod: positive within 6 mm of `gap`, ignored to 12 mm, negative beyond."""
        for fr in frames:
            d_mm = math.inf if gap is None else math.hypot(fr.centre[0] - gap[0], fr.centre[1] - gap[1]) * src_mm
            if 6.0 < d_mm <= 12.0:
                continue
            self.items["rod"].append(PatchItem(idx, "rod", mask, offset, fr, np.array([d_mm <= 6.0], np.float32)))

    def add_found_rods(self, model: Any, sample: Any, image: int | None = None) -> int:
        """Windows along the rod pieces `model` (a `HardwareModel`) finds on a sample; the number of pieces.
        `image`: the index `add` returned for the same sample (its image is then not kept twice)."""
        if not any(s.kind is ImplantKind.ROD for s in sample.implant_specs):
            return 0
        inst = sample.implants
        rods = [sp for sp in found_pieces(model, sample) if sp.piece.kind is ImplantKind.ROD]
        if not rods:
            return 0
        idx, src_mm = (image, self.images[image][2]) if image is not None else self._store(sample)
        joinable = np.isin(inst, [k + 1 for k, s in enumerate(sample.implant_specs) if s.kind is ImplantKind.PEDICLE_SCREW])
        gaps: dict[int, tuple[float, float] | None] = {}
        for sp in rods:
            k = truth_label(sp.mask, sp.offset, inst)
            spec = sample.implant_specs[k - 1] if k else None
            gap = None
            if spec is not None and spec.kind is ImplantKind.ROD and Complication.ROD_FRACTURE in spec.complications:
                if k not in gaps:
                    gaps[k] = rod_gap_xy(inst == k, joinable, src_mm)
                gap = gaps[k]
                if gap is None:
                    continue  # the gap does not show: no honest label for this rod's windows
            self._add_rod_windows(idx, sp.mask, sp.offset, rod_frames(sp.mask, sp.offset, src_mm), gap, src_mm)
        return len(rods)

    def draw(self, head: str, n: int, rng: np.random.Generator, positive_fraction: float = 0.4, jitter: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(patches (n, 2, h, w), labels (n, outputs)) with about `positive_fraction` positives."""
        from inference.train.common import AugmentConfig, photometric

        items = self.items[head]
        pos = [i for i, it in enumerate(items) if it.positive]
        xs, ys = [], []
        aug = AugmentConfig(gamma=(0.7, 1.4), contrast=(0.6, 1.1), noise=0.03, blur_p=0.2)
        for _ in range(n):
            if pos and rng.random() < positive_fraction:
                it = items[pos[int(rng.integers(len(pos)))]]
            else:
                it = items[int(rng.integers(len(items)))]
            pixels, window, src_mm = self.images[it.image]
            fr = it.frame
            if jitter:
                ang = math.radians(rng.uniform(-6.0, 6.0))
                dx, dy = fr.direction
                dx, dy = dx * math.cos(ang) - dy * math.sin(ang), dx * math.sin(ang) + dy * math.cos(ang)
                if rng.random() < 0.5:
                    dx, dy = -dx, -dy
                shift = rng.normal(0.0, 1.0 / src_mm, size=2)
                fr = Frame((fr.centre[0] + float(shift[0]), fr.centre[1] + float(shift[1])), (dx, dy))
                mm = src_mm * float(np.exp(rng.uniform(-0.1, 0.1)))
            else:
                mm = src_mm
            patch = cut(pixels.astype(np.float32), window, it.mask, it.offset, fr, PATCH_OF[head], mm)
            if jitter:
                if rng.random() < 0.5:
                    patch = patch[:, ::-1, :].copy()
                patch[0] = photometric(patch[0], rng, aug)
            xs.append(patch)
            ys.append(it.labels)
        return np.stack(xs).astype(np.float32), np.stack(ys).astype(np.float32)

    def counts(self) -> dict[str, dict[str, int]]:
        """Items and positives per head and output."""
        out = {}
        for head, items in self.items.items():
            lab = np.array([it.labels for it in items]).reshape(-1, len(HEADS[head]))
            out[head] = {"items": len(items), **{c.value: int(lab[:, j].sum()) for j, c in enumerate(HEADS[head])}}
        return out


def rod_gap_xy(rod: np.ndarray, screws: np.ndarray, src_mm: float) -> tuple[float, float] | None:
    """(x, y) source pixels of a fractured rod's gap, or None when the rod does not show two pieces."""
    from inference.radiograph.hardware_targets import rod_gap

    sl = ndimage.find_objects(rod.astype(np.int32))[0]
    pad = int(math.ceil(6.0 / src_mm)) + 2
    r0, c0 = max(sl[0].start - pad, 0), max(sl[1].start - pad, 0)
    r1, c1 = sl[0].stop + pad, sl[1].stop + pad
    rod_c = rod[r0:r1, c0:c1]
    near = ndimage.binary_dilation(rod_c, iterations=max(1, int(round(3.0 / src_mm))))
    joined = rod_c | (near & screws[r0:r1, c0:c1])
    gap = rod_gap(rod_c, joined, max_gap_px=8.0 / src_mm)
    if gap is None:
        return None
    return (gap[1] + c0, gap[0] + r0)


def train_patch_net(bank: PatchBank, iterations: int, seed: int, log: Any, batch: int = 48, lr: float = 2e-3) -> Any:
    """Train the classifier on jittered patches (heads drawn in proportion 0.5 screw / 0.3 rod / 0.2 cage)."""
    import torch
    import torch.nn.functional as F

    from inference.radiograph.hardware_patches import build_patch_net
    from inference.train.common import cosine_lr

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = build_patch_net()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    heads = [h for h in ("screw", "rod", "cage") if bank.items[h]]
    weights = np.array([{"screw": 0.5, "rod": 0.3, "cage": 0.2}[h] for h in heads])
    weights = weights / weights.sum()
    net.train()
    losses: list[float] = []
    for step in range(iterations):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, iterations, lr, warmup=100)
        head = heads[int(rng.choice(len(heads), p=weights))]
        x, y = bank.draw(head, batch, rng)
        logits = net(torch.from_numpy(x), head)
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            log.info("patch classifier it %d loss %.4f", step + 1, float(np.mean(losses)))
            losses = []
    return net.eval()


def truth_label(sp_mask: np.ndarray, sp_offset: tuple[int, int], implants: np.ndarray) -> int:
    """The label (1-based) of the true implant covering most of a predicted one (>= 30 % of it), else 0."""
    rr, cc = np.nonzero(sp_mask)
    labels = implants[rr + sp_offset[0], cc + sp_offset[1]]
    labels = labels[labels > 0]
    if len(labels) < 0.3 * len(rr) or not len(labels):
        return 0
    return int(np.bincount(labels).argmax())


def match_truth(sp_mask: np.ndarray, sp_offset: tuple[int, int], sample: Any) -> Any | None:
    """The true implant spec covering most of a predicted implant (>= 30 % of it), else None."""
    k = truth_label(sp_mask, sp_offset, sample.implants)
    return sample.implant_specs[k - 1] if k else None


def found_pieces(model: Any, sample: Any, scored: bool = False) -> list[Any]:
    """The implants (`SourcePiece`s) the segmentation of `model` finds on a data-engine sample; `scored`: with
    their complication scores (`model.patch_net`, else the segmentation's complication maps)."""
    from inference.evaluate.hardware import sample_radiograph
    from inference.radiograph.hardware import place_pieces, score_pieces
    from inference.radiograph.hardware_post import find_pieces

    rad = sample_radiograph(sample)
    prob, scale = model.probabilities(rad.pixels, rad.pixel_spacing_mm)
    mm = rad.pixel_spacing_mm[0] / scale[0] if rad.pixel_spacing_mm else model.spacing_mm
    placed = place_pieces(prob, find_pieces(prob, mm, model.params), scale, rad.pixels.shape, model.params, mm * scale[0])
    if scored:
        score_pieces(prob, placed, scale, mm * scale[0], rad.pixels, model.patch_net)
    return placed


def complication_scores(model: Any, samples: list[Any]) -> dict[str, list[tuple[float, bool]]]:
    """Per complication, (score, truth) of every implant the model finds on `samples` (a found implant that
    matches no true one of its kind counts as a negative)."""
    out: dict[str, list[tuple[float, bool]]] = {}
    for sample in samples:
        for sp in found_pieces(model, sample, scored=True):
            spec = match_truth(sp.mask, sp.offset, sample)
            for comp in FAILURE_MODES[sp.piece.kind]:
                truth = spec is not None and spec.kind is sp.piece.kind and comp in spec.complications
                out.setdefault(comp.value, []).append((sp.piece.complication_scores.get(comp, 0.0), truth))
    return out


def youden(values: list[tuple[float, bool]], default: float) -> dict[str, Any]:
    """Threshold with the best Youden's J (sensitivity + specificity - 1), and the AUC."""
    scores = np.array([v[0] for v in values], dtype=float)
    truth = np.array([v[1] for v in values], dtype=bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    entry: dict[str, Any] = {"positives": n_pos, "negatives": n_neg}
    if n_pos < 3 or n_neg < 3:
        entry.update({"threshold": default, "note": "too few held-out instances to tune: default kept"})
        return entry
    best = (-1.0, default)
    for t in np.unique(np.round(scores, 3)):
        t = float(max(t, 0.05))
        pred = scores >= t
        j = pred[truth].mean() + (~pred[~truth]).mean() - 1.0
        if j > best[0] + 1e-9:
            best = (float(j), t)
    pred = scores >= best[1]
    ranks = scores.argsort().argsort() + 1.0
    auc = (ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    entry.update({"threshold": round(best[1], 4), "youden_j": round(best[0], 4), "sensitivity": round(float(pred[truth].mean()), 4),
                  "specificity": round(float((~pred[~truth]).mean()), 4), "auc": round(float(auc), 4)})
    return entry
