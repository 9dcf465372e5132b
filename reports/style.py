"""Colours and wording shared by the SEG, the Secondary Capture and the presentation state.

A vertebra or implant has the same colour and the same label in every output, so a reader moving
from the SC to the SEG overlay in a viewer recognises what is what.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.results import (
    FractureShape,
    GenantGrade,
    Implant,
    ImplantKind,
    ScreeningOutcome,
    Vertebra,
    level_index,
    level_span,
)

RGB = tuple[int, int, int]

# Cool colours for anatomy, cycling so neighbouring levels always differ; warm colours for metal;
# red only for what needs attention.
_VERTEBRA_PALETTE: tuple[RGB, ...] = (
    (80, 160, 255),  # blue
    (60, 215, 110),  # green
    (175, 125, 255),  # violet
    (40, 205, 205),  # teal
)
UNKNOWN_LEVEL_COLOUR: RGB = (200, 200, 200)
IMPLANT_COLOURS: dict[ImplantKind, RGB] = {
    ImplantKind.PEDICLE_SCREW: (255, 190, 0),  # amber
    ImplantKind.ROD: (255, 120, 30),  # orange
    ImplantKind.INTERBODY_CAGE: (255, 90, 200),  # pink
    ImplantKind.PLATE: (235, 235, 60),  # yellow
    ImplantKind.OTHER: (255, 255, 255),
}
ALERT_COLOUR: RGB = (255, 45, 45)
MEASUREMENT_COLOUR: RGB = (255, 255, 140)
OUTCOME_COLOURS: dict[ScreeningOutcome, RGB] = {
    ScreeningOutcome.NO_FINDING: (90, 220, 110),
    ScreeningOutcome.FINDING_PRESENT: ALERT_COLOUR,
    ScreeningOutcome.NOT_ASSESSABLE: (200, 200, 200),
}

IMPLANT_CLASS_LABELS: dict[ImplantKind, str] = {
    ImplantKind.PEDICLE_SCREW: "Pedicle screws",
    ImplantKind.ROD: "Rods",
    ImplantKind.INTERBODY_CAGE: "Interbody cages",
    ImplantKind.PLATE: "Plates",
    ImplantKind.OTHER: "Other implants",
}


def vertebra_colour(vertebra: Vertebra) -> RGB:
    """Colour of a vertebra's outline and segment (by level, so L3 is always the same)."""
    if vertebra.level is None:
        return UNKNOWN_LEVEL_COLOUR
    return _VERTEBRA_PALETTE[level_index(vertebra.level) % len(_VERTEBRA_PALETTE)]


def implant_colour(implant: Implant | ImplantKind) -> RGB:
    """Colour of an implant class."""
    kind = implant.kind if isinstance(implant, Implant) else ImplantKind(implant)
    return IMPLANT_COLOURS[kind]


def vertebra_label(vertebra: Vertebra, ordinal: int) -> str:
    """Segment label / tracking identifier: "L3", "Sacrum", or "vertebra 2 (level unknown)"."""
    if vertebra.level is None:
        return f"vertebra {ordinal} (level unknown)"
    if vertebra.level == "S1":
        return "Sacrum"
    return vertebra.level


def short_level(vertebra: Vertebra, ordinal: int) -> str:
    """Label drawn next to a vertebra: "L3", "S", "?2"."""
    if vertebra.level is None:
        return f"?{ordinal}"
    return "S" if vertebra.level == "S1" else vertebra.level


def is_fractured(vertebra: Vertebra) -> bool:
    """True when the vertebra carries a Genant grade of 1 or more."""
    return vertebra.fracture is not None and vertebra.fracture.grade > GenantGrade.NORMAL


def fracture_text(vertebra: Vertebra) -> str:
    """E.g. "Genant 2 wedge, 32 % loss"; empty for a normal vertebra."""
    f = vertebra.fracture
    if f is None or f.grade == GenantGrade.NORMAL:
        return ""
    shape = "" if f.shape is FractureShape.NONE else f" {f.shape.value}"
    return f"Genant {int(f.grade)}{shape}, {f.height_loss_pct:.0f} % loss"


@dataclass(frozen=True)
class Ordered:
    """Vertebrae in reading order (cranial to caudal), each with its ordinal among unknown levels."""

    vertebra: Vertebra
    ordinal: int
    label: str


def ordered_vertebrae(vertebrae: tuple[Vertebra, ...]) -> list[Ordered]:
    """Named levels in anatomical order, then unnamed ones top to bottom, numbered 1, 2 ...  Two detections
    named the same level are both kept, visibly: "L3", "L3 (2)" (each label names one vertebra in every output)."""
    named = sorted((v for v in vertebrae if v.level is not None), key=lambda v: level_index(v.level or ""))
    unnamed = sorted((v for v in vertebrae if v.level is None), key=lambda v: (v.centroid[1], v.centroid[0]))
    out: list[Ordered] = []
    seen: dict[str, int] = {}
    for v in named:
        label = vertebra_label(v, 0)
        seen[label] = seen.get(label, 0) + 1
        out.append(Ordered(v, 0, label if seen[label] == 1 else f"{label} ({seen[label]})"))
    out += [Ordered(v, i, vertebra_label(v, i)) for i, v in enumerate(unnamed, start=1)]
    return out


def level_text(levels: tuple[str, ...] | list[str]) -> str:
    """Levels as a surgeon writes them: "L1", "L3–S1"."""
    return level_span(list(levels))
