"""Grayscale Softcopy Presentation State: the Secondary Capture's graphics as vector annotations.

For PACS that overlay GSPS graphics on the original image: the reader keeps the diagnostic pixels,
can toggle the annotation layers and window freely.  Shapes and labels come from
`reports.annotations`, the same ones the Secondary Capture burns in.  GSPS colours are per graphic
layer, so structures are grouped into one layer per colour.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from inference.results import ImageResult, StudyResult
from reports import annotations as graphics  # `annotations` is the __future__ feature name here
from reports import style
from reports.common import (
    CHARACTER_SET,
    DISCLAIMER,
    OutputKind,
    Producer,
    apply_equipment,
    apply_identity,
    apply_series,
    copy_image_attributes,
    empty_laterality_without_body_part,
    fit_lo,
    image_output_uid,
    institution_name,
    series_uid,
)

_SOURCE_ATTRIBUTES = ("BodyPartExamined", "Laterality")
_LAYER_TITLES = {
    "VERTEBRAE": "vertebra outlines",
    "IMPLANTS": "implant outlines",
    "MEASUREMENTS": "measurement lines",
    "FINDINGS": "findings",
    "LABELS": "level labels",
}


def _layer_key(layer: str, colour: style.RGB) -> tuple[int, style.RGB]:
    return graphics.LAYERS.index(layer), colour


def build_pr(
    result: StudyResult,
    image: ImageResult,
    sources: Sequence[Dataset],
    *,
    instance_number: int,
    producer: Producer,
) -> Dataset | None:
    """The presentation state of one analysed image, or None when there is nothing to draw."""
    drawings = [d for d in graphics.drawings(image) if d.shapes or d.labels]
    if not drawings:
        return None
    # One GSPS layer per (role, colour): GSPS has no per-object colour.
    keys = sorted({_layer_key(s.layer, s.colour) for d in drawings for s in d.shapes}
                  | {_layer_key(t.layer, t.colour) for d in drawings for t in d.labels})
    layers: dict[tuple[int, style.RGB], hd.pr.GraphicLayer] = {}
    for order, key in enumerate(keys, start=1):
        role = graphics.LAYERS[key[0]]
        layers[key] = hd.pr.GraphicLayer(
            layer_name=f"{role[:12]}_{order}",
            order=order,
            description=f"AI {_LAYER_TITLES[role]}",
            display_color=hd.color.CIELabColor.from_rgb(*key[1]),
        )
    graphic_annotations = []
    # The result above every outline, as on the SC: outlines and "?3" labels alone read as a finding.
    result_layer = hd.pr.GraphicLayer(layer_name="RESULT", order=len(keys) + 1,
                                      description="AI result and disclaimer",
                                      display_color=hd.color.CIELabColor.from_rgb(*RESULT_COLOUR))
    layers_out = [*layers.values(), result_layer]
    lines = result_lines(result)
    for drawing in drawings:
        source = sources[drawing.index]
        gap = max(12.0, float(source.Rows) * 0.03)
        graphic_annotations.append(hd.pr.GraphicAnnotation(
            referenced_images=[source],
            graphic_layer=result_layer,
            text_objects=[
                hd.pr.TextObject(
                    text_value=fit_lo(line, 1024),  # ST; ASCII dashes, which dcmpschk requires
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    anchor_point=_inside((float(source.Columns) * 0.02, gap * (k + 1)), source),
                    anchor_point_visible=False,
                    text_justification=hd.pr.TextJustificationValues.LEFT,
                )
                for k, line in enumerate(lines)
            ],
        ))
    for drawing in drawings:
        referenced = [sources[drawing.index]]
        for key, layer in layers.items():
            role, colour = graphics.LAYERS[key[0]], key[1]
            objects = [
                hd.pr.GraphicObject(
                    graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                    graphic_data=_points(s.points, s.closed),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                )
                for s in drawing.shapes if s.layer == role and s.colour == colour and len(s.points) >= 2
            ]
            texts = [
                hd.pr.TextObject(
                    text_value=fit_lo(t.one_line),
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    anchor_point=_inside(t.anchor, sources[drawing.index]),
                    anchor_point_visible=False,
                    text_justification=(hd.pr.TextJustificationValues.LEFT if t.align == "left"
                                        else hd.pr.TextJustificationValues.RIGHT),
                )
                for t in drawing.labels if t.layer == role and t.colour == colour
            ]
            if objects or texts:
                graphic_annotations.append(hd.pr.GraphicAnnotation(
                    referenced_images=referenced,
                    graphic_layer=layer,
                    graphic_objects=objects or None,
                    text_objects=texts or None,
                ))
    source = sources[0]
    photometric = str(source.get("PhotometricInterpretation", "MONOCHROME2"))
    presentation_lut = hd.PresentationLUTTransformation(
        presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE if photometric == "MONOCHROME1"
        else hd.PresentationLUTShapeValues.IDENTITY)
    referenced_images = [sources[d.index] for d in drawings]
    pr = hd.pr.GrayscaleSoftcopyPresentationState(
        specific_character_set=CHARACTER_SET,  # not the source's: see CHARACTER_SET
        referenced_images=referenced_images,
        series_instance_uid=series_uid(result, OutputKind.PR),
        series_number=1,  # replaced by apply_series
        sop_instance_uid=image_output_uid(result, image, OutputKind.PR),
        instance_number=instance_number,
        manufacturer=producer.manufacturer,
        manufacturer_model_name=producer.model_name,
        software_versions=producer.software_version,
        device_serial_number=producer.device_serial_number,
        content_label="SPINE_AI",
        # LO holds 64 bytes: the model versions (SR, SC, SEG carry them) would be cut off mid-version.
        content_description=fit_lo(f"{DISCLAIMER}: outlines and labels"),
        graphic_annotations=graphic_annotations,
        graphic_layers=layers_out,
        presentation_lut_transformation=presentation_lut,
        institution_name=institution_name(source, producer),
    )
    apply_identity(pr, source)
    apply_equipment(pr, source, producer)
    apply_series(pr, OutputKind.PR)
    copy_image_attributes(pr, source, _SOURCE_ATTRIBUTES)
    empty_laterality_without_body_part(pr)
    return pr



#: Colour of the result layer (the SC's banner yellow).
RESULT_COLOUR: style.RGB = (255, 210, 0)


def result_lines(result: StudyResult) -> list[str]:
    """The PR's result text, one line each: the disclaimer, the verdict, the hardware status and construct."""
    verdict = result.verdict
    lines = [DISCLAIMER, verdict.outcome.value.upper()]
    if verdict.hardware is not None:
        lines.append(f"Hardware: {verdict.hardware.value}" + (f"; {verdict.instrumentation}" if verdict.instrumentation else ""))
    return lines


def _points(points: Sequence[tuple[float, float]], closed: bool) -> np.ndarray:
    data = np.asarray(points, dtype=np.float32).reshape(-1, 2)
    if closed and not np.array_equal(data[0], data[-1]):
        data = np.vstack([data, data[:1]])
    return data


def _inside(point: tuple[float, float], ds: Dataset) -> tuple[float, float]:
    """Anchor kept within the image: PIXEL annotations must lie on the referenced image."""
    cols, rows = float(ds.Columns), float(ds.Rows)
    return (min(max(point[0], 0.0), cols), min(max(point[1], 0.0), rows))
