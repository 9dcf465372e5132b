"""The graphics both the Secondary Capture and the presentation state draw, in source pixel space.

One function turns an `ImageResult` into shapes and labels on each source instance; `sc` burns
them into pixels and `pr` writes them as vector graphics, so both show exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from inference.results import ImageResult, Implant, MeasurementKind, Point, Vertebra
from reports import geometry, style


@dataclass(frozen=True)
class Shape:
    """A polyline (closed: a polygon) in SCOORD pixel coordinates of one source instance."""

    points: tuple[Point, ...]
    closed: bool
    colour: style.RGB
    layer: str
    #: Relative line weight: 1 thin (measurement lines), 2 outlines, 3 alerts.
    weight: int = 2


@dataclass(frozen=True)
class Label:
    """Text anchored at a point; `align` says on which side of the anchor it extends."""

    text: str
    anchor: Point
    colour: style.RGB
    layer: str
    align: str = "left"  # "left": text starts at the anchor; "right": text ends at it
    emphasis: bool = False  # drawn larger (level names)
    #: Second line in the alert colour (e.g. the Genant grade under "L1").
    detail: str = ""

    @property
    def one_line(self) -> str:
        """Text and detail on one line, for renderers without multi-line labels."""
        return f"{self.text}: {self.detail}" if self.detail else self.text


@dataclass
class Drawing:
    """Everything drawn on one source instance (index into the image's sources)."""

    index: int
    shapes: list[Shape] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)


#: Graphic layers, bottom to top (names follow DICOM CS: upper case, <= 16 characters).
LAYERS = ("VERTEBRAE", "IMPLANTS", "MEASUREMENTS", "FINDINGS", "LABELS")


def bbox(points: Sequence[Point]) -> tuple[float, float, float, float]:
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def _outline(item: Vertebra | Implant) -> tuple[Point, ...]:
    if len(item.outline) >= 3:
        return tuple(item.outline)
    return tuple(geometry.mask_outline(item.mask)) if item.mask.array.ndim == 2 else ()


def radiograph_drawing(image: ImageResult) -> Drawing:
    """Shapes and labels of a projection radiograph (drawn on source instance 0)."""
    drawing = Drawing(index=0)
    outlines: list[tuple[Vertebra | Implant, tuple[Point, ...]]] = []
    for item in style.ordered_vertebrae(image.vertebrae):
        pts = _outline(item.vertebra)
        if len(pts) < 3:
            continue
        outlines.append((item.vertebra, pts))
        fractured = style.is_fractured(item.vertebra)
        drawing.shapes.append(Shape(pts, True, style.ALERT_COLOUR if fractured else style.vertebra_colour(item.vertebra),
                                    "FINDINGS" if fractured else "VERTEBRAE", 3 if fractured else 2))
        heights = item.vertebra.heights
        if heights is not None:
            for h in (heights.anterior, heights.middle, heights.posterior):
                if h is not None:
                    drawing.shapes.append(Shape((h.start, h.end), False, style.MEASUREMENT_COLOUR, "MEASUREMENTS", 1))
    for implant in image.implants:
        pts = _outline(implant)
        if len(pts) < 3:
            continue
        outlines.append((implant, pts))
        alert = bool(implant.complications)
        drawing.shapes.append(Shape(pts, True, style.ALERT_COLOUR if alert else style.implant_colour(implant),
                                    "FINDINGS" if alert else "IMPLANTS", 3 if alert else 2))
    # Labels sit right of everything drawn at their height, so they never cover a structure.
    boxes = [bbox(pts) for _, pts in outlines]
    gap = max(4.0, 0.02 * (image.source.columns or 1))

    def band(y0: float, y1: float) -> list[tuple[float, float, float, float]]:
        return [b for b in boxes if b[1] < y1 and b[3] > y0]

    # A complicated implant on the image's right side is reported under its level's label; one on the
    # left gets its own label left of everything at its height, so text sits on the implant's side.
    level_details: dict[str, list[str]] = {}
    left_labels: list[Label] = []
    centres = {v.level: v.centroid[0] for v in image.vertebrae if v.level}
    for implant in image.implants:
        if not implant.complications:
            continue
        text = ", ".join(c.value for c in implant.complications) + "?"
        pts = _outline(implant) or (implant.centroid,)
        x0, y0, x1, y1 = bbox(pts)
        level = next((lv for lv in implant.levels if lv in centres), None)
        if level is not None and implant.centroid[0] >= centres[level]:
            level_details.setdefault(level, []).append(text)
        else:
            edge = min([b[0] for b in band(y0, y1)] + [x0])
            left_labels.append(Label(text, (edge - gap, (y0 + y1) / 2), style.ALERT_COLOUR, "FINDINGS", align="right"))
    for item in style.ordered_vertebrae(image.vertebrae):
        v = item.vertebra
        pts = _outline(v)
        if len(pts) < 3:
            continue
        x0, y0, x1, y1 = bbox(pts)
        edge = max([b[2] for b in band(y0, y1)] + [x1])
        fractured = style.is_fractured(v)
        details = ([style.fracture_text(v)] if fractured else []) + level_details.get(v.level or "", [])
        alert = bool(details)
        colour = style.ALERT_COLOUR if alert else style.vertebra_colour(v)
        drawing.labels.append(Label(style.short_level(v, item.ordinal), (edge + gap, v.centroid[1]), colour,
                                    "FINDINGS" if alert else "LABELS", emphasis=True, detail="; ".join(details)))
    drawing.labels.extend(left_labels)
    for finding in image.findings:
        if len(finding.evidence) >= 3:
            drawing.shapes.append(Shape(tuple(finding.evidence), True, style.ALERT_COLOUR, "FINDINGS", 3))
    for m in image.measurements:
        # A height loss is already written beside its vertebra (the grade line); its evidence is the
        # vertebra's outline. Drawing it again would only stack a second label on the level label.
        if len(m.evidence) < 2 or m.kind is MeasurementKind.HEIGHT_LOSS:
            continue
        for segment in measurement_lines(m.evidence, m.unit):
            drawing.shapes.append(Shape(segment, False, style.MEASUREMENT_COLOUR, "MEASUREMENTS", 2))
        x0, y0, x1, y1 = bbox(m.evidence)
        unit = "°" if m.unit == "deg" else f" {m.unit}"
        drawing.labels.append(Label(f"{m.kind.value} {m.value:.1f}{unit}", (x1 + 6.0, y0), style.MEASUREMENT_COLOUR,
                                    "MEASUREMENTS"))
    return drawing


def measurement_lines(evidence: Sequence[Point], unit: str) -> list[tuple[Point, ...]]:
    """Segments to draw for a measurement: an angle given by 4 points is two lines (two endplates)."""
    points = tuple(evidence)
    if unit == "deg" and len(points) == 4:
        return [points[:2], points[2:]]
    return [points]


def volume_drawings(image: ImageResult) -> list[Drawing]:
    """Per-slice shapes and labels of a CT/MR series: each structure outlined on its largest slice."""
    by_index: dict[int, Drawing] = {}
    for item in style.ordered_vertebrae(image.vertebrae):
        cut = geometry.largest_slice_outline(item.vertebra.mask)
        if cut is None:
            continue
        index, pts = cut
        d = by_index.setdefault(index, Drawing(index=index))
        fractured = style.is_fractured(item.vertebra)
        colour = style.ALERT_COLOUR if fractured else style.vertebra_colour(item.vertebra)
        d.shapes.append(Shape(tuple(pts), True, colour, "FINDINGS" if fractured else "VERTEBRAE", 2))
        x0, y0, x1, y1 = bbox(pts)
        d.labels.append(Label(style.short_level(item.vertebra, item.ordinal), (x1 + 4.0, (y0 + y1) / 2), colour,
                              "LABELS", emphasis=True))
    for implant in image.implants:
        cut = geometry.largest_slice_outline(implant.mask)
        if cut is None:
            continue
        index, pts = cut
        d = by_index.setdefault(index, Drawing(index=index))
        alert = bool(implant.complications)
        d.shapes.append(Shape(tuple(pts), True, style.ALERT_COLOUR if alert else style.implant_colour(implant),
                              "FINDINGS" if alert else "IMPLANTS", 2))
    return [by_index[k] for k in sorted(by_index)]


def drawings(image: ImageResult) -> list[Drawing]:
    """All drawings of an analysed image."""
    if image.source.is_volume:
        return volume_drawings(image)
    return [radiograph_drawing(image)]


