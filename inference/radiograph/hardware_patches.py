"""Second stage of the hardware model: complications judged on fine patches around each implant.

A lucent halo of 1-2.5 mm, a screw broken with a 1 mm gap, a rod gap or a cage sunk 2-5 mm into an
endplate are too small for the 1 mm segmentation grid, so every implant the first stage found is looked at
again at `PATCH_MM` per pixel, on patches cut from the source radiograph and turned to the implant:

* a pedicle screw: one patch along its axis (`SCREW_PATCH`, ~16 x 56 mm) -> P(loosening), P(breakage);
* a rod: windows every `ROD_STEP_MM` along its course (`ROD_PATCH`) -> P(fracture here); the rod's score is
  the highest window, whose centre is the evidence;
* an interbody cage: one upright patch around it with both endplates (`CAGE_PATCH`) -> P(subsidence).

Each patch has two channels: the image (scaled by the image's own 1st / 99.5th percentiles, so raw 12-16 bit
DICOM and the data engine's [0, 1] images match) and the implant's mask.  The classifier is a small CNN with
one linear head per implant kind (global average + max pooling, so patch sizes may differ per kind).

Everything but the network is numpy/scipy; torch is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from inference.radiograph.hardware_post import part_xy, rod_course
from inference.results import Complication, ImplantKind

if TYPE_CHECKING:
    import torch

PATCH_MM = 0.5
SCREW_PATCH = (32, 112)  # (across, along) patch pixels
ROD_PATCH = (32, 64)
CAGE_PATCH = (80, 80)
ROD_STEP_MM = 8.0
#: Outputs of each head, in order.
HEADS: dict[str, tuple[Complication, ...]] = {
    "screw": (Complication.SCREW_LOOSENING, Complication.SCREW_BREAKAGE),
    "rod": (Complication.ROD_FRACTURE,),
    "cage": (Complication.CAGE_SUBSIDENCE,),
}
HEAD_OF: dict[ImplantKind, str] = {ImplantKind.PEDICLE_SCREW: "screw", ImplantKind.ROD: "rod", ImplantKind.INTERBODY_CAGE: "cage"}


def intensity_window(pixels: np.ndarray) -> tuple[float, float]:
    """(low, high) intensity of an image for patch scaling: its 1st and 99.5th percentiles."""
    step = max(1, int(math.sqrt(pixels.size / 250_000)))
    sub = np.asarray(pixels[::step, ::step], dtype=np.float32)
    lo, hi = np.percentile(sub, (1.0, 99.5))
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


@dataclass(frozen=True)
class Frame:
    """Where a patch is cut: centre (x, y) and unit direction (x, y) of its long axis, source pixels."""

    centre: tuple[float, float]
    direction: tuple[float, float]


def cut(
    pixels: np.ndarray,
    window: tuple[float, float],
    mask: np.ndarray,
    mask_offset: tuple[int, int],
    frame: Frame,
    shape: tuple[int, int],
    src_mm: float,
    patch_mm: float = PATCH_MM,
) -> np.ndarray:
    """(2, rows, cols) float32 patch: scaled image and the implant mask, the long axis along the columns."""
    h, w = shape
    f = patch_mm / max(src_mm, 1e-6)
    dx, dy = frame.direction
    nx, ny = -dy, dx
    along = (np.arange(w, dtype=np.float32) + 0.5 - w / 2) * f
    across = (np.arange(h, dtype=np.float32) + 0.5 - h / 2) * f
    a, c = np.meshgrid(along, across)  # (h, w)
    xs = frame.centre[0] + a * dx + c * nx
    ys = frame.centre[1] + a * dy + c * ny
    lo, hi = window
    img = ndimage.map_coordinates(pixels, [ys - 0.5, xs - 0.5], order=1, mode="nearest").astype(np.float32)
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0)
    msk = ndimage.map_coordinates(mask.astype(np.float32), [ys - 0.5 - mask_offset[0], xs - 0.5 - mask_offset[1]], order=1, mode="constant", cval=0.0)
    return np.stack([img, msk.astype(np.float32)])


def axis_frame(mask: np.ndarray, offset: tuple[int, int]) -> Frame:
    """Frame along the principal axis of a mask (screws)."""
    xy = part_xy(mask, offset)
    centre = xy.mean(axis=0)
    if len(xy) < 2:
        return Frame((float(centre[0]), float(centre[1])), (1.0, 0.0))
    vals, vecs = np.linalg.eigh(np.cov((xy - centre).T))
    d = vecs[:, 1]
    return Frame((float(centre[0]), float(centre[1])), (float(d[0]), float(d[1])))


def rod_frames(mask: np.ndarray, offset: tuple[int, int], src_mm: float, step_mm: float = ROD_STEP_MM) -> list[Frame]:
    """Windows every `step_mm` along a rod: centres on the rod's course (row bands), directions its tangent."""
    xy = part_xy(mask, offset)
    if len(xy) < 3:
        return []
    pts = rod_course(xy, step_mm / max(src_mm, 1e-6))
    if len(pts) < 2:
        return [axis_frame(mask, offset)]
    frames = []
    for k, p in enumerate(pts):
        a = pts[max(k - 1, 0)]
        b = pts[min(k + 1, len(pts) - 1)]
        d = b - a
        norm = float(np.hypot(*d)) or 1.0
        frames.append(Frame((float(p[0]), float(p[1])), (float(d[0] / norm), float(d[1] / norm))))
    return frames


def cage_frame(mask: np.ndarray, offset: tuple[int, int]) -> Frame:
    """An upright frame (long axis = image rows) centred on a cage; the patch shows both endplates."""
    xy = part_xy(mask, offset)
    c = xy.mean(axis=0)
    return Frame((float(c[0]), float(c[1])), (0.0, 1.0))


# ------------------------------------------------------------------------------------------ network


def build_patch_net(width: int = 16) -> torch.nn.Module:
    """The complication classifier: a small CNN trunk and one linear head per implant kind."""
    import torch
    from torch import nn

    from inference.radiograph.network import double_conv as block

    w = width

    class PatchNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(*block(2, w), nn.MaxPool2d(2), *block(w, 2 * w), nn.MaxPool2d(2),
                                       *block(2 * w, 4 * w), nn.MaxPool2d(2), *block(4 * w, 4 * w))
            self.heads = nn.ModuleDict({k: nn.Linear(8 * w, len(v)) for k, v in HEADS.items()})

        def forward(self, x: torch.Tensor, head: str) -> torch.Tensor:
            f = self.trunk(x)
            f = torch.cat([f.mean(dim=(2, 3)), f.amax(dim=(2, 3))], dim=1)
            return self.heads[head](f)

    return PatchNet()


def predict(net: torch.nn.Module, patches: Sequence[np.ndarray], head: str, batch: int = 64) -> np.ndarray:
    """Probabilities (n, outputs of `head`) for patches of one kind."""
    import torch

    if not patches:
        return np.zeros((0, len(HEADS[head])), dtype=np.float32)
    out = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch):
            x = torch.from_numpy(np.stack(patches[i : i + batch]).astype(np.float32))
            out.append(torch.sigmoid(net(x, head)).numpy())
    return np.concatenate(out, axis=0)


@dataclass
class Scored:
    """Complication scores of one implant and, for a rod, where its most suspicious window is."""

    scores: dict[Complication, float]
    where: tuple[float, float] | None = None  # (x, y) source pixels


def score_implants(
    net: torch.nn.Module,
    pixels: np.ndarray,
    items: Sequence[tuple[ImplantKind, np.ndarray, tuple[int, int]]],
    src_mm: float,
    window: tuple[float, float] | None = None,
) -> list[Scored]:
    """Scores of every (kind, mask crop, offset) implant on `pixels` (same grid); kinds without a head get {}."""
    window = window or intensity_window(pixels)
    by_head: dict[str, list[tuple[int, np.ndarray]]] = {k: [] for k in HEADS}
    rod_windows: list[tuple[int, Frame]] = []
    for i, (kind, mask, offset) in enumerate(items):
        head = HEAD_OF.get(kind)
        if head == "screw":
            by_head["screw"].append((i, cut(pixels, window, mask, offset, axis_frame(mask, offset), SCREW_PATCH, src_mm)))
        elif head == "cage":
            by_head["cage"].append((i, cut(pixels, window, mask, offset, cage_frame(mask, offset), CAGE_PATCH, src_mm)))
        elif head == "rod":
            for fr in rod_frames(mask, offset, src_mm):
                by_head["rod"].append((i, cut(pixels, window, mask, offset, fr, ROD_PATCH, src_mm)))
                rod_windows.append((i, fr))
    out = [Scored({}) for _ in items]
    for head, pairs in by_head.items():
        if not pairs:
            continue
        probs = predict(net, [p for _, p in pairs], head)
        for k, (i, _) in enumerate(pairs):
            if head == "rod":
                s = float(probs[k, 0])
                if s >= out[i].scores.get(Complication.ROD_FRACTURE, -1.0):
                    out[i].scores[Complication.ROD_FRACTURE] = round(s, 4)
                    out[i].where = rod_windows[k][1].centre
            else:
                out[i].scores = {c: round(float(probs[k, j]), 4) for j, c in enumerate(HEADS[head])}
    return out


def load_patch_net(state: dict[str, Any], width: int = 16) -> torch.nn.Module:
    """A classifier from a state dict (eval mode)."""
    net = build_patch_net(width)
    net.load_state_dict(state)
    return net.eval()
