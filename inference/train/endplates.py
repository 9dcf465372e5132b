"""Train the six-point morphometry stage (`inference.radiograph.endplates`) into a vertebra model folder.

    python -m inference.train.endplates --cache ../cache/synth-lat-fractures --model FOLDER

`make train-vertebrae` runs it last; on its own it adds (or replaces) the stage in a model folder.

Data: every lateral DRR body of the cache whose six endplate points the data engine projected (complete
bodies, at least 95 % inside the exposed field), with compression deformities where the engine made them.
Crops are cut around the TRUE centroid with the chain's step and axis, jittered (centre, angle, scale) so the
network tolerates the vertebra model's centroids; mirrored crops teach both facing directions.  Every
``--val-every``-th sample is held out: its point and height errors (mm) pick the checkpoint and go to
model.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.radiograph.endplates import (
    CROP_PX,
    SIDE_POINTS,
    CropFrame,
    body_crop,
    build_net,
    chain_frames,
    crop_targets,
)
from inference.train import common

log = logging.getLogger("inference.train.endplates")

#: Jitter of the training crops, as the vertebra model's centroids and chain axes differ from the truth.
CENTRE_JITTER = 0.12  # of the crop side, along and across (the node re-cuts around its first answer)
ANGLE_JITTER_DEG = 12.0
SCALE_JITTER = 0.2  # log-uniform factor on the crop side
MIN_VISIBLE = 0.95
MIN_HEIGHT_MM = 5.0
#: Share of each batch drawn from deformed bodies (about 9 % of the bodies): trained on the natural mix, the
#: network placed the points of a normal body on every body (held-out severe wedges came out 8 % lower
#: in front, normal ones 6 %).
FRACTURED_SHARE = 0.3
#: Weight of the loss on the height ratios computed from the points (anterior / posterior, middle /
#: posterior): the grade is a ratio, and a point error that keeps the ratio costs the grade nothing.
RATIO_WEIGHT = 5.0


@dataclass(frozen=True)
class Item:
    """One body of one sample: its truth frame, six points (source x, y) and anterior side."""

    sample: int
    frame: CropFrame
    corners: dict[str, tuple[float, float]]
    spacing_mm: float
    heights_mm: tuple[float, float, float]
    grade: int


def sample_items(index: int, sample: Any) -> list[Item]:
    """Training items of one lateral sample (the chain of its true non-sacral bodies, head to foot)."""
    from inference.results import LEVELS

    if sample.view != "LAT":
        return []
    chain = sorted((v for v in sample.vertebrae if v.level and v.level != "S1"), key=lambda v: LEVELS.index(v.level))
    frames = chain_frames([v.centroid for v in chain])
    out = []
    for v, f in zip(chain, frames, strict=False):
        if v.corners is None or v.heights_mm is None or v.visible_fraction < MIN_VISIBLE:
            continue
        if min(v.heights_mm) < MIN_HEIGHT_MM:  # the 3D measurement missed the body's rim (2 % of bodies)
            continue
        out.append(Item(index, f, dict(v.corners), float(sample.pixel_spacing_mm[0]), tuple(v.heights_mm), int(v.grade or 0)))
    return out


def collect(cache: Path, val_every: int, exclude_sources: set[str]) -> tuple[list[np.ndarray], list[Item], list[Item]]:
    """(images, train items, held-out items)."""
    from inference.synth.build import iter_cache

    images: list[np.ndarray] = []
    train: list[Item] = []
    held: list[Item] = []
    for k, sample in enumerate(iter_cache(cache)):
        if str((sample.meta or {}).get("source", "")) in exclude_sources:
            continue
        items = sample_items(len(images), sample)
        if not items:
            continue
        images.append(np.asarray(sample.image, dtype=np.float32))
        (held if k % val_every == 0 else train).extend(items)
    return images, train, held


def high_anterior(item: Item, frame: CropFrame) -> bool:
    """Does anterior lie toward the crop's higher columns?"""
    uv = frame.to_crop(np.array([item.corners["anterior_superior"], item.corners["posterior_superior"]]))
    return bool(uv[0, 0] > uv[1, 0])


def jittered(frame: CropFrame, rng: np.random.Generator) -> CropFrame:
    """The frame moved, turned and scaled at random (training)."""
    t = math.radians(rng.uniform(-ANGLE_JITTER_DEG, ANGLE_JITTER_DEG))
    ax, ay = frame.axis
    axis = (ax * math.cos(t) - ay * math.sin(t), ax * math.sin(t) + ay * math.cos(t))
    side = frame.side_px * math.exp(rng.uniform(-SCALE_JITTER, SCALE_JITTER))
    du, dv = rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, 2) * frame.side_px
    cx, cy = frame.across
    centre = (frame.centre[0] + du * cx + dv * axis[0], frame.centre[1] + du * cy + dv * axis[1])
    return CropFrame(centre, axis, side)


def make_example(images: list[np.ndarray], item: Item, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, float]:
    """(crop, targets (6, 2) crop units, 1.0 if anterior toward higher columns) - augmented with `rng`."""
    frame = item.frame if rng is None else jittered(item.frame, rng)
    crop = body_crop(images[item.sample], frame)
    high = high_anterior(item, frame)
    target = crop_targets(frame, item.corners, high)
    if rng is not None:
        if rng.random() < 0.5:  # mirror: the patient faces the other way
            crop = crop[:, ::-1]
            target = target.copy()
            target[:, 0] = -target[:, 0]
            target = target[[4, 5, 2, 3, 0, 1]]  # low <-> high
            high = not high
        crop = np.clip(crop, 0.0, 1.0) ** rng.uniform(0.6, 1.6)
        if rng.random() < 0.3:
            from scipy import ndimage

            crop = ndimage.gaussian_filter(crop, rng.uniform(0.3, 1.2))
        crop = crop * rng.uniform(0.8, 1.0) + rng.uniform(0.0, 0.1) + rng.normal(0.0, rng.uniform(0.0, 0.04), crop.shape)
    return np.ascontiguousarray(crop, dtype=np.float32), target.astype(np.float32), float(high)


def evaluate(net: Any, images: list[np.ndarray], items: list[Item]) -> dict[str, float]:
    """Held-out errors at the truth frame: mean point error and height MAE (mm), anterior side accuracy."""
    from inference.radiograph.endplates import predict

    if not items:
        return {}
    net.eval()
    crops, targets, sides = zip(*(make_example(images, it, None) for it in items), strict=True)
    pts, p_high = predict(net, np.stack(crops))
    half_mm = np.array([it.frame.side_px / 2 * it.spacing_mm for it in items])
    err = np.linalg.norm(pts - np.stack(targets), axis=-1) * half_mm[:, None]

    def heights(p: np.ndarray, high: np.ndarray) -> np.ndarray:
        h = np.linalg.norm(p[:, 1::2] - p[:, 0::2], axis=-1) * half_mm[:, None]  # low, middle, high
        return np.where(high[:, None], h[:, ::-1], h)  # -> anterior, middle, posterior

    truth_high = np.array(sides) > 0.5
    h_pred = heights(pts, truth_high)
    h_true = heights(np.stack(targets), truth_high)
    r_pred = h_pred[:, :2] / np.maximum(h_pred[:, 2:], 1e-6)
    r_true = h_true[:, :2] / np.maximum(h_true[:, 2:], 1e-6)
    return {
        "bodies": len(items),
        "point_error_mm": round(float(err.mean()), 3),
        "ratio_mae": round(float(np.abs(r_pred - r_true).mean()), 4),
        "height_mae_mm": round(float(np.abs(h_pred - h_true).mean()), 3),
        "height_mae_vs_3d_mm": round(float(np.abs(h_pred - np.array([it.heights_mm for it in items])).mean()), 3),
        "side_accuracy": round(float(np.mean((p_high > 0.5) == truth_high)), 4),
    }


def _ratios(coords: Any, high: Any) -> Any:
    """(anterior / posterior, middle / posterior) height ratios of (n, 12) point coordinates (torch), the
    anterior side given by `high` (n,) bool."""
    import torch

    p = coords.reshape(-1, len(SIDE_POINTS), 2)
    h = (p[:, 1::2] - p[:, 0::2]).norm(dim=-1).clamp_min(0.05)  # low, middle, high (crop units)
    ant = torch.where(high, h[:, 2], h[:, 0])
    post = torch.where(high, h[:, 0], h[:, 2])
    return torch.stack([ant / post, h[:, 1] / post], dim=1)


def train(images: list[np.ndarray], items: list[Item], held: list[Item], iterations: int, seed: int, batch: int = 64,
          lr: float = 2e-3, width: int = 24, work: Path | None = None) -> tuple[Any, dict[str, Any]]:
    """Train; keep the checkpoint with the lowest held-out height error."""
    import torch

    rng = np.random.default_rng(seed)
    fractured = [i for i, it in enumerate(items) if it.grade > 0]
    net = build_net(width)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    best: dict[str, Any] = {"score": math.inf}
    t0 = time.time()
    for it in range(1, iterations + 1):
        net.train()
        for g in opt.param_groups:
            g["lr"] = common.cosine_lr(it, iterations, lr, warmup=100)
        picks = rng.integers(0, len(items), batch)
        if fractured:
            n = int(round(FRACTURED_SHARE * batch))
            picks[:n] = rng.choice(fractured, n)
        xs, ys, ss = zip(*(make_example(images, items[i], rng) for i in picks), strict=True)
        x = torch.from_numpy(np.stack(xs)[:, None])
        y = torch.from_numpy(np.stack(ys).reshape(batch, -1))
        s = torch.tensor(ss)
        out = net(x)
        points, side = out[:, :-1], out[:, -1]
        f = torch.nn.functional
        loss = (
            f.smooth_l1_loss(points, y, beta=0.02) * 10
            + f.binary_cross_entropy_with_logits(side, s)
            + RATIO_WEIGHT * f.smooth_l1_loss(_ratios(points, s > 0.5), _ratios(y, s > 0.5), beta=0.02)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 250 == 0 or it == iterations:
            m = evaluate(net, images, held)
            log.info("iteration %d loss %.4f held-out %s (%.1f min)", it, float(loss.detach()), m, (time.time() - t0) / 60)
            score = m.get("height_mae_mm", math.inf) + 10.0 * m.get("ratio_mae", math.inf) + 2.0 * (1.0 - m.get("side_accuracy", 0.0))
            if score < best["score"]:
                best = {"score": score, "iteration": it, "metrics": m, "state": {k: v.clone() for k, v in net.state_dict().items()}}
                if work is not None:
                    common.save_checkpoint(work / "endplates-best.pt", state=best["state"], iteration=it, metrics=m)
    net.load_state_dict(best["state"])
    return net.eval(), {"iteration": best["iteration"], "held_out": best["metrics"], "minutes": round((time.time() - t0) / 60, 1)}


def add_stage(model_folder: Path, cache: Path, val_every: int, iterations: int, seed: int, command: str,
              exclude_sources: Set[str] = frozenset(), work: Path | None = None) -> dict[str, Any]:
    """Train the stage and write it into the model folder (weights.pt gains "endplates"; model.json its
    sha256, version and training record; its metrics are cleared: the evaluation must run again)."""
    from inference.radiograph import network

    t0 = time.time()
    images, items, held = collect(cache, val_every, set(exclude_sources))
    log.info("bodies: train %d, held out %d (%d images, %.0f s)", len(items), len(held), len(images), time.time() - t0)
    if not items:
        raise SystemExit(f"{cache}: no lateral bodies with endplate points")
    net, record = train(images, items, held, iterations, seed, work=work)
    info = {
        "command": command,
        "cache": str(cache),
        "iterations": iterations,
        "minutes": round((time.time() - t0) / 60, 1),
        "parameters": network.parameter_count(net),
        "bodies": {"train": len(items), "held_out": len(held),
                   "fractured_train": sum(1 for i in items if i.grade > 0)},
        **record,
        "excluded_sources": sorted(exclude_sources),
    }
    meta = common.add_stage_weights(model_folder, "endplates", net.state_dict())
    meta["format"] = "torch: {'segmentation': U-Net state dict, 'endplates': six-point morphometry CNN state dict} (or the U-Net state dict alone)"
    meta.setdefault("architecture", {})["endplates"] = {"width": 24, "crop_px": CROP_PX, "points": list(SIDE_POINTS),
                                                     "network": "4 conv blocks + linear head: 12 coordinates and a side logit"}
    meta.setdefault("training", {})["endplates"] = info
    common.write_json(model_folder / "model.json", meta)
    log.info("endplate stage: %s; wrote %s (%s)", record, model_folder, meta["version"])
    return info


def copy_stage(model_folder: Path, source: Path) -> dict[str, Any]:
    """Put the six-point stage of the vertebra model folder `source` into `model_folder`, not trained again: the
    stage learns from crops cut around TRUE centroids of synthetic laterals (no real film, no output of the
    segmentation network), so a stage trained beside one network serves another. model.json records where it
    came from; its metrics are cleared (the evaluation must run again, with the new network's centroids)."""
    import torch

    from inference.registry import ModelSpec

    if source.resolve() == model_folder.resolve():
        raise SystemExit(f"--copy-from: {source} is the folder the stage would be copied into")
    spec = ModelSpec.read(source)
    spec.verify()  # the weights are the ones its model.json describes
    src_meta = spec.metadata
    states = torch.load(str(spec.weights), map_location="cpu", weights_only=True)
    record = (src_meta.get("training") or {}).get("endplates")
    if not isinstance(states, dict) or "endplates" not in states or not record:
        raise SystemExit(f"{source}: it holds no six-point stage (weights and training record)")
    meta = common.add_stage_weights(model_folder, "endplates", states["endplates"])
    meta["format"] = src_meta.get("format", meta.get("format"))
    meta.setdefault("architecture", {})["endplates"] = src_meta["architecture"]["endplates"]
    info = {**record, "copied_from": {"model": str(source), "version": src_meta.get("version")}}
    meta.setdefault("training", {})["endplates"] = info
    common.write_json(model_folder / "model.json", meta)
    log.info("endplate stage copied from %s %s; wrote %s (%s)", source, src_meta.get("version"), model_folder, meta["version"])
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.train.endplates", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="data-engine cache with lateral views (.npz shards)")
    ap.add_argument("--copy-from", type=Path, default=None, metavar="MODEL_FOLDER",
                    help="no training: copy the stage of this vertebra model folder (it does not depend on the network)")
    ap.add_argument("--model", type=Path, required=True, help="vertebra model folder to add the stage to")
    ap.add_argument("--iterations", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--val-every", type=int, default=10, help="every n-th cache sample is held out")
    ap.add_argument("--exclude-sources", default="", help="comma list of CT sources left out (leave-one-patient-out)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the best checkpoint")
    args = ap.parse_args(argv)
    common.setup_logging()
    common.setup(args.seed, args.threads)
    if not (args.model / "model.json").is_file():
        ap.error(f"--model: {args.model}/model.json not found")
    if args.copy_from is not None:
        copy_stage(args.model, args.copy_from)
        return 0
    if args.cache is None:
        ap.error("--cache is needed to train the stage (or --copy-from to copy one)")
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    command = "python -m inference.train.endplates " + " ".join(sys.argv[1:] if argv is None else argv)
    add_stage(args.model, args.cache, args.val_every, args.iterations, args.seed, command,
              {s for s in args.exclude_sources.split(",") if s}, args.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
