"""The sample format the data engine hands to training (contract "data engine → training").

Label-map conventions (int16, same grid as `SynthSample.image`):

* ``0``: background (known: no vertebra / no implant covers the pixel).
* ``k >= 1``: ``k - 1`` is the index in :data:`inference.results.LEVELS` (``1`` = C1, ``25`` = S1, the sacrum).
* :data:`IGNORE` (``-1``): unknown, exclude from the loss.  Real radiographs (implant overlays) have no
  level labels: their body/vertebra maps are ``IGNORE`` except where the vertebra boxes give weak labels.
* :data:`UNNAMED` (``-2``): a vertebra is certainly here but its level is unknown (core of a real
  radiograph's vertebra box).

Points are ``(x, y) = (column, row)`` with pixel centres at ``+0.5`` (as in `inference.results`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from inference.results import LEVELS, Complication, FractureShape, GenantGrade, ImplantKind, Point, Side

IGNORE = -1
UNNAMED = -2
CORNER_NAMES = ("anterior_superior", "anterior_inferior", "posterior_superior", "posterior_inferior")


def level_code(level: str) -> int:
    """Label-map value of `level` (1 + its index in LEVELS)."""
    return LEVELS.index(level) + 1


def code_level(code: int) -> str | None:
    """Level of a label-map value, None for background / ignore / unnamed."""
    return LEVELS[code - 1] if 1 <= code <= len(LEVELS) else None


@dataclass(frozen=True)
class ImplantSpec:
    """One implant instance shown in a sample (its pixels carry its 1-based index in the implant map)."""

    kind: ImplantKind
    levels: tuple[str, ...]
    side: Side
    complications: tuple[Complication, ...] = ()
    #: Material ("titanium", "cobalt-chrome", "peek", ...), dimensions and placement details.
    details: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass
class VertebraSpec:
    """Truth for one vertebra (or the sacrum, "S1") whose body is at least partly in the field.

    `level` is None on real radiographs (unknown).  `heights_mm` (anterior, middle, posterior) are
    measured in 3D on the (deformed) body at isocentre scale; None where the body is truncated by the CT
    volume or is the sacrum.  `grade` is None where unknown (real radiographs).  `height_loss_pct` is the
    largest loss of the three heights against the same vertebra before the synthetic deformity (the CT
    anatomy is taken as normal).  `visible_fraction` is the part of the projected body inside the
    exposed (collimated) image.
    """

    level: str | None
    centroid: Point
    corners: dict[str, Point] | None
    heights_mm: tuple[float, float, float] | None
    grade: GenantGrade | None
    shape: FractureShape
    height_loss_pct: float
    visible_fraction: float


@dataclass
class SynthSample:
    """One training sample; see the module docstring for the label-map values."""

    image: np.ndarray
    pixel_spacing_mm: tuple[float, float]
    view: str
    body: np.ndarray
    vertebra: np.ndarray
    implants: np.ndarray
    implant_specs: list[ImplantSpec]
    vertebrae: list[VertebraSpec]
    meta: dict[str, Any]

    @property
    def mm_per_pixel(self) -> float:
        """Millimetres per pixel (row spacing; 1.0 when the sample has no pixel spacing)."""
        return float(self.pixel_spacing_mm[0]) if self.pixel_spacing_mm else 1.0

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Arrays + a JSON string for `np.savez_compressed` (labels stored as int8: they fit)."""
        info = {
            "pixel_spacing_mm": list(self.pixel_spacing_mm),
            "view": self.view,
            "implant_specs": [_implant_json(s) for s in self.implant_specs],
            "vertebrae": [_vertebra_json(v) for v in self.vertebrae],
            "meta": self.meta,
        }
        return {
            f"{prefix}image": _to_uint16(self.image),
            f"{prefix}body": self.body.astype(np.int8),
            f"{prefix}vertebra": self.vertebra.astype(np.int8),
            f"{prefix}implants": self.implants.astype(np.int8 if len(self.implant_specs) < 127 else np.int16),
            f"{prefix}info": np.array(json.dumps(info, default=_json_default)),
        }

    @classmethod
    def from_arrays(cls, arrays: Any, prefix: str = "") -> SynthSample:
        """Inverse of `to_arrays` (image comes back as float32 in [0, 1], 16-bit quantised)."""
        info = json.loads(str(arrays[f"{prefix}info"]))
        return cls(
            image=arrays[f"{prefix}image"].astype(np.float32) / 65535.0,
            pixel_spacing_mm=tuple(info["pixel_spacing_mm"]),
            view=info["view"],
            body=arrays[f"{prefix}body"].astype(np.int16),
            vertebra=arrays[f"{prefix}vertebra"].astype(np.int16),
            implants=arrays[f"{prefix}implants"].astype(np.int16),
            implant_specs=[_implant_from_json(d) for d in info["implant_specs"]],
            vertebrae=[_vertebra_from_json(d) for d in info["vertebrae"]],
            meta=info["meta"],
        )


def _to_uint16(image: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _implant_json(spec: ImplantSpec) -> dict[str, Any]:
    return {
        "kind": spec.kind.value,
        "levels": list(spec.levels),
        "side": spec.side.value,
        "complications": [c.value for c in spec.complications],
        "details": spec.details,
    }


def _implant_from_json(d: dict[str, Any]) -> ImplantSpec:
    return ImplantSpec(
        kind=ImplantKind(d["kind"]),
        levels=tuple(d["levels"]),
        side=Side(d["side"]),
        complications=tuple(Complication(c) for c in d["complications"]),
        details=d.get("details", {}),
    )


def _vertebra_json(v: VertebraSpec) -> dict[str, Any]:
    d = asdict(v)
    d["grade"] = None if v.grade is None else int(v.grade)
    d["shape"] = v.shape.value
    return d


def _vertebra_from_json(d: dict[str, Any]) -> VertebraSpec:
    return VertebraSpec(
        level=d["level"],
        centroid=tuple(d["centroid"]),
        corners=None if d["corners"] is None else {k: tuple(p) for k, p in d["corners"].items()},
        heights_mm=None if d["heights_mm"] is None else tuple(d["heights_mm"]),
        grade=None if d["grade"] is None else GenantGrade(d["grade"]),
        shape=FractureShape(d["shape"]),
        height_loss_pct=float(d["height_loss_pct"]),
        visible_fraction=float(d["visible_fraction"]),
    )
