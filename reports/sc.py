"""Annotated Secondary Capture: what every PACS can show, even one that knows nothing of SEG or SR.

Layout (canvas pixels): a yellow banner across the top with the disclaimer and, smaller, the model versions;
below it the source image, windowed as its modality asked (VOI LUT or window from the source,
MONOCHROME1 inverted) with coloured outlines, level labels and measurement lines; on the right a
legend panel with the screening verdict, hardware status, findings, heights table and colour key.
Text sizes scale with the image so the banner and verdict stay readable in a PACS thumbnail and the
labels at full screen.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import HTJ2K, JPEG2000, JPEG2000MC, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless

from inference.results import Complication, HardwareStatus, ImageResult, ImplantKind, RegionMask, StudyResult
from reports import annotations as graphics  # `annotations` is the __future__ feature name here
from reports import geometry, style
from reports.common import (
    DISCLAIMER,
    OutputKind,
    Producer,
    apply_equipment,
    apply_identity,
    apply_series,
    copy_image_attributes,
    direction_letters,
    empty_laterality_without_body_part,
    fit_lo,
    models_text,
    patient_orientation,
    sc_uid,
    series_uid,
)

#: Longest side of the SC image part: full-screen sharp, a fraction of a 3000 px radiograph's bytes.
MAX_IMAGE_SIDE = 2048
#: Small sources (a 512 px CT slice) are enlarged so labels and legend stay readable.
MIN_IMAGE_SIDE = 768
# Pillow's built-in scalable font (no system fonts needed) lacks a few typographic characters.
_PLAIN = str.maketrans({"—": "-", "–": "-", "•": "·", "−": "-", "’": "'"})
BANNER_BACKGROUND: style.RGB = (255, 210, 0)
BANNER_TEXT: style.RGB = (0, 0, 0)
PANEL_BACKGROUND: style.RGB = (16, 16, 16)
PANEL_TEXT: style.RGB = (235, 235, 235)
MUTED_TEXT: style.RGB = (170, 170, 170)


# ------------------------------------------------------------------------------------------ pixels


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2/3 windowing to [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    return np.clip((values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5, 0.0, 1.0)


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS (WindowCenter/WindowWidth may hold several)."""
    return float(value[0]) if isinstance(value, MultiValue) else float(value)  # type: ignore[arg-type]


def display_pixels(ds: Dataset, frame: np.ndarray | None = None) -> np.ndarray:
    """The source as its modality meant it to be seen, as float [0, 1] with 1 = white.

    Modality LUT (rescale), then the first VOI LUT or window of the source; without either, the
    0.5-99.5 percentile range.  MONOCHROME1 (and a MONOCHROME2 with an INVERSE presentation LUT
    shape) is inverted so bone is white in every output.
    """
    stored = ds.pixel_array if frame is None else frame
    values = apply_modality_lut(stored, ds).astype(np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        # LUT entries are indexed by integer modality values.
        lut = apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0, prefer_lut=True).astype(np.float64)
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        out = np.clip(lut / float(2**bits - 1), 0.0, 1.0)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        out = _window(values, _first(ds.WindowCenter), _first(ds.WindowWidth), str(ds.get("VOILUTFunction", "LINEAR")))
    else:
        lo, hi = np.percentile(values, (0.5, 99.5))
        out = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    shape = str(ds.get("PresentationLUTShape", "IDENTITY"))
    if photometric == "MONOCHROME1" or (photometric == "MONOCHROME2" and shape == "INVERSE"):
        out = 1.0 - out
    return out


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class PlacedText:
    """A text drawn on the canvas and its box (x0, y0, x1, y1), for tests and docs."""

    text: str
    box: tuple[int, int, int, int]
    colour: style.RGB


@dataclass
class Rendering:
    """The finished canvas and where things went on it."""

    pixels: np.ndarray
    #: (x0, y0) of the source image on the canvas and canvas pixels per source pixel.
    image_origin: tuple[int, int]
    scale: float
    texts: list[PlacedText] = field(default_factory=list)
    banner_height: int = 0
    #: What is shown (the radiograph, a reformat, a slice) and from which sources.
    view: View | None = None
    panel_box: tuple[int, int, int, int] = (0, 0, 0, 0)

    def to_canvas(self, x: float, y: float) -> tuple[float, float]:
        """Canvas position of a SCOORD point of the source image."""
        return (self.image_origin[0] + x * self.scale, self.image_origin[1] + y * self.scale)

    def find(self, text: str) -> PlacedText:
        """The placed text equal to `text` (KeyError if none)."""
        for t in self.texts:
            if t.text == text:
                return t
        raise KeyError(text)


@dataclass(frozen=True)
class _Fonts:
    label: ImageFont.FreeTypeFont
    detail: ImageFont.FreeTypeFont
    body: ImageFont.FreeTypeFont
    small: ImageFont.FreeTypeFont
    verdict: ImageFont.FreeTypeFont
    unit: float


def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in font at `size`."""
    font = ImageFont.load_default(size=size)
    # Given a size, load_default always loads the FreeType font (or raises); its annotation also allows the
    # size-less bitmap fallback.
    assert isinstance(font, ImageFont.FreeTypeFont)
    return font


def _fonts(image_height: int) -> _Fonts:
    unit = max(image_height, 500) / 100.0
    return _Fonts(
        label=_font(max(14, round(2.6 * unit))),
        detail=_font(max(12, round(1.9 * unit))),
        body=_font(max(12, round(1.9 * unit))),
        small=_font(max(11, round(1.5 * unit))),
        verdict=_font(max(16, round(5.2 * unit))),
        unit=unit,
    )


def _pieces(word: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """`word` cut into pieces that fit `width` (a UID or a long path has no space to break at)."""
    pieces: list[str] = []
    while word and font.getlength(word) > width:
        cut = max(1, next((k for k in range(len(word), 0, -1) if font.getlength(word[:k]) <= width), 1))
        pieces.append(word[:cut])
        word = word[cut:]
    return pieces + ([word] if word else [])


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    words = [piece for word in text.translate(_PLAIN).split() for piece in _pieces(word, font, width)]
    lines: list[str] = []
    line = ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if not line or font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    if line:
        lines.append(line)
    return lines or [""]


@dataclass
class _Line:
    text: str
    font: ImageFont.FreeTypeFont
    colour: style.RGB
    swatch: style.RGB | None = None
    background: style.RGB | None = None
    gap_before: float = 0.0


def _legend_lines(result: StudyResult, image: ImageResult, fonts: _Fonts, drawing: graphics.Drawing) -> list[_Line]:
    """The panel's lines; its key names only colours `drawing` uses."""
    verdict = result.verdict
    lines: list[_Line] = [
        _Line(verdict.outcome.value.upper(), fonts.verdict, (0, 0, 0), background=style.OUTCOME_COLOURS[verdict.outcome]),
    ]
    for reason in verdict.reasons:
        lines.append(_Line(f"• {reason}", fonts.body, PANEL_TEXT))
    if verdict.hardware is not None:
        colour = style.ALERT_COLOUR if verdict.hardware is HardwareStatus.POSSIBLE_COMPLICATION else PANEL_TEXT
        lines.append(_Line(f"Hardware: {verdict.hardware.value}", fonts.body, colour, gap_before=0.6))
    if verdict.instrumentation:
        lines.append(_Line(verdict.instrumentation, fonts.body, PANEL_TEXT))
    findings = [*result.findings, *image.findings]
    if findings:
        lines.append(_Line("Findings", fonts.body, MUTED_TEXT, gap_before=0.6))
        for f in findings:
            where = f" {style.level_text(f.levels)}" if f.levels else ""
            lines.append(_Line(f"• {f.kind.value}{where} ({f.severity.value})", fonts.body, style.ALERT_COLOUR))
    if image.measurements:
        lines.append(_Line("Measurements", fonts.body, MUTED_TEXT, gap_before=0.6))
        for m in image.measurements:
            unit = "°" if m.unit == "deg" else f" {m.unit}"
            where = f" {style.level_text(m.levels)}" if m.levels else ""
            lines.append(_Line(f"• {m.kind.value}{where}: {m.value:.1f}{unit}", fonts.body, style.MEASUREMENT_COLOUR))
    ordered = style.ordered_vertebrae(image.vertebrae)
    with_heights = [o for o in ordered if o.vertebra.heights is not None]
    if with_heights:
        lines.append(_Line("Vertebral body heights (mm), A / M / P", fonts.body, MUTED_TEXT, gap_before=0.6))
        for o in with_heights:
            h = o.vertebra.heights
            assert h is not None
            vals = " / ".join(f"{x.value_mm:.1f}" if x is not None else "–" for x in (h.anterior, h.middle, h.posterior))
            grade = style.fracture_text(o.vertebra)
            colour = style.ALERT_COLOUR if grade else PANEL_TEXT
            lines.append(_Line(f"{style.short_level(o.vertebra, o.ordinal)}: {vals}" + (f"  {grade}" if grade else ""),
                               fonts.body, colour, swatch=style.ALERT_COLOUR if grade else style.vertebra_colour(o.vertebra)))
    elif ordered:
        lines.append(_Line(_vertebrae_text(ordered), fonts.body, PANEL_TEXT, gap_before=0.6))
    lines.append(_Line("Key", fonts.body, MUTED_TEXT, gap_before=0.6))
    if ordered:
        # The key says what the drawing shows: one grey when no level is named (the sacrum aside).
        bodies = [o.vertebra for o in ordered if o.vertebra.level != "S1"]  # (a sacrum alone: keyed below)
        if bodies and any(v.level is not None for v in bodies):
            lines.append(_Line("vertebra outline (colour by level)", fonts.small, PANEL_TEXT,
                               swatch=style.vertebra_colour(next(v for v in bodies if v.level is not None))))
        elif bodies:
            lines.append(_Line("vertebra outline (no level named)", fonts.small, PANEL_TEXT,
                               swatch=style.UNKNOWN_LEVEL_COLOUR))
        sacrum = next((o.vertebra for o in ordered if o.vertebra.level == "S1"), None)
        if sacrum is not None:
            lines.append(_Line("sacrum outline", fonts.small, PANEL_TEXT, swatch=style.vertebra_colour(sacrum)))
    for kind in ImplantKind:
        count = sum(1 for i in image.implants if i.kind is kind)
        if count:
            lines.append(_Line(f"{style.IMPLANT_CLASS_LABELS[kind].lower()} ({count})", fonts.small, PANEL_TEXT,
                               swatch=style.implant_colour(kind)))
    if any(v.heights for v in image.vertebrae) or any(m.evidence for m in image.measurements):
        lines.append(_Line("measurement lines", fonts.small, PANEL_TEXT, swatch=style.MEASUREMENT_COLOUR))
    if _draws_alert(drawing):
        lines.append(_Line("finding / possible complication", fonts.small, PANEL_TEXT, swatch=style.ALERT_COLOUR))
    for note in _notes_not_in_verdict(image.notes, result.verdict.reasons):
        lines.append(_Line(f"Note: {note}", fonts.small, MUTED_TEXT, gap_before=0.3))
    lines.append(_Line(f"Models: {models_text(result.models)}", fonts.small, MUTED_TEXT, gap_before=0.6))
    return lines


def _vertebrae_text(ordered: Sequence[style.Ordered]) -> str:
    """The vertebrae found, as the image labels them: "Vertebrae: L3, L4, L5", and the unnamed ones counted
    ("17 found, level unknown: ?1-?17 from the top") rather than listed one by one."""
    named = [o.label for o in ordered if o.vertebra.level is not None]
    unnamed = [o for o in ordered if o.vertebra.level is None]
    parts = [", ".join(named)] if named else []
    if unnamed:
        span = style.short_level(unnamed[0].vertebra, unnamed[0].ordinal)
        if len(unnamed) > 1:
            span += f"–{style.short_level(unnamed[-1].vertebra, unnamed[-1].ordinal)}"
        what = "found" if not named else "more"
        parts.append(f"{len(unnamed)} {what}, level unknown: {span} from the top")
    return "Vertebrae: " + "; ".join(parts)


def _draws_alert(drawing: graphics.Drawing) -> bool:
    """True when something on the image is drawn in the finding colour (the key explains only what is shown)."""
    return any(s.colour == style.ALERT_COLOUR for s in drawing.shapes) or any(
        lb.colour == style.ALERT_COLOUR for lb in drawing.labels)


def _notes_not_in_verdict(notes: Sequence[str], reasons: Sequence[str]) -> list[str]:
    """The image's notes less the "<complication> not assessed" ones whose complication a verdict reason above
    already names (the hardware reason lists every failure mode that was not assessed)."""
    said = " ".join(reasons)
    repeated = {c.not_assessed_note for c in Complication if c.value in said}
    return [n for n in notes if n not in repeated]


def _stroke(font: ImageFont.FreeTypeFont) -> int:
    """Width of the dark outline around text drawn on the image."""
    return max(1, round(font.size / 12))


def _clear_of(draw: ImageDraw.ImageDraw, xy: tuple[float, float], label: graphics.Label, font: ImageFont.FreeTypeFont,
              detail_font: ImageFont.FreeTypeFont, anchor: str, taken: list[tuple[float, float, float, float]],
              bounds: tuple[float, float]) -> float:
    """The row nearest `xy`'s at which `label` (and its detail line) overlaps no label drawn before it and stays
    between the canvas rows `bounds` (the image); the box it will occupy is added to `taken`.

    Two detections a few pixels apart printed their names on top of each other; pushing each clash downwards
    then slid a run of labels beside the wrong vertebrae and off the bottom of the image (a radiologist's
    review, 2026-12-07): the nearest free row, above or below, keeps every label as close to its own
    structure as the others allow."""
    x, y = xy

    def box_at(row: float) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = draw.textbbox((x, row), label.text.translate(_PLAIN), font=font, anchor=anchor,
                                       stroke_width=_stroke(font))
        if label.detail:
            detail_anchor = "la" if label.align == "left" else "ra"
            d = draw.textbbox((x, row + font.size * 0.55), label.detail.translate(_PLAIN), font=detail_font,
                              anchor=detail_anchor, stroke_width=_stroke(detail_font))
            x0, y0, x1, y1 = min(x0, d[0]), min(y0, d[1]), max(x1, d[2]), max(y1, d[3])
        return x0, y0, x1, y1

    def clear(box: tuple[float, float, float, float]) -> bool:
        return not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken)

    box = box_at(y)
    top, bottom = bounds
    # Inside the image first: a label whose structure touches the edge is drawn just inside it.
    y += max(top - box[1], 0.0) or min(bottom - box[3], 0.0)
    box = box_at(y)
    height = box[3] - box[1]
    step = max(1.0, height / 4)
    best = y
    for k in range(int(2 * (bottom - top) / step) + 2):
        offset = (k + 1) // 2 * step * (1 if k % 2 else -1)  # 0, +s, -s, +2s, -2s, ...
        candidate = box_at(y + offset)
        if candidate[1] < top - 0.5 or candidate[3] > bottom + 0.5:
            continue
        if clear(candidate):
            best = y + offset
            break
    taken.append(box_at(best))
    return best


def _text(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: ImageFont.FreeTypeFont,
          colour: style.RGB, placed: list[PlacedText], *, stroke: bool = True, anchor: str = "la") -> None:
    shown = text.translate(_PLAIN)
    stroke_width = _stroke(font) if stroke else 0
    draw.text(xy, shown, font=font, fill=colour, anchor=anchor, stroke_width=stroke_width, stroke_fill=(0, 0, 0))
    box = draw.textbbox(xy, shown, font=font, anchor=anchor, stroke_width=stroke_width)
    placed.append(PlacedText(text, tuple(int(round(v)) for v in box), colour))  # type: ignore[arg-type]


def _panel(result: StudyResult, image: ImageResult, fonts: _Fonts, width: int,
           drawing: graphics.Drawing) -> tuple[list[tuple[_Line, list[str]]], int]:
    pad = round(1.2 * fonts.unit)
    inner = width - 2 * pad
    laid: list[tuple[_Line, list[str]]] = []
    height = pad
    for line in _legend_lines(result, image, fonts, drawing):
        text_width = inner - (round(line.font.size * 1.6) if line.swatch else 0)
        wrapped = _wrap(line.text, line.font, text_width)
        laid.append((line, wrapped))
        height += round(line.gap_before * line.font.size) + len(wrapped) * round(line.font.size * 1.25)
        if line.background:
            height += round(0.6 * line.font.size)
    return laid, height + pad


def _draw_panel(draw: ImageDraw.ImageDraw, laid: list[tuple[_Line, list[str]]], box: tuple[int, int, int, int],
                fonts: _Fonts, placed: list[PlacedText]) -> None:
    x0, y0, x1, _ = box
    pad = round(1.2 * fonts.unit)
    y = y0 + pad
    for line, wrapped in laid:
        y += round(line.gap_before * line.font.size)
        step = round(line.font.size * 1.25)
        if line.background:
            block = len(wrapped) * step + round(0.6 * line.font.size)
            draw.rectangle((x0 + pad, y, x1 - pad, y + block), fill=line.background)
            y += round(0.3 * line.font.size)
        x = x0 + pad
        if line.swatch:
            sw = round(line.font.size * 1.2)
            cy = y + step // 2
            draw.line((x, cy, x + sw, cy), fill=line.swatch, width=max(2, round(line.font.size / 5)))
            x += round(line.font.size * 1.6)
        for text in wrapped:
            if line.background:
                _text(draw, (x + round(0.3 * line.font.size), y), text, line.font, line.colour, placed, stroke=False)
            else:
                _text(draw, (x, y), text, line.font, line.colour, placed)
            y += step
        if line.background:
            y += round(0.3 * line.font.size)


def _fit_font(text: str, width: int, size: int) -> ImageFont.FreeTypeFont:
    font = _font(size)
    while size > 10 and font.getlength(text.translate(_PLAIN)) > width:
        size = int(size * 0.9)
        font = _font(size)
    return font


@dataclass
class View:
    """What the capture shows: a grey image with square pixels and the drawing in its coordinates."""

    grey: np.ndarray
    drawing: graphics.Drawing
    #: PatientOrientation of the view (row and column directions), if known.
    orientation: tuple[str, str] | None
    #: Source instances the view is made of (SourceImageSequence).
    sources: list[Dataset]
    #: Line under the banner saying what the view is, e.g. "sagittal reformat".
    caption: str = ""


def _axial(sources: Sequence[Dataset]) -> bool:
    iop = sources[0].get("ImageOrientationPatient")
    if not iop or len(iop) != 6 or "ImagePositionPatient" not in sources[0]:
        return False
    normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
    return abs(normal[2]) > 0.7


def _sagittal_view(image: ImageResult, sources: Sequence[Dataset]) -> View:
    """Mid-sagittal reformat of an axial series: the spine as a radiologist pictures it.

    Vertebrae are outlined where the sagittal plane cuts them; implants (screws sit beside the
    midline) are outlined as projected through the volume, like on a lateral radiograph.
    """
    xs = [v.centroid[0] for v in image.vertebrae] or [i.centroid[0] for i in image.implants]
    column = int(np.clip(np.median(xs) if xs else image.source.columns / 2, 0, image.source.columns - 1))
    z = np.asarray([float(ds.ImagePositionPatient[2]) for ds in sources])
    order = np.argsort(-z)  # head at the top
    steps = np.abs(np.diff(z[order]))
    slice_spacing = float(np.median(steps)) if len(steps) else 1.0
    row_spacing = float(sources[0].PixelSpacing[0]) if "PixelSpacing" in sources[0] else slice_spacing
    stretch = max(slice_spacing / row_spacing, 1e-3)
    plane = np.stack([display_pixels(sources[k])[:, column] for k in order])  # (slices, rows)
    height = max(1, round(plane.shape[0] * stretch))
    grey = np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize(
        (plane.shape[1], height), Image.Resampling.BILINEAR))
    drawing = graphics.Drawing(index=-1)

    def outline(cut: np.ndarray) -> tuple[tuple[float, float], ...]:
        pts = geometry.mask_outline(RegionMask.from_dense(cut[order]))
        return tuple((x, y * stretch) for x, y in pts)

    boxes: list[tuple[float, float, float, float]] = []
    for item in style.ordered_vertebrae(image.vertebrae):
        pts = outline(item.vertebra.mask.dense()[:, :, column])
        if len(pts) < 3:
            continue
        fractured = style.is_fractured(item.vertebra)
        colour = style.ALERT_COLOUR if fractured else style.vertebra_colour(item.vertebra)
        drawing.shapes.append(graphics.Shape(pts, True, colour, "FINDINGS" if fractured else "VERTEBRAE", 2))
        boxes.append(graphics.bbox(pts))
    for implant in image.implants:
        # numpy's stub allows a scalar for any(axis=...), but a 3-D mask reduced over one axis is an array
        pts = outline(cast(np.ndarray, implant.mask.dense().any(axis=2)))
        if len(pts) < 3:
            continue
        alert = bool(implant.complications)
        drawing.shapes.append(graphics.Shape(pts, True, style.ALERT_COLOUR if alert else style.implant_colour(implant),
                                                "FINDINGS" if alert else "IMPLANTS", 2))
        boxes.append(graphics.bbox(pts))
    gap = max(4.0, 0.02 * grey.shape[1])
    for item in style.ordered_vertebrae(image.vertebrae):
        pts = outline(item.vertebra.mask.dense()[:, :, column])
        if len(pts) < 3:
            continue
        x0, y0, x1, y1 = graphics.bbox(pts)
        edge = min([b[0] for b in boxes if b[1] < y1 and b[3] > y0] + [x0])  # anterior side: left
        fractured = style.is_fractured(item.vertebra)
        colour = style.ALERT_COLOUR if fractured else style.vertebra_colour(item.vertebra)
        drawing.labels.append(graphics.Label(style.short_level(item.vertebra, item.ordinal),
                                                (edge - gap, (y0 + y1) / 2), colour, "LABELS", align="right",
                                                emphasis=True, detail=style.fracture_text(item.vertebra)))
    iop = [float(v) for v in sources[0].ImageOrientationPatient]
    normal = np.cross(iop[:3], iop[3:])
    down = -normal if normal[2] > 0 else normal
    orientation = (_letters(iop[3:]), _letters(list(down)))
    return View(grey, drawing, orientation, [sources[k] for k in order], "sagittal reformat")


def _letters(vector: Sequence[float]) -> str:
    return direction_letters([float(v) for v in vector])


def view_of(image: ImageResult, sources: Sequence[Dataset]) -> View:
    """The view a capture of `image` shows: the radiograph, a sagittal reformat, or the busiest slice."""
    if not image.source.is_volume:
        return View(display_pixels(sources[0]), graphics.radiograph_drawing(image), patient_orientation(sources[0]),
                    [sources[0]])
    if _axial(sources):
        return _sagittal_view(image, sources)
    drawings = graphics.volume_drawings(image)
    if drawings:
        drawing = max(drawings, key=lambda d: len(d.shapes))
    else:
        drawing = graphics.Drawing(index=len(sources) // 2)
    ds = sources[drawing.index]
    return View(display_pixels(ds), drawing, patient_orientation(ds), [ds], f"slice {drawing.index + 1} of {len(sources)}")


def _on_image(x: float, label: graphics.Label, font: ImageFont.FreeTypeFont, detail_font: ImageFont.FreeTypeFont, width: int,
              margin: int) -> float:
    """The label's anchor x moved, if need be, so its text stays on the image (canvas x 0 .. `width`): a label
    right-aligned left of an implant near the left edge ran off the canvas, one left-aligned near the right
    edge into the results panel, which covers it."""
    extent = font.getlength(label.text.translate(_PLAIN))
    if label.detail:
        extent = max(extent, detail_font.getlength(label.detail.translate(_PLAIN)))
    start = x - extent if label.align == "right" else x
    shift = max(margin - start, 0.0) or min(width - margin - (start + extent), 0.0)
    return x + shift


def render(result: StudyResult, image: ImageResult, sources: Sequence[Dataset]) -> Rendering:
    """Draw the annotated capture of one analysed image."""
    view = view_of(image, sources)
    grey = view.grey
    rows, cols = grey.shape
    scale = min(1.0, MAX_IMAGE_SIDE / max(rows, cols))
    if max(rows, cols) < MIN_IMAGE_SIDE:
        scale = MIN_IMAGE_SIDE / max(rows, cols)
    width, height = max(1, round(cols * scale)), max(1, round(rows * scale))
    base = Image.fromarray(np.rint(np.clip(grey, 0, 1) * 255).astype(np.uint8), mode="L")
    if scale != 1.0:
        resample = Image.Resampling.LANCZOS if scale < 1.0 else Image.Resampling.BICUBIC
        base = base.resize((width, height), resample)
    fonts = _fonts(height)
    panel_width = max(round(0.42 * width), round(22 * fonts.body.size))
    laid, panel_height = _panel(result, image, fonts, panel_width, view.drawing)
    # Banner: the disclaimer large (readable in a thumbnail), the model versions on a second line.
    banner_width = width + panel_width - round(2 * fonts.unit)
    banner_font = _fit_font(DISCLAIMER, banner_width, max(16, round(5.0 * fonts.unit)))
    models_line = f"{models_text(result.models)}"
    models_font = _fit_font(models_line, banner_width, max(11, round(1.7 * fonts.unit)))
    pad = round(0.35 * banner_font.size)
    banner_height = pad + round(banner_font.size * 1.15) + round(models_font.size * 1.3) + pad
    canvas_h = banner_height + max(height, panel_height)
    canvas = Image.new("RGB", (width + panel_width, canvas_h), PANEL_BACKGROUND)
    canvas.paste(base.convert("RGB"), (0, banner_height))
    draw = ImageDraw.Draw(canvas)
    rendering = Rendering(pixels=np.zeros(0), image_origin=(0, banner_height), scale=scale,
                          banner_height=banner_height, view=view,
                          panel_box=(width, banner_height, width + panel_width, canvas_h))
    placed = rendering.texts
    draw.rectangle((0, 0, canvas.width, banner_height), fill=BANNER_BACKGROUND)
    _text(draw, (round(fonts.unit), pad), DISCLAIMER, banner_font, BANNER_TEXT, placed, stroke=False)
    _text(draw, (round(fonts.unit), pad + round(banner_font.size * 1.15)), models_line, models_font, BANNER_TEXT,
          placed, stroke=False)
    line_unit = max(1, round(fonts.unit * 0.28))
    for drawing in (view.drawing,):
        for shape in drawing.shapes:
            pts = [rendering.to_canvas(x, y) for x, y in shape.points]
            if shape.closed:
                pts.append(pts[0])
            draw.line(pts, fill=shape.colour, width=line_unit * shape.weight, joint="curve")
        taken: list[tuple[float, float, float, float]] = []
        for label in drawing.labels:
            font = fonts.label if label.emphasis else fonts.detail
            x, y = rendering.to_canvas(*label.anchor)
            x = _on_image(x, label, font, fonts.detail, width, round(fonts.unit * 0.5))
            anchor = "lm" if label.align == "left" else "rm"
            if label.detail:
                y -= font.size * 0.45
            wanted = y
            y = _clear_of(draw, (x, y), label, font, fonts.detail, anchor, taken,
                          (banner_height, banner_height + height))
            if abs(y - wanted) > 0.6 * font.size:
                # Moved away from its structure by other labels: a leader line says which structure it names.
                ax, ay = rendering.to_canvas(*label.anchor)
                tip = x - line_unit if label.align == "left" else x + line_unit
                draw.line([(ax, ay), (tip, y)], fill=label.colour, width=max(1, line_unit // 2))
            _text(draw, (x, y), label.text, font, label.colour, placed, anchor=anchor)
            if label.detail:
                _text(draw, (x, y + font.size * 0.55), label.detail, fonts.detail, style.ALERT_COLOUR, placed,
                      anchor="la" if label.align == "left" else "ra")
    _draw_panel(draw, laid, rendering.panel_box, fonts, placed)
    rendering.pixels = np.asarray(canvas)
    return rendering


# ---------------------------------------------------------------------------------------- encoding

_SOURCE_ATTRIBUTES = ("BodyPartExamined", "Laterality")


def build_sc(
    result: StudyResult,
    image: ImageResult,
    sources: Sequence[Dataset],
    *,
    instance_number: int,
    producer: Producer,
) -> Dataset:
    """The annotated Secondary Capture of one analysed image."""
    rendering = render(result, image, sources)
    assert rendering.view is not None  # render() always sets the view
    source = sources[0]
    orientation = rendering.view.orientation
    sc = hd.sc.SCImage(
        pixel_array=rendering.pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_uid(result, OutputKind.SC),
        series_number=1,  # replaced by apply_series
        sop_instance_uid=sc_uid(result, image),
        instance_number=instance_number,
        manufacturer=producer.manufacturer,
        # highdicom wants two direction values for a patient image; a source that gives none (PatientOrientation
        # absent or empty, as CR allows) gets an empty one below, as the General Image module's Type 2C allows.
        patient_orientation=orientation or ("L", "F"),
    )
    if orientation is None:
        # highdicom's constructor sets a list, so mypy infers list[str]; None is pydicom's empty value
        sc.PatientOrientation = None  # type: ignore[assignment]
    apply_identity(sc, source)
    apply_equipment(sc, source, producer)
    apply_series(sc, OutputKind.SC)
    copy_image_attributes(sc, source, _SOURCE_ATTRIBUTES)
    empty_laterality_without_body_part(sc)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "WSD"  # made by a workstation (PS3.3 C.8.6.1.1), not captured over a digital interface
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    _copy_lossy_flag(sc, rendering.view.sources)
    sc.DerivationDescription = fit_lo(f"{DISCLAIMER}. Annotated by {producer.model_name} {producer.software_version}",
                                      1024)
    sc.ImageComments = fit_lo(f"{result.verdict.outcome.value}; {models_text(result.models)}", 10240)
    sc.SourceImageSequence = DicomSequence([_image_reference(ds) for ds in rendering.view.sources])
    if rendering.view.caption:
        sc.DerivationDescription = fit_lo(f"{sc.DerivationDescription} ({rendering.view.caption})", 1024)
    return sc


#: Transfer syntaxes whose compression may lose information (JPEG baseline and extended, JPEG-LS near-lossless,
#: JPEG 2000 and HTJ2K allowing loss).
LOSSY_SYNTAXES = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000, JPEG2000MC, HTJ2K})


def _copy_lossy_flag(sc: Dataset, sources: Sequence[Dataset]) -> None:
    """Lossy Image Compression: once "01" in a source it stays "01" in what is derived from it (PS3.3
    C.7.6.1.1.5), with the source's ratio and method; as highdicom does for the SEG."""
    lossy = next((ds for ds in sources if ds.get("LossyImageCompression") == "01"), None)
    # A source received in a lossy transfer syntax is lossy whether or not its header says so.
    in_lossy_syntax = any(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "")) in LOSSY_SYNTAXES
                          for ds in sources)
    sc.LossyImageCompression = "01" if lossy is not None or in_lossy_syntax else "00"
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if lossy is not None and keyword in lossy:
            setattr(sc, keyword, copy.deepcopy(lossy[keyword].value))


def _image_reference(ds: Dataset) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    return ref

