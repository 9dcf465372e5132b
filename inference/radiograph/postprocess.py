"""From the network's probability maps to single, ordered, named vertebrae (network grid).

The spine is a chain: vertebrae follow each other along a smooth curve, evenly spaced, each step a little
longer than the last going down.  `find_chain` uses exactly that: it picks, among the peaks of the centre
heatmap, the path that maximises detection confidence minus penalties for uneven spacing and sharp turns
(dynamic programming over consecutive pairs, so both the spacing ratio and the turn angle of every triple
are scored).  Ribs, bowel gas, iliac crests and double peaks on the pedicles do not fit a chain and drop
out.  A step about twice as long as its neighbours counts a missed vertebra.  Instances are then
separated by a watershed on the body probability from the chain's markers, and levels are named by
counting up from an anchor known to be L5 -- the lowest vertebra when the sacrum sits right below the
chain, or (models with an ``l5`` channel, `ChainParams.naming_anchor`) the one vertebra the L5 heatmap
marks -- along the unbroken run above it and for at most `ChainParams.name_max_levels` vertebrae; every
other vertebra stays "level unknown" (`None`): a counted gap was wrong more often than right on the
synthetic hold-out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from inference.radiograph.network import BODY, CENTRE, L5, SACRUM, VERTEBRA
from inference.results import LEVELS


@dataclass(frozen=True)
class ChainParams:
    """Tunable constants of the chain and instance steps (stored in model.json "postprocess")."""

    peak_threshold: float = 0.15  # minimum centre-heatmap value of a candidate
    peak_min_distance: int = 3  # network px between candidate peaks
    max_candidates: int = 80
    reward_offset: float = 0.3  # a candidate adds (score - offset) * reward_scale to a chain
    reward_scale: float = 2.0
    spacing_sigma: float = 0.2  # log-ratio of consecutive steps tolerated (1 sigma)
    turn_sigma_deg: float = 25.0  # turn between consecutive steps tolerated (1 sigma)
    gap_penalty: float = 0.8  # per vertebra counted as missed inside a long step
    midpoint_penalty: float = 3.0  # a step whose midpoint lies on a vertebra centre skips that vertebra
    midpoint_free: float = 0.25  # centre heatmap at the midpoint tolerated without penalty
    max_gap: int = 2  # vertebrae a single step may skip
    max_step_angle_deg: float = 60.0  # steps further from the cranio-caudal axis are not allowed
    body_threshold: float = 0.5
    sacrum_threshold: float = 0.5
    sacrum_min_area_steps: float = 0.5  # a sacrum component needs this many (step length)^2 of area
    #: Where the sacrum's top may lie relative to the lowest vertebra's centre, in steps (+ = below).  On AP
    #: views the promontory projects over the lower half of L5, so its top sits near L5's centre (measured on
    #: synthetic samples); a top a whole step lower means L5 itself may be the one missed.
    sacrum_top_min: float = -0.6
    sacrum_top_max: float = 0.45
    #: The sacrum's centre of mass must lie at least this far below the lowest vertebra (steps): a blob
    #: centred on that vertebra is the vertebra, not the sacrum.
    sacrum_centroid_min: float = 0.3
    #: Count levels up from the sacrum.  Off for a model whose evaluation showed wrong names: "level unknown"
    #: is safer than a wrong level (one missed vertebra shifts every name).
    name_levels: bool = True
    #: Name at most this many vertebrae up from the sacrum, and only along an unbroken run (no vertebra
    #: counted as missed, none filled in): each further step is one more chance to be off by one, and
    #: on the hold-out names turned wrong mostly above L1 (a transitional vertebra would shift them all).
    name_max_levels: int = 5
    #: What the count starts from: "sacrum" (the lowest vertebra is L5 when the sacrum sits right below
    #: it) or "l5" (the chain vertebra the network's L5 heatmap marks; needs a model with that channel).
    naming_anchor: str = "sacrum"
    #: The L5 heatmap must reach this near one chain vertebra's centre ...
    l5_threshold: float = 0.3
    #: ... and stay below this fraction of that value at every other vertebra (else: which one is L5?).
    l5_margin: float = 0.5
    #: Fewer vertebrae in a row than this is not a spine: blank and noise images gave 1-2 (measured).
    min_chain: int = 3

    @classmethod
    def from_dict(cls, data: dict | None) -> ChainParams:
        """Parameters from model.json (unknown keys are an error naming them)."""
        data = dict(data or {})
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown post-processing parameters: {', '.join(sorted(unknown))}")
        params = cls(**data)
        if params.naming_anchor not in ("sacrum", "l5"):
            raise ValueError(f"naming_anchor must be 'sacrum' or 'l5', not {params.naming_anchor!r}")
        return params


@dataclass
class ChainNode:
    """One vertebra on the chain (network grid, row/column index coordinates)."""

    row: float
    column: float
    score: float
    position: int  # ordinal along the spine from the top, counting missed vertebrae
    inferred: bool = False  # added inside a gap where the body is clearly visible but the centre peak was weak


@dataclass
class SpineDetection:
    """Vertebrae found on one network-grid image, top to bottom."""

    nodes: list[ChainNode]
    labels: np.ndarray  # int32 network grid: k + 1 for nodes[k], 0 elsewhere
    sacrum: np.ndarray | None  # bool network grid, the sacrum component used (None if not found)
    sacrum_adjacent: bool
    levels: list[str | None]
    step: float  # median step between consecutive vertebrae (network px), nan if < 2 nodes
    notes: list[str] = field(default_factory=list)


def find_peaks(heat: np.ndarray, params: ChainParams) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of the centre heatmap: (n, 2) sub-pixel (row, column) and their scores."""
    from skimage.feature import peak_local_max

    coords = peak_local_max(
        heat, min_distance=params.peak_min_distance, threshold_abs=params.peak_threshold, exclude_border=False
    )
    if len(coords) == 0:
        return np.zeros((0, 2)), np.zeros(0)
    scores = heat[coords[:, 0], coords[:, 1]]
    order = np.argsort(-scores)[: params.max_candidates]
    coords, scores = coords[order], scores[order]
    refined = np.empty((len(coords), 2))
    padded = np.pad(heat, 1, mode="edge")
    for k, (r, c) in enumerate(coords):
        window = padded[r : r + 3, c : c + 3]
        weights = np.clip(window - window.min(), 0, None)
        total = weights.sum()
        if total > 0:
            dr = float((weights.sum(axis=1) * np.arange(-1, 2)).sum() / total)
            dc = float((weights.sum(axis=0) * np.arange(-1, 2)).sum() / total)
        else:
            dr = dc = 0.0
        refined[k] = (r + dr, c + dc)
    return refined, scores.astype(float)


def _typical_step(points: np.ndarray, scores: np.ndarray, max_angle: float) -> float:
    """Median distance from each confident candidate to its nearest neighbour below, within the step cone."""
    strong = points[scores >= max(0.4, float(np.median(scores)))] if len(points) > 3 else points
    if len(strong) < 2:
        strong = points
    dists = []
    cos_max = math.cos(math.radians(max_angle))
    for p in strong:
        d = strong - p
        dist = np.hypot(d[:, 0], d[:, 1])
        ok = (d[:, 0] > 0) & (d[:, 0] >= cos_max * dist) & (dist > 2.0)
        if ok.any():
            dists.append(dist[ok].min())
    return float(np.median(dists)) if dists else float("nan")


def midpoint_values(points: np.ndarray, field_: np.ndarray) -> np.ndarray:
    """`field_` at the midpoint of every pair of candidates (n, n).  On the centre heatmap: high when a
    vertebra lies between them (the step would skip it), near 0 when a disc does."""
    n = len(points)
    if n == 0:
        return np.zeros((0, 0))
    mid = (points[:, None, :] + points[None, :, :]) / 2
    return ndimage.map_coordinates(field_, [mid[..., 0].ravel(), mid[..., 1].ravel()], order=1, mode="nearest").reshape(n, n)


def find_chain(
    points: np.ndarray, scores: np.ndarray, params: ChainParams, mid_heat: np.ndarray | None = None
) -> tuple[list[int], list[int]]:
    """Best chain through candidate `points` (row, column): their indices top to bottom, and for each
    step the number of vertebrae counted as missed inside it (len = len(indices) - 1).

    `mid_heat` (n, n), the centre heatmap at each pair's midpoint, makes a step over a visible vertebra
    centre count as skipping it (or cost `midpoint_penalty`)."""
    n = len(points)
    if n == 0:
        return [], []
    order = np.argsort(points[:, 0], kind="stable")
    pts, sc = points[order], scores[order]
    if mid_heat is None:
        mid_cost = np.zeros((n, n))
    else:
        m = mid_heat[np.ix_(order, order)]
        mid_cost = params.midpoint_penalty * np.clip(m - params.midpoint_free, 0.0, None)
    reward = (sc - params.reward_offset) * params.reward_scale
    typical = _typical_step(pts, sc, params.max_step_angle_deg)
    if not np.isfinite(typical):
        best = int(np.argmax(reward))
        return [int(order[best])], []

    diff = pts[None, :, :] - pts[:, None, :]  # diff[i, j] = pts[j] - pts[i]
    dist = np.hypot(diff[..., 0], diff[..., 1])
    cos_max = math.cos(math.radians(params.max_step_angle_deg))
    gaps = np.arange(params.max_gap + 1)
    valid = (diff[..., 0] > 0) & (diff[..., 0] >= cos_max * dist) & (dist >= 0.35 * typical)
    valid &= dist <= (params.max_gap + 1.5) * typical
    w_r = 1.0 / (2 * params.spacing_sigma**2)
    w_a = 1.0 / (2 * math.radians(params.turn_sigma_deg) ** 2)

    # First step (no previous step to compare with): compare with the typical step, loosely.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio0 = dist[..., None] / ((gaps + 1)[None, None, :] * typical)
        cost0 = 0.25 * w_r * np.log(np.maximum(ratio0, 1e-6)) ** 2 + params.gap_penalty * gaps[None, None, :]
    cost0[..., 0] += mid_cost
    g0 = np.argmin(cost0, axis=-1)
    init = np.where(valid, reward[:, None] + reward[None, :] - np.take_along_axis(cost0, g0[..., None], -1)[..., 0], -np.inf)
    score = init.copy()  # score[i, j]: best chain ending with step i -> j
    unit = np.where(valid, dist / (g0 + 1), np.nan)  # step length per vertebra of that chain's last step
    gap = np.where(valid, g0, 0)
    back = np.full((n, n), -1, dtype=int)  # predecessor i of the state (i, j) -> k chosen for (j, k)

    angle = np.arctan2(diff[..., 1], diff[..., 0])  # direction of step i -> j
    for j in range(n):
        prev = np.flatnonzero(np.isfinite(score[:, j]))
        nxt = np.flatnonzero(valid[j])
        if len(prev) == 0 or len(nxt) == 0:
            continue
        # Candidate transitions (i, j) -> (j, k), vectorised over i (rows) and k (columns).
        u_prev = unit[prev, j][:, None, None]
        d_next = dist[j, nxt][None, :, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = d_next / ((gaps + 1)[None, None, :] * u_prev)
            c_gap = w_r * np.log(np.maximum(ratio, 1e-6)) ** 2 + params.gap_penalty * gaps[None, None, :]
        c_gap[..., 0] = c_gap[..., 0] + mid_cost[j, nxt][None, :]
        g = np.argmin(c_gap, axis=-1)  # (prev, next)
        c_sp = np.take_along_axis(c_gap, g[..., None], -1)[..., 0]
        turn = angle[j, nxt][None, :] - angle[prev, j][:, None]
        turn = (turn + np.pi) % (2 * np.pi) - np.pi
        total = score[prev, j][:, None] + reward[nxt][None, :] - c_sp - w_a * turn**2
        best_i = np.argmax(total, axis=0)
        best_val = total[best_i, np.arange(len(nxt))]
        improve = best_val > score[j, nxt]
        for col in np.flatnonzero(improve):
            k = nxt[col]
            i_best = prev[best_i[col]]
            score[j, k] = best_val[col]
            back[j, k] = i_best
            gap[j, k] = g[best_i[col], col]
            unit[j, k] = dist[j, k] / (gap[j, k] + 1)

    single = int(np.argmax(reward))
    if not np.isfinite(score).any() or np.nanmax(np.where(np.isfinite(score), score, -np.inf)) < reward[single]:
        return [int(order[single])], []
    j, k = (int(v) for v in np.unravel_index(int(np.argmax(np.where(np.isfinite(score), score, -np.inf))),
                                             score.shape))
    chain, steps = [int(k), int(j)], [int(gap[j, k])]
    while back[j, k] >= 0:
        i = int(back[j, k])
        steps.append(int(gap[i, j]))
        chain.append(i)
        j, k = i, j
    chain.reverse()
    steps.reverse()
    return [int(order[c]) for c in chain], steps


def _disk(shape: tuple[int, ...], row: float, col: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    r0, r1 = max(int(row - radius), 0), min(int(row + radius) + 2, shape[0])
    c0, c1 = max(int(col - radius), 0), min(int(col + radius) + 2, shape[1])
    rr, cc = np.mgrid[r0:r1, c0:c1]
    inside = (rr - row) ** 2 + (cc - col) ** 2 <= max(radius, 0.75) ** 2
    return rr[inside], cc[inside]


def separate(prob: np.ndarray, nodes: list[ChainNode], step: float, threshold: float) -> np.ndarray:
    """Instance labels (k + 1 for nodes[k]) by a marker watershed on the body probability."""
    from skimage.segmentation import watershed

    labels = np.zeros(prob.shape, dtype=np.int32)
    if not nodes:
        return labels
    body = prob[BODY]
    markers = np.zeros(prob.shape[1:], dtype=np.int32)
    radius = max(1.0, 0.12 * step) if np.isfinite(step) else 1.0
    for k, node in enumerate(nodes):
        rr, cc = _disk(markers.shape, node.row, node.column, radius)
        markers[rr, cc] = k + 1
    # Only pixels near the chain may join an instance (keeps ribs touching a body out).
    near = np.zeros(markers.shape, dtype=bool)
    reach = 1.1 * step if np.isfinite(step) else 10.0
    for node in nodes:
        rr, cc = _disk(markers.shape, node.row, node.column, reach)
        near[rr, cc] = True
    mask = ((body >= 0.8 * threshold) & near) | (markers > 0)
    labels = watershed(-body, markers, mask=mask)
    # Keep, per label, the component that holds its marker.
    out = np.zeros_like(labels)
    for k, node in enumerate(nodes):
        region = labels == k + 1
        comp, _ = ndimage.label(region)
        r, c = int(round(min(max(node.row, 0), labels.shape[0] - 1))), int(round(min(max(node.column, 0), labels.shape[1] - 1)))
        keep = comp[r, c]
        if keep:
            out[comp == keep] = k + 1
    return out


def _sacrum_components(prob: np.ndarray, params: ChainParams, step: float) -> list[np.ndarray]:
    sac = prob[SACRUM] >= params.sacrum_threshold
    comp, n = ndimage.label(sac)
    if n == 0:
        return []
    min_area = params.sacrum_min_area_steps * (step if np.isfinite(step) else 10.0) ** 2
    sizes = ndimage.sum(sac, comp, index=np.arange(1, n + 1))
    return [comp == (i + 1) for i in np.argsort(-sizes) if sizes[i] >= min_area]


def _sacrum_below(
    comps: list[np.ndarray], nodes: list[ChainNode], step: float, params: ChainParams
) -> tuple[np.ndarray | None, bool]:
    """The sacrum component that sits right below the lowest vertebra (so that vertebra is L5), if any.

    Only the part of a component in a window under the lowest vertebra counts (the sacrum channel also
    lights up the iliac wings and, on laterals, the pelvis); its top and centre of mass, in units of the
    local step, must fall in the ranges of `params`."""
    bottom = nodes[-1]
    unit = step
    if len(nodes) >= 2:
        a, b = nodes[-2], nodes[-1]
        unit = math.hypot(b.row - a.row, b.column - a.column) / (b.position - a.position)
    for comp in comps:
        rows, cols = np.nonzero(comp)
        window = (np.abs(cols - bottom.column) <= 1.2 * unit) & (rows >= bottom.row - unit) & (rows <= bottom.row + 4 * unit)
        if window.sum() < params.sacrum_min_area_steps * unit**2:
            continue
        top = (rows[window].min() - bottom.row) / unit
        centre = (rows[window].mean() - bottom.row) / unit
        if params.sacrum_top_min <= top <= params.sacrum_top_max and centre >= params.sacrum_centroid_min:
            return comp, True
    return None, False


#: A sacrum not right below the chain is reported only with at least this much area (steps squared): a sacrum
#: is larger than a vertebral body, and smaller blobs at the chain's end were drawn as an "S" between the two
#: lowest vertebrae (a radiologist's review, 2026-12-07).
SACRUM_NEAR_END_MIN_AREA_STEPS = 1.0


def _sacrum_near_end(comps: list[np.ndarray], nodes: list[ChainNode], step: float) -> np.ndarray | None:
    """The largest sacrum component whose centre of mass lies where a sacrum can be: around or below the
    lowest vertebra found (from 1.5 steps above its centre, because on real radiographs the chain often runs
    into the sacral segments, to six steps below), at most 1.5 steps to its side, and at least
    `SACRUM_NEAR_END_MIN_AREA_STEPS` in area.

    The sacrum channel also fires on thoracic and lumbar bodies and on bowel gas (measured on the real test
    split: 29 of 73 reported sacra lay 4-10 vertebrae above the lowest box or beside the spine); reported,
    such a blob is a "Sacrum" drawn on the chest."""
    bottom = nodes[-1]
    for comp in comps:
        rows, cols = np.nonzero(comp)
        below = (rows.mean() - bottom.row) / step
        beside = abs(cols.mean() - bottom.column) / step
        if -1.5 <= below <= 6.0 and beside <= 1.5 and len(rows) >= SACRUM_NEAR_END_MIN_AREA_STEPS * step**2:
            return comp
    return None


def l5_node(prob: np.ndarray, nodes: list[ChainNode], step: float, params: ChainParams) -> int | None:
    """Index of the chain vertebra the L5 heatmap marks, or None: its value near that vertebra's centre
    must reach `l5_threshold`, and no other vertebra may come within `l5_margin` of it."""
    if prob.shape[0] <= L5 or not nodes or not np.isfinite(step):
        return None
    values = []
    for node in nodes:
        rr, cc = _disk(prob.shape[1:], node.row, node.column, max(1.0, 0.35 * step))
        values.append(float(prob[L5, rr, cc].max()) if len(rr) else 0.0)
    best = int(np.argmax(values))
    others = values[:best] + values[best + 1 :]
    if values[best] < params.l5_threshold or (others and max(others) >= params.l5_margin * values[best]):
        return None
    return best


def name_levels(nodes: list[ChainNode], l5_index: int | None, max_levels: int = len(LEVELS)) -> list[str | None]:
    """Level names counting up from ``nodes[l5_index]`` = L5, or None everywhere when there is no anchor.

    Names stop at the first break in the run (a vertebra counted as missed, or one filled into a gap)
    and after `max_levels` names: above that, "level unknown" is safer than a count that may be off.
    Vertebrae below the anchor (sacral segments taken for vertebrae) stay unnamed."""
    names: list[str | None] = [None] * len(nodes)
    if not nodes or l5_index is None:
        return names
    l5 = LEVELS.index("L5")
    for k in range(l5_index, -1, -1):
        rank = l5_index - k
        if rank >= max_levels or nodes[k].inferred:
            break
        if rank > 0 and nodes[k + 1].position - nodes[k].position != 1:
            break
        if l5 - rank < 0:
            break
        names[k] = LEVELS[l5 - rank]
    return names


def chain_steps(nodes: list[ChainNode]) -> list[float]:
    """Step lengths along the chain, top to bottom, per vertebra (a step over missed vertebrae divided by the levels it spans)."""
    return [
        math.hypot(b.row - a.row, b.column - a.column) / (b.position - a.position) for a, b in zip(nodes, nodes[1:], strict=False)
    ]


def detect(prob: np.ndarray, params: ChainParams | None = None) -> SpineDetection:
    """Ordered, separated, named vertebrae from network probabilities (C, H, W)."""
    params = params or ChainParams()
    points, scores = find_peaks(prob[CENTRE], params)
    notes: list[str] = []
    shape = prob.shape[1:]
    if len(points):
        # A peak where the sacrum is more likely than a vertebral body is the sacrum, not a vertebra.
        rr = np.clip(np.rint(points[:, 0]).astype(int), 0, shape[0] - 1)
        cc = np.clip(np.rint(points[:, 1]).astype(int), 0, shape[1] - 1)
        keep = prob[SACRUM, rr, cc] < np.maximum(prob[BODY, rr, cc], 0.5)
        points, scores = points[keep], scores[keep]
    chain, gaps = find_chain(points, scores, params, midpoint_values(points, prob[CENTRE]))
    nodes: list[ChainNode] = []
    position = 0
    for idx, (k) in enumerate(chain):
        if idx > 0:
            g = gaps[idx - 1]
            prev = nodes[-1]
            # Fill a gap where the body is plainly visible (the centre peak was just weak).
            for m in range(1, g + 1):
                t = m / (g + 1)
                r = prev.row + t * (points[k, 0] - prev.row)
                c = prev.column + t * (points[k, 1] - prev.column)
                ri, ci = int(round(min(max(r, 0), shape[0] - 1))), int(round(min(max(c, 0), shape[1] - 1)))
                position += 1
                if prob[BODY, ri, ci] >= params.body_threshold:
                    nodes.append(ChainNode(r, c, float(prob[CENTRE, ri, ci]), position, inferred=True))
            position += 1
        nodes.append(ChainNode(float(points[k, 0]), float(points[k, 1]), float(scores[k]), position))
    if 0 < len(nodes) < params.min_chain:
        notes.append(f"no spine recognised: {len(nodes)} vertebra-like structure(s), fewer than {params.min_chain} in a row")
        nodes = []
    steps = chain_steps(nodes)
    step = float(np.median(steps)) if steps else float("nan")
    missed = sum(gaps) - sum(1 for n in nodes if n.inferred)
    if missed > 0:
        notes.append(f"{missed} vertebra(e) along the chain not found (counted as missed for naming)")
    labels = separate(prob, nodes, step, params.body_threshold)

    sacrum, adjacent = None, False
    by_sacrum = params.naming_anchor == "sacrum"
    comps = _sacrum_components(prob, params, step)
    if nodes and comps and np.isfinite(step):
        sacrum, adjacent = _sacrum_below(comps, nodes, step, params)
        if sacrum is None:
            sacrum = _sacrum_near_end(comps, nodes, step)
            if by_sacrum and sacrum is not None:
                notes.append("sacrum found but not right below the lowest vertebra found: levels not named")
    # (no vertebrae: a sacrum-like blob alone is not reported; blank images produced one)
    anchor = (len(nodes) - 1 if adjacent else None) if by_sacrum else l5_node(prob, nodes, step, params)
    if params.name_levels and nodes:
        if by_sacrum and sacrum is None:
            notes.append("levels not named: sacrum not in the field of view or not found")
        if not by_sacrum and anchor is None:
            notes.append("levels not named: the fifth lumbar vertebra was not recognised with confidence")
        levels = name_levels(nodes, anchor, params.name_max_levels)
        if anchor is not None and any(lv is None for lv in levels[: anchor + 1]):
            notes.append("levels named up from L5 only as far as the count is unbroken; the others are 'level unknown'")
    else:
        levels = [None] * len(nodes)
        if nodes:
            notes.append("levels not named: level naming is switched off for this model (see its model card)")
    return SpineDetection(nodes, labels, sacrum, adjacent, levels, step, notes)


def posterior_offset(prob: np.ndarray, detection: SpineDetection) -> tuple[float, int]:
    """Where the posterior elements lie relative to the bodies: (mean offset along +column in units of the
    step, number of vertebrae that voted).  Large and consistent on laterals, near 0 on AP views."""
    if not detection.nodes or not np.isfinite(detection.step):
        return 0.0, 0
    body = prob[BODY] >= 0.5
    posterior = (prob[VERTEBRA] >= 0.5) & ~body
    offsets = []
    reach = 1.3 * detection.step
    for k, node in enumerate(detection.nodes):
        region = detection.labels == k + 1
        if region.sum() < 3:
            continue
        rr, cc = _disk(body.shape, node.row, node.column, reach)
        window = np.zeros_like(body)
        window[rr, cc] = True
        elements = posterior & window & (np.abs(np.arange(body.shape[0])[:, None] - node.row) <= 0.6 * detection.step)
        if elements.sum() < 3:
            continue
        body_c = np.nonzero(region)[1].mean()
        offsets.append((np.nonzero(elements)[1].mean() - body_c) / detection.step)
    if not offsets:
        return 0.0, 0
    return float(np.median(offsets)), len(offsets)
