"""Training targets for the vertebra network: what each kind of image can and cannot teach.

Every function returns ``(target, weight)``, float32 arrays of shape ``(len(CHANNELS), H, W)``; weight 0
means "unknown here, no loss".

* Real AP radiographs (boxes, no names): the box centre gives the centre heatmap; a rounded ellipse inside
  the box is vertebral body (and vertebra); the rim between that and the box is unknown; outside the boxes
  is background, except a band above the top box along the spine (unlabelled cervical vertebrae), which
  is unknown.  The sacrum channel is unknown except: background inside and above the boxes, and
  (``sacrum_hint``) the first sacral body one step below the bottom box, because the boxes end at L5 in
  this export (checked on overlays; see the model card); below the bottom box there is then no vertebra.
  Without the hint the band below the bottom box is unknown too.  The ``l5`` heatmap, with the hint, has its
  one peak on the bottom box (L5) and is background everywhere else; without the hint it is unknown.
* Synthetic samples (DRRs and phantoms, full label maps): everything is supervised; ``l5`` peaks on the
  L5 body when it is in the image, and is unknown where L5 is cut off or where bodies carry no level
  name (UNNAMED, as on real images with rendered implants).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference.radiograph.network import BODY, CENTRE, CHANNELS, L5, SACRUM, VERTEBRA

L5_CODE = 24  # 1 + LEVELS.index("L5")
S1_CODE = 25  # 1 + LEVELS.index("S1")
IGNORE, UNNAMED = -1, -2
HEAT_SIGMA_FRACTION = 0.2  # centre Gaussian sigma as a fraction of the body's smaller side
MIN_SIGMA = 1.2
#: Where the first sacral body lies on real AP radiographs: this many L4->L5 steps below L5's centre.
S1_STEPS_BELOW_L5 = 1.15


def gaussian_into(heat: np.ndarray, row: float, col: float, sigma: float) -> None:
    """Max-combine a Gaussian peak (1 at the centre) into `heat` in place."""
    radius = int(np.ceil(3 * sigma))
    r0, r1 = max(int(row) - radius, 0), min(int(row) + radius + 2, heat.shape[0])
    c0, c1 = max(int(col) - radius, 0), min(int(col) + radius + 2, heat.shape[1])
    if r0 >= r1 or c0 >= c1:
        return
    rr = np.arange(r0, r1)[:, None] + 0.5 - row
    cc = np.arange(c0, c1)[None, :] + 0.5 - col
    g = np.exp(-(rr**2 + cc**2) / (2 * sigma**2))
    np.maximum(heat[r0:r1, c0:c1], g, out=heat[r0:r1, c0:c1])


def _window(shape: tuple[int, int], x0: float, y0: float, x1: float, y1: float) -> tuple[slice, slice]:
    r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)) + 1, shape[0])
    c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)) + 1, shape[1])
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def _superellipse(shape: tuple[int, int], cx: float, cy: float, ax: float, ay: float, power: float = 4.0) -> tuple[tuple[slice, slice], np.ndarray]:
    win = _window(shape, cx - ax, cy - ay, cx + ax, cy + ay)
    rr = np.arange(win[0].start, win[0].stop)[:, None] + 0.5
    cc = np.arange(win[1].start, win[1].stop)[None, :] + 0.5
    inside = np.abs((cc - cx) / max(ax, 1e-3)) ** power + np.abs((rr - cy) / max(ay, 1e-3)) ** power <= 1.0
    return win, inside


def _polygon_band(shape: tuple[int, int], start: np.ndarray, end: np.ndarray, half_width: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """Pixels within `half_width` of the segment start -> end ((x, y) points): (window, mask in window)."""
    lo = np.minimum(start, end) - half_width
    hi = np.maximum(start, end) + half_width
    win = _window(shape, lo[0], lo[1], hi[0], hi[1])
    py = np.arange(win[0].start, win[0].stop)[:, None] + 0.5
    px = np.arange(win[1].start, win[1].stop)[None, :] + 0.5
    d = end - start
    length2 = float(d @ d) or 1.0
    t = np.clip(((px - start[0]) * d[0] + (py - start[1]) * d[1]) / length2, 0.0, 1.0)
    qx, qy = start[0] + t * d[0], start[1] + t * d[1]
    return win, (px - qx) ** 2 + (py - qy) ** 2 <= half_width**2


def real_targets(shape: tuple[int, int], boxes: np.ndarray, sacrum_hint: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weak targets from vertebra boxes ((x0, y0, x1, y1) px, any order) on an image of `shape`."""
    n_ch = len(CHANNELS)
    target = np.zeros((n_ch, *shape), dtype=np.float32)
    weight = np.ones((n_ch, *shape), dtype=np.float32)
    weight[SACRUM] = 0.0
    if not sacrum_hint:
        weight[L5] = 0.0
    if len(boxes) == 0:
        return target, weight
    boxes = boxes[np.argsort((boxes[:, 1] + boxes[:, 3]) / 2)]
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    sizes = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
    steps = np.hypot(*np.diff(centres, axis=0).T) if len(boxes) > 1 else np.array([sizes[0, 1] * 1.3])
    step = float(np.median(steps))

    # Unlabelled continuation of the chain above the top box (cervical vertebrae) and, without the sacrum
    # hint, below the bottom box.  With the hint, the bottom box is L5 and what lies right below it is the
    # sacrum: no vertebral body and no vertebra centre there (the network had kept counting sacral
    # segments as vertebrae on real images, measured on the test split, so no name was ever given).
    ends = ((0, -1), (len(boxes) - 1, +1)) if not sacrum_hint else ((0, -1),)
    for end, direction in ends:
        if len(boxes) > 1:
            nb = end - direction
            axis = centres[end] - centres[nb]
            axis = axis / (np.linalg.norm(axis) or 1.0)
        else:
            axis = np.array([0.0, float(direction)])
        start = centres[end] + axis * 0.5 * sizes[end, 1]
        stop = centres[end] + axis * 2.8 * step
        win, band = _polygon_band(shape, start, stop, 0.9 * sizes[end, 0])
        for ch in (BODY, VERTEBRA, CENTRE):
            weight[ch][win][band] = 0.0
    # The sacrum never lies above the lowest vertebra.
    bottom_row = int(np.clip(np.ceil(boxes[-1, 3]), 0, shape[0]))
    weight[SACRUM][:bottom_row] = 1.0

    for (x0, y0, x1, y1), (w, h) in zip(boxes, sizes, strict=True):
        # Rim of the box: unknown for body and vertebra (boxes are axis-aligned, vertebrae are tilted).
        win = _window(shape, x0 - 0.12 * w, y0 - 0.12 * h, x1 + 0.12 * w, y1 + 0.12 * h)
        weight[BODY][win] = 0.0
        # Posterior elements and transverse processes reach beyond the body box.
        win_v = _window(shape, x0 - 0.6 * w, y0 - 0.3 * h, x1 + 0.6 * w, y1 + 0.3 * h)
        weight[VERTEBRA][win_v] = 0.0
    for (cx, cy), (w, h) in zip(centres, sizes, strict=True):
        win, inside = _superellipse(shape, cx, cy, 0.46 * w, 0.42 * h)
        for ch in (BODY, VERTEBRA):
            target[ch][win][inside] = 1.0
            weight[ch][win][inside] = 1.0
        gaussian_into(target[CENTRE], cy, cx, max(MIN_SIGMA, HEAT_SIGMA_FRACTION * min(w, h)))
    if sacrum_hint:
        (cx, cy), (w, h) = centres[-1], sizes[-1]
        gaussian_into(target[L5], cy, cx, max(MIN_SIGMA, HEAT_SIGMA_FRACTION * min(w, h)))

    if sacrum_hint and len(boxes) >= 3:
        # The first sacral body: about one step below L5's centre, as wide as L5 (an ellipse inside it).
        last_step = centres[-1] - centres[-2]
        s1 = centres[-1] + last_step * S1_STEPS_BELOW_L5
        margin = 0.5 * np.linalg.norm(last_step)
        if margin <= s1[1] <= shape[0] - margin and 0 <= s1[0] < shape[1]:
            win, inside = _superellipse(shape, s1[0], s1[1], 0.4 * sizes[-1, 0], float(0.33 * np.linalg.norm(last_step)), 2.0)
            target[SACRUM][win][inside] = 1.0
            weight[SACRUM][win][inside] = 1.0
    return target, weight


def synth_targets(
    body: np.ndarray,
    vertebra: np.ndarray,
    centres: Sequence[tuple[float, float, float]],
    ignore_centres: Sequence[tuple[float, float, float]] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Full targets from synthetic label maps (network grid).

    `centres` are (x, y, sigma) of vertebral bodies to mark in the heatmap; `ignore_centres` (x, y, radius)
    are bodies too cut off to say whether a peak belongs there.
    """
    n_ch = len(CHANNELS)
    shape = body.shape
    target = np.zeros((n_ch, *shape), dtype=np.float32)
    weight = np.ones((n_ch, *shape), dtype=np.float32)
    is_body = ((body >= 1) & (body != S1_CODE)) | (body == UNNAMED)
    is_vert = ((vertebra >= 1) & (vertebra != S1_CODE)) | (vertebra == UNNAMED) | is_body
    target[BODY] = is_body
    target[VERTEBRA] = is_vert
    target[SACRUM] = (body == S1_CODE) | (vertebra == S1_CODE)
    weight[BODY] = body != IGNORE
    weight[VERTEBRA] = vertebra != IGNORE
    weight[SACRUM] = (body != IGNORE) & (vertebra != IGNORE)
    weight[CENTRE] = body != IGNORE
    for x, y, sigma in centres:
        gaussian_into(target[CENTRE], y, x, sigma)
    for x, y, radius in ignore_centres:
        win, inside = _superellipse(shape, x, y, radius, radius, 2.0)
        weight[CENTRE][win][inside] = 0.0
    weight[L5] = weight[CENTRE]
    if (body == UNNAMED).any():
        weight[L5] = 0.0  # bodies without level names: L5 could be any of them
    else:
        rows, cols = np.nonzero(body == L5_CODE)
        if len(rows):
            # Same centre as `body_centres` computes: marked there -> a peak, cut off -> unknown.
            x, y = float(cols.mean() + 0.5), float(rows.mean() + 0.5)
            peak = [sigma for cx, cy, sigma in centres if abs(cx - x) < 0.5 and abs(cy - y) < 0.5]
            if peak:
                gaussian_into(target[L5], y, x, peak[0])
            else:
                r = float(max(rows.max() - rows.min(), cols.max() - cols.min()) + 2)
                win, inside = _superellipse(shape, x, y, r, r, 2.0)
                weight[L5][win][inside] = 0.0
    return target, weight


def body_centres(body: np.ndarray, min_area: int = 6, min_fraction: float = 0.6) -> tuple[list[tuple[float, float, float]], list[tuple[float, float, float]]]:
    """(x, y, sigma) per vertebral body in a label map (not the sacrum), split into those fully enough in the
    image to be marked, and those to be ignored (their visible part is below `min_fraction` of the largest
    body of similar level, or touches the border)."""
    marked, ignored = [], []
    codes = [c for c in np.unique(body) if c >= 1 and c != S1_CODE]
    areas = {}
    for code in codes:
        rows, cols = np.nonzero(body == code)
        areas[code] = (rows, cols)
    typical = np.median([len(v[0]) for v in areas.values()]) if areas else 0
    for rows, cols in areas.values():
        if len(rows) < min_area:
            continue
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        sigma = max(MIN_SIGMA, HEAT_SIGMA_FRACTION * min(h, w))
        x, y = float(cols.mean() + 0.5), float(rows.mean() + 0.5)
        cut = rows.min() == 0 or cols.min() == 0 or rows.max() == body.shape[0] - 1 or cols.max() == body.shape[1] - 1
        if cut or len(rows) < min_fraction * 0.5 * typical:
            ignored.append((x, y, 2.5 * sigma))
        else:
            marked.append((x, y, sigma))
    return marked, ignored
