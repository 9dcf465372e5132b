"""The spinal hardware model: implants on a radiograph, their levels and sides, complications, a verdict.

`HardwareModel.analyse(radiograph, vertebrae, source)` takes a decoded radiograph (canonical grid, see
`preprocess`) and the `Vertebra` results already found on it (stored grid) and returns a
`HardwareOutcome` (stored grid):

1. the network (a compact MONAI 2D U-Net, channels in `hardware_post.CHANNELS`) runs at a fixed physical
   scale (`SPACING_MM` per pixel at the patient; same preprocessing as the vertebra model otherwise);
2. `hardware_post` separates instances per class (screws by the screw-centre heatmap, rods along their
   direction, cages and plates by clustering, leftover metal as "other implant");
   With a disc classifier in the model (`hardware_discs`), interbody cages come from it instead: one per
   disc space between consecutive vertebrae that it scores above threshold;
3. each instance gets its source-resolution mask, outline and axis; screws the level of the body their tip
   half projects into, cages the disc between two named vertebrae, rods and plates the levels they span;
   a side from the spine midline and the patient orientation (lateral views: unknown);
4. complications (loosening, breakage, rod fracture, subsidence) come from learned per-pixel maps scored
   per instance against thresholds tuned on validation data, each with an evidence polygon;
5. the image's hardware status: no implants / hardware intact / possible complication / not assessable
   (implants at the image edge, or metal not recognised as spinal hardware), with reasons, and the
   instrumentation as a surgeon would say it.

Importing this module registers the step with the "spine-xr" analysis; the step is only used when the
model folder ``spine-xr-hardware`` is installed.  torch is imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from inference.radiograph import network, preprocess
from inference.radiograph.analysis import (
    HardwareOutcome,
    mask_to_stored,
    outline_points,
    register_hardware_step,
)
from inference.radiograph.hardware_post import (
    CHANNELS,
    CLASS_CHANNEL,
    HardwareParams,
    ImplantSummary,
    Piece,
    VertebraGeom,
    beside_spine,
    centroid_xy,
    covered_levels,
    disc_levels,
    find_pieces,
    image_side,
    instrumentation_text,
    level_near,
    merge_crops,
    midline_x,
    overlap,
    part_xy,
    principal_axis,
    rod_course,
    score_complications,
    screw_level,
    screws_along_rods,
    side_of,
    spine_midline,
    vertebrae_spanned,
)
from inference.registry import ModelError, ModelRegistry
from inference.results import (
    COMPLICATION_FINDING,
    FAILURE_MODES,
    Complication,
    Finding,
    HardwareStatus,
    Implant,
    ImplantKind,
    ModelInfo,
    Point,
    RegionMask,
    Severity,
    Side,
    SourceImage,
    Vertebra,
    level_index,
    level_span,
)

if TYPE_CHECKING:
    import torch

    from inference.registry import ModelSpec

MODEL_NAME = "spine-xr-hardware"
#: Network pixel size (mm at the patient).  Finer than the vertebra model's 1.25 mm: halos are 1-2.5 mm.
SPACING_MM = 1.0
#: Images without pixel spacing: vertebral step (mm) assumed to estimate the scale from the vertebrae found.
ASSUMED_STEP_MM = 30.0

DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "type": "monai.networks.nets.BasicUNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": len(CHANNELS),
    "features": [16, 24, 48, 96, 192, 16],
    "channels": list(CHANNELS),
    "spacing_mm": SPACING_MM,
}

SEVERITY: dict[Complication, Severity] = {
    Complication.SCREW_LOOSENING: Severity.MODERATE,
    Complication.SCREW_BREAKAGE: Severity.SEVERE,
    Complication.ROD_FRACTURE: Severity.SEVERE,
    Complication.CAGE_SUBSIDENCE: Severity.MODERATE,
}
WHAT: dict[Complication, str] = {
    Complication.SCREW_LOOSENING: "loosening",
    Complication.SCREW_BREAKAGE: "breakage",
    Complication.ROD_FRACTURE: "fracture",
    Complication.CAGE_SUBSIDENCE: "subsidence",
}
SIGN: dict[Complication, str] = {
    Complication.SCREW_LOOSENING: "lucent halo around the screw",
    Complication.SCREW_BREAKAGE: "discontinuity of the screw",
    Complication.ROD_FRACTURE: "gap in the rod",
    Complication.CAGE_SUBSIDENCE: "cage sunk into the endplate",
}


def build_network(architecture: dict[str, Any] | None = None) -> torch.nn.Module:
    """An untrained hardware network for `architecture` (a model.json "architecture" entry)."""
    from monai.networks.nets import BasicUNet

    arch = dict(DEFAULT_ARCHITECTURE if architecture is None else architecture)
    if arch.get("type") != DEFAULT_ARCHITECTURE["type"]:
        raise ValueError(f"unsupported architecture type {arch.get('type')!r}")
    if list(arch.get("channels", CHANNELS)) != list(CHANNELS):
        raise ValueError(f"model channels {arch.get('channels')} differ from this code's {list(CHANNELS)}")
    return BasicUNet(
        spatial_dims=int(arch["spatial_dims"]),
        in_channels=int(arch["in_channels"]),
        out_channels=int(arch["out_channels"]),
        features=tuple(int(f) for f in arch["features"]),
    )


def network_zoom(spacing_mm: float = SPACING_MM) -> float:
    """Zoom for `preprocess.prepare` that puts `spacing_mm` at the patient into one network pixel."""
    return preprocess.TARGET_SPACING_MM / spacing_mm


def prepare(pixels: np.ndarray, spacing_mm: tuple[float, float] | None, net_spacing_mm: float = SPACING_MM) -> tuple[np.ndarray, tuple[float, float]]:
    """Source pixels (canonical, bone bright) -> normalised network image and the (row, column) scale."""
    return preprocess.prepare(pixels, spacing_mm, network_zoom(net_spacing_mm))


# ------------------------------------------------------------------------------------ grid helpers


def region_to_canonical(region: RegionMask, orientation: preprocess.Orientation) -> tuple[tuple[int, int], np.ndarray]:
    """A stored-grid `RegionMask` as (offset, crop) on the canonical grid (inverse of the analysis' turn)."""
    arr = region.array
    r0, c0 = region.offset
    rows, cols = region.shape
    if orientation.transpose:
        arr = arr.T
        r0, c0 = c0, r0
        rows, cols = cols, rows
    h, w = arr.shape
    if orientation.flip_rows:
        arr = arr[::-1, :]
        r0 = rows - (r0 + h)
    if orientation.flip_columns:
        arr = arr[:, ::-1]
        c0 = cols - (c0 + w)
    if orientation.crop is not None:  # the canonical grid starts inside the frame the analysis left out
        r0, c0 = r0 - orientation.crop[0], c0 - orientation.crop[1]
    return (int(r0), int(c0)), np.ascontiguousarray(arr)


def vertebra_geometry(vertebrae: Sequence[Vertebra], orientation: preprocess.Orientation) -> list[VertebraGeom]:
    """The vertebrae (stored grid) as canonical-grid geometry for level assignment."""
    out = []
    for v in vertebrae:
        if v.mask.empty:
            continue
        offset, crop = region_to_canonical(v.mask, orientation)
        out.append(VertebraGeom(v.level, centroid_xy(crop, offset), crop, offset))
    return out


@dataclass
class SourcePiece:
    """One instance at source resolution, canonical grid."""

    piece: Piece
    offset: tuple[int, int]
    mask: np.ndarray
    centroid: Point
    axis: tuple[Point, ...] = ()
    tip: Point | None = None
    touches_border: bool = False
    levels: tuple[str, ...] = ()
    #: Screws: rank (top to bottom) of the vertebra assigned, named or not.
    vertebra: int | None = None
    side: Side = Side.UNKNOWN
    #: Frontal views: which side of the spine's midline the piece lies on in the image (-1 toward lower
    #: columns, +1 higher), whether or not the patient's left is known; None on laterals or when unknown.
    column: int | None = None
    complications: tuple[Complication, ...] = ()
    #: Failure modes looked for on this piece (its kind's, minus those the model version does not assess).
    assessed: tuple[Complication, ...] = ()
    notes: list[str] = field(default_factory=list)


def to_source(piece: Piece, prob: np.ndarray, scale: tuple[float, float], shape: tuple[int, int], threshold: float, border_px: float) -> SourcePiece | None:
    """The piece's mask at source resolution (class probability >= threshold inside the piece's region)."""
    channel = CLASS_CHANNEL[piece.kind]
    h, w = piece.mask.shape
    r0, c0 = piece.offset
    pad = 2
    R0, C0 = max(r0 - pad, 0), max(c0 - pad, 0)
    R1, C1 = min(r0 + h + pad, prob.shape[1]), min(c0 + w + pad, prob.shape[2])
    owner = np.zeros((R1 - R0, C1 - C0), dtype=np.float32)
    owner[r0 - R0 : r0 - R0 + h, c0 - C0 : c0 - C0 + w] = piece.mask
    owner = ndimage.binary_dilation(owner > 0, iterations=1).astype(np.float32)
    sr0 = max(int(math.floor(R0 / scale[0])), 0)
    sr1 = min(int(math.ceil(R1 / scale[0])) + 1, shape[0])
    sc0 = max(int(math.floor(C0 / scale[1])), 0)
    sc1 = min(int(math.ceil(C1 / scale[1])) + 1, shape[1])
    # Network index coordinates of the source pixel centres, relative to the network crop.
    r = (np.arange(sr0, sr1) + 0.5) * scale[0] - 0.5 - R0
    c = (np.arange(sc0, sc1) + 0.5) * scale[1] - 0.5 - C0
    rr, cc = np.meshgrid(r, c, indexing="ij")
    p = ndimage.map_coordinates(prob[channel, R0:R1, C0:C1], [rr, cc], order=1, mode="nearest")
    o = ndimage.map_coordinates(owner, [rr, cc], order=0, mode="constant", cval=0.0) > 0.5
    mask = (p >= threshold) & o
    if mask.sum() < 3:
        mask = o & (p >= 0.5 * threshold)
    if mask.sum() < 3:
        return None
    rr_, cc_ = np.nonzero(mask)
    a, b, c_, d = rr_.min(), rr_.max() + 1, cc_.min(), cc_.max() + 1
    crop = mask[a:b, c_:d]
    offset = (sr0 + int(a), sc0 + int(c_))
    return SourcePiece(piece, offset, crop, centroid_xy(crop, offset), touches_border=touches_border(offset, crop.shape, shape, border_px))


def touches_border(offset: tuple[int, int], crop_shape: tuple[int, ...], shape: tuple[int, ...], border_px: float) -> bool:
    """True when a crop at `offset` comes within `border_px` of the image edge."""
    return bool(
        offset[0] <= border_px
        or offset[1] <= border_px
        or offset[0] + crop_shape[0] >= shape[0] - border_px
        or offset[1] + crop_shape[1] >= shape[1] - border_px
    )


def _axis_points(sp: SourcePiece) -> tuple[Point, Point]:
    xy = part_xy(sp.mask, sp.offset)
    centre, d, _, _, _ = principal_axis(xy)
    t = (xy - centre) @ d
    a = centre + t.min() * d
    b = centre + t.max() * d
    return (float(a[0]), float(a[1])), (float(b[0]), float(b[1]))


def _rod_polyline(sp: SourcePiece, step_px: float) -> tuple[Point, ...]:
    """Polyline along a rod (its course in bands of rows, `rod_course`); its axis when shorter than a band."""
    if not sp.mask.any():
        return ()
    pts = rod_course(part_xy(sp.mask, sp.offset), step_px)
    if len(pts) < 2:
        return _axis_points(sp)
    return tuple((float(x), float(y)) for x, y in pts)


def _circle(centre: Point, radius: float, n: int = 16) -> tuple[Point, ...]:
    return tuple(
        (float(centre[0] + radius * math.cos(2 * math.pi * k / n)), float(centre[1] + radius * math.sin(2 * math.pi * k / n)))
        for k in range(n)
    )


# ------------------------------------------------------------------------------------------- model


class HardwareModel:
    """Loaded hardware network plus its post-processing parameters."""

    def __init__(
        self,
        net: torch.nn.Module,
        params: HardwareParams | None = None,
        spacing_mm: float = SPACING_MM,
        info: ModelInfo | None = None,
        patch_net: torch.nn.Module | None = None,
        disc_net: torch.nn.Module | None = None,
    ) -> None:
        self.net = net.eval()
        self.params = params or HardwareParams()
        self.spacing_mm = spacing_mm
        self.info = info or ModelInfo(MODEL_NAME, "untrained")
        self.patch_net = patch_net.eval() if patch_net is not None else None
        self.disc_net = disc_net.eval() if disc_net is not None else None

    @classmethod
    def from_spec(cls, spec: ModelSpec, device: str = "cpu") -> HardwareModel:
        """Build from a registry spec (weights already verified by the registry)."""
        from inference.radiograph.hardware_discs import load_disc_net
        from inference.radiograph.hardware_patches import load_patch_net

        arch = spec.metadata.get("architecture")
        net = build_network(arch)
        stages = network.read_stages(str(spec.weights), device)
        net.load_state_dict(stages["segmentation"])
        patch_net = disc_net = None
        if stages.get("complications") is not None:
            patch_net = load_patch_net(stages["complications"], int((arch or {}).get("patch_width", 16)))
        if stages.get("discs") is not None:
            disc_net = load_disc_net(stages["discs"], int((arch or {}).get("disc_width", 16)))
        spacing = float((arch or {}).get("spacing_mm", SPACING_MM))
        return cls(net.eval(), HardwareParams.from_dict(spec.metadata.get("postprocess")), spacing, spec.info, patch_net, disc_net)

    @classmethod
    def from_registry(cls, registry: ModelRegistry) -> HardwareModel:
        """Load (once) through the registry."""
        return registry.load(MODEL_NAME, cls.from_spec)

    def probabilities(self, pixels: np.ndarray, spacing_mm: tuple[float, float] | None) -> tuple[np.ndarray, tuple[float, float]]:
        """Network probabilities (C, h, w) for canonical source pixels and the (row, column) scale used."""
        image, _ = prepare(pixels, spacing_mm, self.spacing_mm)
        prob = network.predict(self.net, image)
        scale = (image.shape[0] / pixels.shape[0], image.shape[1] / pixels.shape[1])
        return prob, scale

    def analyse(self, radiograph: preprocess.Radiograph, vertebrae: Sequence[Vertebra], source: SourceImage) -> HardwareOutcome:
        """Implants, complication findings and the hardware status of one radiograph (stored grid)."""
        notes: list[str] = []
        if not preprocess.has_contrast(radiograph.pixels):
            # A uniform image has no metal; its percentile stretch would turn rounding noise into "implants"
            # (measured: 12 on a mid-grey image).
            return HardwareOutcome(status=HardwareStatus.NO_IMPLANTS, notes=("image without contrast",), view=radiograph.view)
        spacing = radiograph.pixel_spacing_mm
        geoms = vertebra_geometry(vertebrae, radiograph.orientation)
        if spacing is None:
            spacing = estimated_spacing(geoms)
            if spacing is not None:
                notes.append("no pixel spacing: implant sizes judged at a scale estimated from the vertebral spacing")
            else:
                notes.append("no pixel spacing and too few vertebrae: implant sizes judged at an assumed scale")
        prob, scale = self.probabilities(radiograph.pixels, spacing)
        mm = (spacing[0] / scale[0]) if spacing is not None else self.spacing_mm
        return interpret(prob, scale, mm, radiograph, geoms, source, self.params, notes, self.patch_net, self.disc_net)


def estimated_spacing(geoms: Sequence[VertebraGeom]) -> tuple[float, float] | None:
    """(row, column) mm per source pixel from the median distance between consecutive vertebrae (>= 3),
    taken as `ASSUMED_STEP_MM` (the data engine scales its real-image overlays the same way); else None."""
    pts = sorted((g.centroid[1], g.centroid[0]) for g in geoms if g.level != "S1")
    if len(pts) < 3:
        return None
    xy = np.array(pts)
    step = float(np.median(np.linalg.norm(np.diff(xy, axis=0), axis=1)))
    if step <= 0:
        return None
    s = ASSUMED_STEP_MM / step
    return (s, s)


def interpret(
    prob: np.ndarray,
    scale: tuple[float, float],
    mm: float,
    radiograph: preprocess.Radiograph,
    geoms: Sequence[VertebraGeom],
    source: SourceImage,
    params: HardwareParams,
    notes: list[str] | None = None,
    patch_net: Any | None = None,
    disc_net: Any | None = None,
) -> HardwareOutcome:
    """Network probabilities -> `HardwareOutcome` (the part of `analyse` after the segmentation network)."""
    notes = list(notes or [])
    shape = radiograph.pixels.shape
    view = source.view or radiograph.view
    src_mm = mm * scale[0]  # mm per source pixel
    pieces = find_pieces(prob, mm, params)
    cages: list[SourcePiece] = []
    if disc_net is not None:
        # The disc classifier replaces the cage channel, which fires on screws and misses PEEK cages.
        pieces = [p for p in pieces if p.kind is not ImplantKind.INTERBODY_CAGE]
        cages = disc_cages(disc_net, radiograph.pixels, geoms, src_mm, scale, params)
    if not pieces and not cages:
        notes.append("no implants found on this image")
        return HardwareOutcome(status=HardwareStatus.NO_IMPLANTS, notes=tuple(notes), view=view)
    placed = place_pieces(prob, pieces, scale, shape, params, src_mm, cages)
    if view != "LAT":
        # Dropped before scoring: a brace buckle needs no complication score.
        on_spine = [sp for sp in placed if not beside_spine(sp.mask, sp.offset, geoms, params.max_off_spine_widths)]
        if len(on_spine) < len(placed):
            notes.append(f"{len(placed) - len(on_spine)} metal object(s) beside the spine not counted as spinal hardware (brace, clothing or marker?)")
        placed = on_spine
        # Frontal views only: on laterals the rule removed 2 false screws for 1 true one on 200 training
        # samples (8 for 5 on the synthetic hold-out).
        placed = drop_screws_on_cages(placed, params.screw_on_cage_fraction)
    else:
        # Lateral views only: a frontal screw projects nearly end-on over the rod line, its axis says little.
        placed = absorb_screws_along_rods(placed, mm, params.screw_on_rod_fraction, params.screw_on_rod_max_angle_deg)
    placed = drop_doubtful_lone_cages(placed, params.cage_alone_threshold)
    # Never reported: the model's `not_assessed` and, on the disc classifier's cages, subsidence (its head
    # learned on true cage outlines; on those regions it measured sensitivity 0 and flagged ~12 % of intact
    # cages, synthetic hold-out 2026-12-04).
    skipped = set(params.not_assessed) | ({Complication.CAGE_SUBSIDENCE.value} if cages else set())
    unassessed: set[Complication] = set()
    for sp in placed:
        for comp in FAILURE_MODES[sp.piece.kind]:
            if comp.value in skipped:
                unassessed.add(comp)
            else:
                sp.assessed += (comp,)
    # The classifier runs only when some piece has a failure mode left to look for.
    gaps = score_pieces(prob, placed, scale, src_mm, radiograph.pixels, patch_net) if any(sp.assessed for sp in placed) else {}
    for sp in placed:
        for comp in unassessed:
            sp.piece.complication_scores.pop(comp, None)
        for comp, s in sp.piece.complication_scores.items():
            if s >= params.complication_threshold.get(comp.value, 1.0):
                sp.complications += (comp,)
    not_assessed = tuple(c.value for c in Complication if c in unassessed)
    notes.extend(c.not_assessed_note for c in Complication if c in unassessed)
    if not placed:
        notes.append("no implants found on this image")
        return HardwareOutcome(status=HardwareStatus.NO_IMPLANTS, notes=tuple(notes), view=view)

    left_sign = radiograph.left_sign if view != "LAT" else None
    if view != "LAT" and left_sign is None:
        notes.append("patient orientation not in the header: implant sides not named")
    if view == "LAT":
        notes.append("lateral view: left and right implants overlap, sides not named")
    assign_geometry(placed, geoms, view, left_sign, src_mm)

    implants: list[Implant] = []
    findings: list[Finding] = []
    for idx, sp in enumerate(placed):
        implant = _implant(sp, radiograph)
        implants.append(implant)
        for comp in sp.complications:
            findings.append(_finding(comp, sp, implant, radiograph, source, gaps.get(idx), src_mm, geoms))
    summaries = [ImplantSummary(sp.piece.kind, sp.levels, sp.vertebra, sp.column) for sp in placed]
    summary = instrumentation_text(summaries, view)
    status, reasons = hardware_status(placed, view)
    if not any(i.levels for i in implants if i.kind is not ImplantKind.OTHER):
        notes.append("implant levels not named: vertebral levels unknown on this image")
    return HardwareOutcome(
        implants=tuple(implants),
        findings=tuple(findings),
        status=status,
        instrumentation=summary,
        vertebrae_spanned=vertebrae_spanned(summaries),
        notes=tuple(dict.fromkeys(notes)),
        reasons=tuple(reasons),
        view=view,
        not_assessed=not_assessed,
    )


def drop_screws_on_cages(placed: list[SourcePiece], fraction: float) -> list[SourcePiece]:
    """`placed` without the screws lying on a cage: at least `fraction` of the screw's pixels inside a cage
    found (a tantalum marker or the cage's edge read as a screw; 0: `placed` as it is)."""
    cages = [sp for sp in placed if sp.piece.kind is ImplantKind.INTERBODY_CAGE]
    if fraction <= 0 or not cages:
        return placed

    def on_cage(sp: SourcePiece) -> bool:
        covered = sum(overlap(sp.mask, sp.offset, c.mask, c.offset) for c in cages)
        return covered >= fraction * max(int(sp.mask.sum()), 1)

    return [sp for sp in placed if sp.piece.kind is not ImplantKind.PEDICLE_SCREW or not on_cage(sp)]


def absorb_screws_along_rods(placed: list[SourcePiece], mm: float, fraction: float, max_angle_deg: float) -> list[SourcePiece]:
    """Lateral views: `placed` with each screw piece that lies along a rod (`screws_along_rods`, judged on
    the network grid, `mm` per pixel) made part of that rod's outline: it is metal of the rod, so it is
    neither reported as a screw nor dropped from the segmentation. The rod keeps its network-grid piece."""
    along = screws_along_rods([sp.piece for sp in placed], mm, fraction, max_angle_deg)
    if not along:
        return placed
    out = []
    for k, sp in enumerate(placed):
        if k in along:
            continue
        taken = [placed[s] for s, rod in along.items() if rod == k]
        if taken:
            mask, offset = merge_crops([(sp.mask, sp.offset)] + [(t.mask, t.offset) for t in taken])
            at_edge = sp.touches_border or any(t.touches_border for t in taken)
            sp = replace(sp, mask=mask, offset=offset, centroid=centroid_xy(mask, offset), touches_border=at_edge)
        out.append(sp)
    return out


def drop_doubtful_lone_cages(placed: list[SourcePiece], alone_threshold: float | None) -> list[SourcePiece]:
    """`placed` without the cages scoring below `alone_threshold` when nothing but cages was found: a cage
    with no screw, rod or plate beside it needs the stronger evidence (None: `placed` as it is)."""
    if alone_threshold is None or any(sp.piece.kind is not ImplantKind.INTERBODY_CAGE for sp in placed):
        return placed
    return [sp for sp in placed if sp.piece.score >= alone_threshold]


def place_pieces(
    prob: np.ndarray,
    pieces: Sequence[Piece],
    scale: tuple[float, float],
    shape: tuple[int, int],
    params: HardwareParams,
    src_mm: float,
    extra: Sequence[SourcePiece] = (),
) -> list[SourcePiece]:
    """Pieces at source resolution, then `extra` ones already there (cages from the disc classifier)."""
    border_px = params.border_mm / max(src_mm, 1e-6)
    placed: list[SourcePiece] = []
    for p in pieces:
        sp = to_source(p, prob, scale, shape, params.class_threshold, border_px)
        if sp is not None:
            placed.append(sp)
    return placed + list(extra)


def score_pieces(
    prob: np.ndarray, placed: Sequence[SourcePiece], scale: tuple[float, float], src_mm: float, pixels: np.ndarray, patch_net: Any | None = None
) -> dict[int, Point]:
    """Complication scores of the placed pieces, set on them (the patch classifier when given, else the
    segmentation network's complication maps), and, per rod index, where its fracture score peaks."""
    gaps: dict[int, Point] = {}
    if patch_net is not None:
        from inference.radiograph.hardware_patches import score_implants

        scored = score_implants(patch_net, pixels, [(sp.piece.kind, sp.mask, sp.offset) for sp in placed], src_mm)
        for k, (sp, sc) in enumerate(zip(placed, scored, strict=True)):
            sp.piece.complication_scores = dict(sc.scores)
            if sc.where is not None:
                gaps[k] = sc.where
    else:
        where = score_complications(prob, [sp.piece for sp in placed])
        for k, loc in where.items():
            if loc is not None:
                gaps[k] = (loc[1] / scale[1], loc[0] / scale[0])
    return gaps


def disc_cages(
    disc_net: Any, pixels: np.ndarray, geoms: Sequence[VertebraGeom], src_mm: float, scale: tuple[float, float], params: HardwareParams
) -> list[SourcePiece]:
    """The cages the disc classifier finds: with `params.cage_scan_threshold` set, the strongest scanned
    positions along the spine at or above it (`scan_discs`, `pick_cages`); else every disc space between
    consecutive vertebrae scored at or above `params.cage_disc_threshold`. A cage's region is the middle of
    its disc space (`hardware_discs.footprint`)."""
    from inference.radiograph.hardware_discs import (
        Body,
        cage_probabilities,
        find_discs,
        footprint,
        pick_cages,
        scan_discs,
        scan_probabilities,
    )

    bodies = [Body.from_mask(g.mask, g.offset) for g in geoms]
    if params.cage_scan_threshold is not None:
        candidates = scan_discs(bodies, src_mm)
        found = pick_cages(candidates, scan_probabilities(disc_net, pixels, candidates, src_mm), params.cage_scan_threshold, src_mm)
    else:
        candidates = find_discs(bodies, src_mm)
        probs = cage_probabilities(disc_net, pixels, candidates, src_mm)
        found = [(d, float(p)) for d, p in zip(candidates, probs, strict=True) if p >= params.cage_disc_threshold]
    shape = pixels.shape
    border_px = params.border_mm / max(src_mm, 1e-6)
    out = []
    for disc, p in found:
        region = footprint(disc, src_mm, shape)
        if region is None:
            continue
        offset, mask = region
        # The piece on the network grid (the complication maps read it when there is no patch classifier).
        net_offset = (int(offset[0] * scale[0]), int(offset[1] * scale[1]))
        net_mask = ndimage.zoom(mask.astype(np.uint8), scale, order=0).astype(bool)
        if not net_mask.any():
            net_mask = np.ones((1, 1), dtype=bool)
        out.append(SourcePiece(Piece(ImplantKind.INTERBODY_CAGE, net_mask, net_offset, score=round(float(p), 4)), offset, mask,
                               centroid_xy(mask, offset), touches_border=touches_border(offset, mask.shape, shape, border_px)))
    return out


def assign_geometry(placed: list[SourcePiece], geoms: Sequence[VertebraGeom], view: str | None, left_sign: int | None, src_mm: float) -> None:
    """Axis, tip, levels and side of every placed piece (in place)."""
    midline = spine_midline(geoms)
    screws = [sp for sp in placed if sp.piece.kind is ImplantKind.PEDICLE_SCREW]
    rods = [sp for sp in placed if sp.piece.kind is ImplantKind.ROD]
    if midline is None:
        # No vertebrae: the midline between the outermost posterior implants, if they straddle it.
        xs = [sp.centroid[0] for sp in screws + rods]
        if len(xs) >= 2 and (max(xs) - min(xs)) * src_mm >= 20.0:
            ys = np.array([min(sp.centroid[1] for sp in placed), max(sp.centroid[1] for sp in placed) + 1.0])
            centre_x = 0.5 * (max(xs) + min(xs))
            midline = (ys, np.array([centre_x, centre_x]))
    tol_px = 7.0 / max(src_mm, 1e-6)
    rank = {id(g): k for k, g in enumerate(sorted(geoms, key=lambda g: g.centroid[1]))}
    for sp in placed:
        kind = sp.piece.kind
        a, b = _axis_points(sp)
        if kind is ImplantKind.PEDICLE_SCREW:
            ref = _tip_reference(sp, geoms, midline, view)
            if ref is not None:
                da = (a[0] - ref[0]) ** 2 + (a[1] - ref[1]) ** 2
                db = (b[0] - ref[0]) ** 2 + (b[1] - ref[1]) ** 2
                head, tip = (b, a) if da < db else (a, b)
                sp.tip = tip
                sp.axis = (head, tip)
            else:
                sp.axis = (a, b)
            v = screw_level(sp.mask, sp.offset, sp.centroid, sp.tip, geoms)
            sp.levels = (v.level,) if v is not None and v.level else ()
            sp.vertebra = rank[id(v)] if v is not None else None
        elif kind is ImplantKind.ROD:
            sp.axis = _rod_polyline(sp, 10.0 / max(src_mm, 1e-6))
        elif kind is ImplantKind.INTERBODY_CAGE:
            sp.levels = disc_levels(sp.centroid, geoms)
        elif kind is ImplantKind.PLATE:
            sp.axis = (a, b)
            rows = np.nonzero(sp.mask.any(axis=1))[0] + sp.offset[0]
            sp.levels = covered_levels(float(rows.min()), float(rows.max() + 1), geoms)
        mid = midline_x(midline, sp.centroid[1])
        if view != "LAT":
            sp.column = image_side(sp.centroid[0], mid, tol_px)
        sp.side = side_of(
            sp.centroid[0], mid, left_sign, tol_px, midline_allowed=kind in (ImplantKind.INTERBODY_CAGE, ImplantKind.PLATE, ImplantKind.OTHER)
        )
        if view == "LAT" and sp.side is not Side.MIDLINE:
            sp.side = Side.UNKNOWN
        if view == "LAT" and kind in (ImplantKind.INTERBODY_CAGE, ImplantKind.PLATE):
            sp.side = Side.UNKNOWN
    # Rods span the levels of the screws they hold (same side, close to the rod), else the bodies they cross.
    for rod in rods:
        held: set[str] = set()
        grown = ndimage.binary_dilation(np.pad(rod.mask, 1), iterations=max(1, int(round(6.0 / max(src_mm, 1e-6)))))
        grown_off = (rod.offset[0] - 1, rod.offset[1] - 1)
        from inference.radiograph.hardware_post import overlap

        for s in screws:
            if s.levels and (rod.side in (Side.UNKNOWN,) or s.side in (Side.UNKNOWN, rod.side)) and overlap(s.mask, s.offset, grown, grown_off) > 0:
                held.update(s.levels)
        if held:
            rod.levels = tuple(sorted(held, key=level_index))
        else:
            rows = np.nonzero(rod.mask.any(axis=1))[0] + rod.offset[0]
            rod.levels = covered_levels(float(rows.min()), float(rows.max() + 1), geoms, min_fraction=0.5)


def _tip_reference(sp: SourcePiece, geoms: Sequence[VertebraGeom], midline: tuple[np.ndarray, np.ndarray] | None, view: str | None) -> Point | None:
    """Where a screw's tip points: the nearest vertebral body centre (the midline on frontal views)."""
    if view != "LAT" and midline is not None:
        x = midline_x(midline, sp.centroid[1])
        return (sp.centroid[0] if x is None else x, sp.centroid[1])
    if geoms:
        v = min(geoms, key=lambda g: (g.centroid[0] - sp.centroid[0]) ** 2 + (g.centroid[1] - sp.centroid[1]) ** 2)
        return v.centroid
    return None


def _implant(sp: SourcePiece, radiograph: preprocess.Radiograph) -> Implant:
    shape = radiograph.pixels.shape
    orient = radiograph.orientation
    mask = mask_to_stored(orient, shape, sp.offset, sp.mask)
    outline = tuple(orient.point_from_canonical(p, shape) for p in outline_points(sp.mask, sp.offset))
    axis = tuple(orient.point_from_canonical(p, shape) for p in sp.axis)
    return Implant(
        kind=sp.piece.kind,
        mask=mask,
        outline=outline if len(outline) >= 3 else (),
        centroid=orient.point_from_canonical(sp.centroid, shape),
        levels=sp.levels,
        side=sp.side,
        complications=sp.complications,
        assessed=sp.assessed,
        axis=axis,
        score=float(sp.piece.score),
    )


def _inside(points: Sequence[Point], shape: tuple[int, int]) -> tuple[Point, ...]:
    """Points clipped to the image (canonical grid): a grown outline or a circle may reach past the border."""
    rows, cols = shape
    return tuple((float(min(max(x, 0.0), cols)), float(min(max(y, 0.0), rows))) for x, y in points)


def _finding(
    comp: Complication,
    sp: SourcePiece,
    implant: Implant,
    radiograph: preprocess.Radiograph,
    source: SourceImage,
    gap: Point | None,
    src_mm: float,
    geoms: Sequence[VertebraGeom],
) -> Finding:
    shape = radiograph.pixels.shape
    orient = radiograph.orientation
    where = ""
    if comp is Complication.ROD_FRACTURE and gap is not None:
        evidence = tuple(orient.point_from_canonical(p, shape) for p in _inside(_circle(gap, 6.0 / max(src_mm, 1e-6)), shape))
        level = level_near(gap[1], geoms)
        if level:
            where = f" near {level}"
    else:
        ring = max(1, int(round(2.0 / max(src_mm, 1e-6))))
        grown = ndimage.binary_dilation(np.pad(sp.mask, ring), iterations=ring)
        off = (sp.offset[0] - ring, sp.offset[1] - ring)
        evidence = tuple(orient.point_from_canonical(p, shape) for p in _inside(outline_points(grown, off), shape))
        if len(evidence) < 3:
            evidence = implant.outline
    score = sp.piece.complication_scores.get(comp, 0.0)
    name = _implant_words(sp)
    description = f"possible {WHAT[comp]} of the {name}{where} ({SIGN[comp]}; score {score:.2f})"
    return Finding(
        kind=COMPLICATION_FINDING[comp],
        severity=SEVERITY[comp],
        levels=sp.levels,
        evidence=evidence,
        description=description,
        sop_instance_uid=source.sop_instance_uids[0],
    )


def _implant_words(sp: SourcePiece) -> str:
    """E.g. "left L4 pedicle screw", "right rod (L3–S1)", "interbody cage L4–5"."""
    from inference.radiograph.hardware_post import compact_span

    kind = sp.piece.kind
    side = f"{sp.side.value} " if sp.side in (Side.LEFT, Side.RIGHT) else ""
    if kind is ImplantKind.PEDICLE_SCREW:
        level = f"{sp.levels[0]} " if sp.levels else ""
        return f"{side}{level}pedicle screw"
    if kind is ImplantKind.ROD:
        return f"{side}rod" + (f" ({level_span(sp.levels)})" if sp.levels else "")
    if kind is ImplantKind.INTERBODY_CAGE:
        return "interbody cage" + (f" {compact_span(*sp.levels)}" if len(sp.levels) == 2 else "")
    return f"{side}{kind.value}"


def hardware_status(placed: Sequence[SourcePiece], view: str | None) -> tuple[HardwareStatus, list[str]]:
    """The image's hardware status and the reasons behind a "not assessable".

    "Hardware intact" needs at least one failure mode of the implants found to have been looked for
    (`SourcePiece.assessed`): a construct whose every failure mode is switched off or not modelled (e.g.
    cages only, subsidence not assessed) is "not assessable", so that the verdict never reads as a
    negative nobody checked.
    """
    if not placed:
        return HardwareStatus.NO_IMPLANTS, []
    if any(sp.complications for sp in placed):
        return HardwareStatus.POSSIBLE_COMPLICATION, []
    if all(sp.piece.kind is ImplantKind.OTHER for sp in placed):
        return HardwareStatus.NOT_ASSESSABLE, ["hardware not assessable: metal found but not recognised as spinal hardware"]
    reasons: list[str] = []
    cut = [sp for sp in placed if sp.touches_border and sp.piece.kind is not ImplantKind.OTHER]
    if cut:
        names = sorted({_implant_words(sp) for sp in cut})
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        reasons.append(
            f"hardware not assessable: implants reach the image edge ({shown}); hardware beyond the field of view not seen"
        )
    if not any(sp.assessed for sp in placed):
        reasons.append(f"hardware not assessable: {_unassessed_words(placed)}")
    if reasons:
        return HardwareStatus.NOT_ASSESSABLE, reasons
    return HardwareStatus.INTACT, []


def _unassessed_words(placed: Sequence[SourcePiece]) -> str:
    """E.g. "no failure mode of the implants found is assessed by this model version (interbody cages:
    cage subsidence not assessed; plates: no failure mode modelled)"."""
    parts = []
    for kind in dict.fromkeys(sp.piece.kind for sp in placed if sp.piece.kind is not ImplantKind.OTHER):
        modes = FAILURE_MODES[kind]
        what = f"{', '.join(c.value for c in modes)} not assessed" if modes else "no failure mode modelled"
        parts.append(f"{kind.value}s: {what}")
    return f"no failure mode of the implants found is assessed by this model version ({'; '.join(parts)})"


# -------------------------------------------------------------------------------------------- step


class HardwareStep:
    """The "spine-xr" analysis' hardware step (see `inference.radiograph.analysis.HardwareStep`)."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.info = registry.spec(MODEL_NAME).info

    def model(self) -> HardwareModel:
        """The loaded model (loaded once through the registry)."""
        return HardwareModel.from_registry(self.registry)

    def run(self, radiograph: preprocess.Radiograph, vertebrae: Sequence[Vertebra], source: SourceImage) -> HardwareOutcome:
        """Implants on one radiograph (stored grid), given the vertebrae already found there."""
        return self.model().analyse(radiograph, vertebrae, source)


def hardware_step(registry: ModelRegistry) -> HardwareStep | None:
    """Factory registered with the analysis: None when the model folder is not installed."""
    try:
        return HardwareStep(registry)
    except ModelError:
        return None


register_hardware_step(hardware_step)
