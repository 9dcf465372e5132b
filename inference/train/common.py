"""Shared training utilities: reproducible set-up, logging, checkpoints, augmentation and losses.

Augmentation runs in torch on the (already network-scale) image and its target/weight maps together, so
one random affine moves labels exactly with the pixels.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from inference.registry import sha256_file
from inference.splits import TRAINING_SCHEME, scheme_of

log = logging.getLogger("inference.train")


def setup(seed: int, threads: int = 2) -> None:
    """Fix seeds, limit torch to `threads` (the node's 2 cores), deterministic algorithms where cheap."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def setup_logging(log_file: Path | None = None) -> None:
    """Log to stderr and, if given, to `log_file` (appending, so resumed runs keep one log)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True)


class Stopwatch:
    """Wall-clock budget of a run (resumed runs add the time already spent)."""

    def __init__(self, spent_s: float = 0.0) -> None:
        self.start = time.monotonic() - spent_s

    @property
    def elapsed(self) -> float:
        """Seconds since the (possibly resumed) start."""
        return time.monotonic() - self.start


def save_checkpoint(path: Path, **state: Any) -> None:
    """Atomically write a checkpoint (tmp + rename) including all RNG states."""
    state = dict(state)
    state["rng"] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """A checkpoint written by `save_checkpoint` (RNG states restored), or None if there is none."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    rng = state.pop("rng", None)
    if rng:
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
    return state


def split_scheme(requested: str | None, *, work: Path, fresh: bool, init_weights: Path | None, legacy: str) -> str:
    """The real films' split scheme of a training run (`inference.splits`): the scheme of what the run
    continues (its checkpoint in `work`, resumed or re-tuned; else the model whose model.json describes
    `init_weights`),
    else `requested`, else `TRAINING_SCHEME`.  `legacy`: the scheme of a checkpoint or model that names none.
    Continuing under another scheme than the one asked for stops the run: what it continues learnt from films
    the asked scheme holds out, and its evaluation would call them unseen."""
    fixed, what = None, ""
    checkpoint = work / "checkpoint.pt"
    if not fresh and checkpoint.is_file():
        fixed = torch.load(checkpoint, map_location="cpu", weights_only=False).get("split_scheme", legacy)
        what = f"the checkpoint in {work}"
    elif init_weights is not None and (meta := describing_meta(init_weights)) is not None:
        # (Weights no model.json describes leave the scheme free: the trainers warn that their films are unknown.)
        fixed = scheme_of(meta, legacy)
        what = f"the model of {init_weights}"
    if fixed is not None and requested is not None and requested != fixed:
        raise SystemExit(f"{what} was trained with split scheme {fixed}, not {requested}: pass --split-scheme"
                         f" {fixed}, or start afresh (--fresh, no --init-weights)")
    return fixed or requested or TRAINING_SCHEME


def describing_meta(weights: Path, sha256: str | None = None) -> dict[str, Any] | None:
    """The model.json beside `weights` if it describes that file (same sha256; `sha256`: its digest, when known
    already), else None (a checkpoint, a bare state dict, weights copied over another model's folder)."""
    meta_path = weights.parent / "model.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("sha256") != (sha256 or sha256_file(weights)):
        return None
    return meta


def init_model_record(init_weights: Path, sha256: str) -> dict[str, Any] | None:
    """The record (name, version, training) of the model whose weights file `init_weights` (digest `sha256`) is,
    read before a fine-tune may overwrite its folder; None for a checkpoint, or a file its folder's model.json
    does not describe or describes without a training record."""
    meta = describing_meta(init_weights, sha256)
    if meta is None or not meta.get("training"):
        return None
    return {key: meta.get(key) for key in ("name", "version", "training")}


def cache_split_scheme(cache: Path) -> str | None:
    """The split scheme whose "train" films a data-engine cache drew implant overlays on (None: it has none, or
    is not built yet)."""
    if not (cache / "manifest.json").is_file():
        return None
    manifest = json.loads((cache / "manifest.json").read_text())
    real = manifest.get("provenance", {}).get("real_images", {})
    if not real.get("files"):
        return None
    return str(real.get("split_scheme", "real-v1"))  # caches built before schemes were recorded


def check_cache_scheme(cache: Path, scheme: str) -> None:
    """Refuse a cache whose implant overlays drew on real films by another split scheme: some of them would be
    the run's val or test films, learnt from with their boxes."""
    cache_scheme = cache_split_scheme(cache)
    if cache_scheme is not None and cache_scheme != scheme:
        raise SystemExit(f"{cache} draws implants onto real films of the {cache_scheme} split, the run uses {scheme}:"
                         f" rebuild it with --split-scheme {scheme}, or train with --split-scheme {cache_scheme}")


def write_json(path: Path, data: Any) -> None:
    """Pretty JSON, written atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


#: Reporting switches: outputs an evaluation showed would mislead, switched off in model.json after training
#: (same weights). Booleans are off when False; lists name what is off.
SWITCHES_OFF_WHEN_FALSE = (("postprocess", "name_levels"), (None, "fracture_grading"))
SWITCHES_LISTING_OFF = (("postprocess", "not_assessed"), ("postprocess", "not_named"))


def carry_switches(meta: dict[str, Any], source: Path | None) -> list[str]:
    """Keep off, in the model.json `meta` a training run is about to write, what the model folder `source` (the
    one the run replaces) switched off, with its reasons (``switched_off``): a retrain must not switch an
    output back on that a clinical evaluation switched off; only a person who read the new evaluation does,
    by editing model.json. Returns what was kept off (for the log); nothing without a `source` model."""
    if source is None or not (source / "model.json").is_file():
        return []
    old = json.loads((source / "model.json").read_text())
    if old.get("name") != meta.get("name"):
        raise SystemExit(f"{source} holds {old.get('name')!r}, not {meta.get('name')!r}: its switches do not apply")
    kept: list[str] = []
    for section, key in SWITCHES_OFF_WHEN_FALSE:
        if ((old.get(section) or {}) if section else old).get(key) is False:
            (meta.setdefault(section, {}) if section else meta)[key] = False
            kept.append(f"{section}.{key}" if section else key)
    for section, key in SWITCHES_LISTING_OFF:
        off = (old.get(section) or {}).get(key) or []
        if off:
            post = meta.setdefault(section, {})
            post[key] = sorted(set(post.get(key) or []) | set(off))
            kept += [f"{section}.{key}: {name}" for name in off]
    if old.get("switched_off"):
        meta["switched_off"] = {**old["switched_off"], **(meta.get("switched_off") or {})}
        meta["switched_off_in"] = old.get("switched_off_in") or old.get("version")
    return kept


def switches_source(value: str | None, out: Path, name: str) -> Path | None:
    """``--switches-from``, resolved and checked before any training (a bad one must not cost the run): a model
    folder of model `name`; "none" (None: every output on); unset: the --out folder the run replaces, or, when
    that holds no model yet, the installed model of that name (the one the new weights would replace)."""
    if value is not None and value.strip().lower() == "none":
        log.warning("--switches-from none: every output of the model written is on; evaluate it before shipping")
        return None
    if value is not None:
        source = Path(value)
    elif (out / "model.json").is_file():
        source = out
    else:
        from inference.registry import ModelRegistry

        try:
            source = ModelRegistry().spec(name).folder
        except Exception:  # noqa: BLE001 - no installed model: nothing was ever switched off
            log.warning("no model %s installed and none in %s: nothing to keep switched off", name, out)
            return None
    if not (source / "model.json").is_file():
        raise SystemExit(f"--switches-from: {source}/model.json not found")
    found = json.loads((source / "model.json").read_text()).get("name")
    if found != name:
        raise SystemExit(f"--switches-from: {source} holds {found!r}, not {name!r}: its switches do not apply")
    return source


def write_model_files(out: Path, weights: Path, meta: dict[str, Any], switches_from: Path | None) -> None:
    """Copy `weights` to ``out/weights.pt`` and write `meta` as ``out/model.json``, with what `switches_from`
    switched off still off (`carry_switches`). Everything that can fail comes first: the folder never holds new
    weights under its old model.json."""
    if kept := carry_switches(meta, switches_from):
        log.info("kept switched off, as in %s: %s", switches_from, "; ".join(kept))
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(weights, out / "weights.pt")
    write_json(out / "model.json", meta)


SWITCHES_HELP = ("model folder whose switched-off outputs (and their reasons) stay off in the model written; default: "
                 "--out, the model this run replaces (or the installed model when --out holds none yet); 'none': "
                 "every output on (evaluate before shipping)")


def cache_role(index: int, sample: Any, exclude_sources: set[str], val_every: int) -> str | None:
    """Where the `index`-th sample of a data-engine cache goes in the hardware stages' one split: "held_out"
    (every `val_every`-th), "train", or None when its CT source is left out (leave-one-patient-out)."""
    if str((sample.meta or {}).get("source", "")) in exclude_sources:
        return None
    return "held_out" if index % val_every == 0 else "train"


def add_stage_weights(folder: Path, key: str, state: dict[str, Any], wrap_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Put one later stage's state dict under `key` in a model folder's weights.pt (a bare U-Net state dict
    becomes ``{"segmentation": ..., **wrap_extra}``) and return the folder's model.json metadata with the new
    sha256 and version and its metrics cleared (the weights changed: the evaluation must run again).  The
    caller adds its stage's entries and writes the metadata with `write_json`."""
    import torch

    from inference.registry import sha256_file

    weights = folder / "weights.pt"
    states = torch.load(str(weights), map_location="cpu", weights_only=True)
    if "segmentation" not in states:
        states = {"segmentation": states, **(wrap_extra or {})}
    states[key] = state
    torch.save(states, weights)
    meta = json.loads((folder / "model.json").read_text())
    digest = sha256_file(weights)
    meta.update(sha256=digest, version=f"1.0+{digest[:8]}", metrics={})
    return meta


# ---------------------------------------------------------------------------------------- augmentation


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation."""

    crop: tuple[int, int] = (288, 192)  # (rows, columns) of a training crop
    scale: tuple[float, float] = (0.75, 1.35)  # zoom (log-uniform)
    rotate_deg: float = 12.0
    flip: bool = True
    gamma: tuple[float, float] = (0.6, 1.7)
    contrast: tuple[float, float] = (0.45, 1.15)
    noise: float = 0.06
    blur_p: float = 0.3
    spine_bias: float = 0.8  # probability that the crop is centred near a vertebra


def _source_coords(
    crop: tuple[int, int], centre_rc: tuple[float, float], zoom: float, angle: float, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Source (row, column) index coordinates sampled by each output crop pixel."""
    h, w = crop
    yo = np.arange(h, dtype=np.float32)[:, None] + 0.5 - h / 2
    xo = np.arange(w, dtype=np.float32)[None, :] + 0.5 - w / 2
    if flip:
        xo = -xo
    ca, sa = math.cos(angle), math.sin(angle)
    xs = (ca * xo - sa * yo) / zoom + centre_rc[1] - 0.5
    ys = (sa * xo + ca * yo) / zoom + centre_rc[0] - 0.5
    return ys, xs


def augment(
    image: np.ndarray,
    target: np.ndarray,
    weight: np.ndarray,
    rng: np.random.Generator,
    config: AugmentConfig,
    anchors: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random crop/zoom/rotation/flip + photometric change of (image, targets, weights).

    `anchors` (n, 2) are (row, column) points the crop likes to be centred near (vertebra centres).
    Returns tensors (1, h, w), (C, h, w), (C, h, w); outside the source image targets are 0 with weight 1.
    Runs in numpy/scipy (single-threaded): torch's thread pool is slow for many small operations.
    """
    from scipy import ndimage

    src_shape = image.shape
    if anchors is not None and len(anchors) and rng.random() < config.spine_bias:
        centre = anchors[rng.integers(len(anchors))] + rng.normal(0, 0.15 * min(config.crop), size=2)
    else:
        centre = np.array([rng.uniform(0, src_shape[0]), rng.uniform(0, src_shape[1])])
    zoom = float(np.exp(rng.uniform(np.log(config.scale[0]), np.log(config.scale[1]))))
    angle = math.radians(rng.uniform(-config.rotate_deg, config.rotate_deg))
    flip = bool(config.flip and rng.random() < 0.5)
    ys, xs = _source_coords(config.crop, (float(centre[0]), float(centre[1])), zoom, angle, flip)
    ys, xs = np.broadcast_arrays(ys, xs)
    coords = [ys, xs]
    inside = (ys >= -0.5) & (ys <= src_shape[0] - 0.5) & (xs >= -0.5) & (xs <= src_shape[1] - 0.5)
    img = ndimage.map_coordinates(image.astype(np.float32), coords, order=1, mode="nearest")
    img = np.where(inside, img, 0.0).astype(np.float32)
    n_ch = target.shape[0]
    tgt = np.zeros((n_ch, *config.crop), dtype=np.float32)
    wgt = np.ones((n_ch, *config.crop), dtype=np.float32)
    for ch in range(n_ch):
        t = ndimage.map_coordinates(target[ch], coords, order=1, mode="nearest")
        w = ndimage.map_coordinates(weight[ch], coords, order=1, mode="nearest")
        tgt[ch] = np.where(inside, t, 0.0)
        wgt[ch] = np.where(inside, (w > 0.99).astype(np.float32), 1.0)
    out = photometric(img, rng, config)
    return torch.from_numpy(out[None]), torch.from_numpy(tgt), torch.from_numpy(wgt)


def photometric(img: np.ndarray, rng: np.random.Generator, config: AugmentConfig) -> np.ndarray:
    """Random gamma, contrast/brightness, blur and noise on a [0, 1] image (float32)."""
    from scipy import ndimage

    img = np.clip(img, 0.0, 1.0)
    gamma = float(np.exp(rng.uniform(np.log(config.gamma[0]), np.log(config.gamma[1]))))
    img = img**gamma
    c = rng.uniform(*config.contrast)
    b = rng.uniform(0, 1 - c) if c < 1 else rng.uniform(-0.1, 0.1)
    img = img * c + b
    if rng.random() < config.blur_p:
        img = ndimage.gaussian_filter(img, rng.uniform(0.5, 1.3))
    if config.noise > 0:
        img = img + rng.normal(0.0, float(rng.uniform(0, config.noise)), size=img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# -------------------------------------------------------------------------------------------- losses


def masked_bce_dice(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, pos_weight: float = 1.0) -> torch.Tensor:
    """Weighted BCE + soft Dice over one channel of a batch (B, h, w); 0 where nothing is known.

    `pos_weight` > 1 makes missed positive pixels cost more (small structures such as the sacrum)."""
    total = weight.sum()
    if total < 1:
        return logits.sum() * 0.0
    pw = torch.tensor(pos_weight, dtype=logits.dtype)
    bce = (F.binary_cross_entropy_with_logits(logits, target, reduction="none", pos_weight=pw) * weight).sum() / total
    p = torch.sigmoid(logits) * weight
    t = target * weight
    inter = (p * t).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + t.sum() + 1)
    return bce + dice


def centre_focal(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet-style penalty-reduced focal loss for Gaussian peak targets, with an ignore weight."""
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 0.8).float() * weight
    neg = (1 - (target >= 0.8).float()) * weight
    pos_loss = -torch.log(p) * (1 - p) ** alpha * pos
    neg_loss = -torch.log(1 - p) * p**alpha * (1 - target) ** beta * neg
    n_pos = pos.sum().clamp(min=1.0)
    return (pos_loss.sum() + neg_loss.sum()) / n_pos


def cosine_lr(step: int, total: int, base: float, warmup: int = 200, floor: float = 0.02) -> float:
    """Linear warm-up then cosine decay to `floor` * base."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


def batches(indices: list[int], batch_size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless shuffled batches of `indices`."""
    while True:
        order = list(rng.permutation(indices))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield order[i : i + batch_size]
