"""The vertebra model as the node runs it: network + chain post-processing + source-resolution instances.

`VertebraModel.analyse` takes a decoded `Radiograph` (canonical grid, see `preprocess`) and returns
`SpineInstances` in that grid: one `VertebraInstance` per vertebra found (top to bottom), the sacrum,
the level names (or None), the view as read or inferred, and notes for the reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from inference.radiograph import network, postprocess, preprocess
from inference.radiograph.postprocess import ChainParams, SpineDetection

if TYPE_CHECKING:
    import torch

    from inference.registry import ModelRegistry, ModelSpec

MODEL_NAME = "spine-xr-vertebrae"
#: Network-grid step (px) between vertebrae the network was trained around; far off -> re-run at a zoom.
TARGET_STEP_PX = 22.0
STEP_BAND = (15.0, 34.0)
#: On a long field (columns / rows below LONG_FIELD_ASPECT: whole spine, thoracolumbar) shrinking is judged by
#: the chain's smaller steps (this percentile), not its median: there the upper thoracic vertebrae are about
#: half the size of the lower lumbar ones, and shrinking until the median step met the target merged the small
#: ones (a real postoperative film, see the model card).  A single-cassette field (lumbar, about as wide as
#: tall) holds vertebrae of one size, and there the first pass's giant vertebrae come out as fragments whose
#: steps say little: the median decides, as before.
SHRINK_PERCENTILE = 25.0
LONG_FIELD_ASPECT = 0.65
MIN_CHAIN_FOR_ZOOM = 4


def corrected_zoom(steps: list[float], long_field: bool) -> float | None:
    """Factor on the first pass's zoom for a re-run when its vertebrae (`steps`, network px, along the chain)
    are far from the size the network was trained on; None when they are not or the chain is too short to say."""
    if len(steps) + 1 < MIN_CHAIN_FOR_ZOOM:
        return None
    median = float(np.median(steps))
    # Enlarging is judged by the median; shrinking, on a long field, by the smaller steps.  Either way the
    # median is brought to the target.
    judged = float(np.percentile(steps, SHRINK_PERCENTILE)) if long_field else median
    if median < STEP_BAND[0] or judged > STEP_BAND[1]:
        return float(np.clip(TARGET_STEP_PX / median, 0.4, 2.5))
    return None


#: Without a pixel spacing the preprocessing scales the long side to `UNCALIBRATED_LONG_SIDE` network pixels,
#: a whole-spine field (576 x 1.25 mm = 72 cm).  A field about as wide as tall is one cassette (43 cm long
#: side): its first pass starts at that scale, so its vertebrae do not come out three times the trained size
#: and split into fragments (real val lumbar fields without a header: centroid F1 0.783 -> 0.809).
CASSETTE_LONG_SIDE_MM = 430.0


def first_zoom(shape: tuple[int, int], spacing_mm: tuple[float, float] | None) -> float:
    """Zoom of the first pass: 1.0, or, for a single-cassette field without a pixel spacing, the 43 cm field's."""
    if spacing_mm is not None or is_long_field(shape, None):
        return 1.0
    return CASSETTE_LONG_SIDE_MM / (preprocess.UNCALIBRATED_LONG_SIDE * preprocess.TARGET_SPACING_MM)


def is_long_field(shape: tuple[int, int], spacing_mm: tuple[float, float] | None) -> bool:
    """A field much taller than wide (canonical grid: the spine runs along the rows), in physical units when known."""
    rows: float  # pixels, or mm when the spacing is known
    cols: float
    rows, cols = shape
    if spacing_mm is not None:
        rows, cols = rows * spacing_mm[0], cols * spacing_mm[1]
    return cols < LONG_FIELD_ASPECT * rows


@dataclass(frozen=True)
class SecondPass:
    """A second network pass at `factor` times the first pass's zoom; the chain is read from the weighted mean
    of both passes' probabilities (`weight` on the second).  The network finds more vertebrae shown larger
    than its step target suggests; the first pass's share keeps borderline candidates from flipping with
    small changes of the input (measured on the real val split, see the model card).  factor 1: one pass."""

    factor: float = 1.0
    weight: float = 1.0

    @classmethod
    def from_dict(cls, data: dict | None) -> SecondPass:
        """From model.json ("inputs.preprocessing.second_pass"); absent -> one pass."""
        return cls(**(data or {}))


#: What the shipped network was measured with (written into model.json by training).
SHIPPED_SECOND_PASS = SecondPass(factor=1.3, weight=0.75)


@dataclass
class VertebraInstance:
    """One vertebra (or the sacrum) at source resolution, canonical grid."""

    level: str | None
    offset: tuple[int, int]  # (row, column) of the crop in the canonical source grid
    mask: np.ndarray  # bool crop
    membership: np.ndarray  # float32 crop: body probability restricted to this instance (0.5 = outline)
    centroid: tuple[float, float]  # (x, y) SCOORD, canonical grid
    score: float
    touches_border: bool
    is_sacrum: bool = False
    inferred: bool = False


@dataclass
class SpineInstances:
    """Everything the vertebra model found on one radiograph (canonical grid)."""

    vertebrae: list[VertebraInstance]
    sacrum: VertebraInstance | None
    view: str | None  # as read from the header, else inferred
    view_inferred: bool
    anterior_sign: int | None  # laterals: +1 anterior toward larger x
    step_px: float  # median step between vertebrae in source pixels (nan if < 2)
    zoom: float  # size correction after the first pass (1.0: its scale was right)
    notes: list[str] = field(default_factory=list)


def _crop_bounds(region: np.ndarray, scale: tuple[float, float], source_shape: tuple[int, int], margin: int = 2) -> tuple[slice, slice]:
    rows, cols = np.nonzero(region)
    r0, r1 = rows.min() - margin, rows.max() + 1 + margin
    c0, c1 = cols.min() - margin, cols.max() + 1 + margin
    sr0 = max(int(math.floor((r0 + 0.5) / scale[0] - 0.5)), 0)
    sr1 = min(int(math.ceil((r1 + 0.5) / scale[0] + 0.5)), source_shape[0])
    sc0 = max(int(math.floor((c0 + 0.5) / scale[1] - 0.5)), 0)
    sc1 = min(int(math.ceil((c1 + 0.5) / scale[1] + 0.5)), source_shape[1])
    return slice(sr0, sr1), slice(sc0, sc1)


def _upsample(field_: np.ndarray, rows: slice, cols: slice, scale: tuple[float, float], order: int) -> np.ndarray:
    """Values of a network-grid map at the source pixel centres of a crop (align_corners=False mapping)."""
    r = (np.arange(rows.start, rows.stop) + 0.5) * scale[0] - 0.5
    c = (np.arange(cols.start, cols.stop) + 0.5) * scale[1] - 0.5
    rr, cc = np.meshgrid(r, c, indexing="ij")
    return ndimage.map_coordinates(field_, [rr, cc], order=order, mode="nearest")


def _instance(
    body: np.ndarray, labels: np.ndarray, label: int, scale: tuple[float, float], source_shape: tuple[int, int]
) -> tuple[tuple[int, int], np.ndarray, np.ndarray] | None:
    region = labels == label
    if not region.any():
        return None
    rows, cols = _crop_bounds(region, scale, source_shape)
    prob = _upsample(body, rows, cols, scale, order=1).astype(np.float32)
    owner = _upsample(labels.astype(np.float32), rows, cols, scale, order=0).astype(np.int32) == label
    membership = np.where(owner, prob, 0.0).astype(np.float32)
    mask = membership >= 0.5
    if not mask.any():
        return None
    comp, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, comp, index=np.arange(1, n + 1))
        mask = comp == (1 + int(np.argmax(sizes)))
    mask = ndimage.binary_fill_holes(mask)
    # Make the 0.5 level of the membership exactly the kept component's outline.
    membership = np.where(mask, np.maximum(membership, 0.5), np.minimum(membership, 0.499)).astype(np.float32)
    rr, cc = np.nonzero(mask)
    r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
    # Keep one pixel of membership around the mask so the 0.5 crossings can be interpolated.
    pr0, pr1 = max(r0 - 1, 0), min(r1 + 1, mask.shape[0])
    pc0, pc1 = max(c0 - 1, 0), min(c1 + 1, mask.shape[1])
    offset = (rows.start + pr0, cols.start + pc0)
    return offset, mask[pr0:pr1, pc0:pc1], membership[pr0:pr1, pc0:pc1]


def _make_instance(
    offset: tuple[int, int], mask: np.ndarray, membership: np.ndarray, source_shape: tuple[int, int], **kw: Any
) -> VertebraInstance:
    rr, cc = np.nonzero(mask)
    centroid = (float(cc.mean() + offset[1] + 0.5), float(rr.mean() + offset[0] + 0.5))
    touches = bool(
        (offset[0] + rr.min() == 0)
        or (offset[1] + cc.min() == 0)
        or (offset[0] + rr.max() == source_shape[0] - 1)
        or (offset[1] + cc.max() == source_shape[1] - 1)
    )
    return VertebraInstance(offset=offset, mask=mask, membership=membership, centroid=centroid, touches_border=touches, **kw)


class VertebraModel:
    """Loaded vertebra network plus its post-processing parameters."""

    def __init__(
        self,
        net: torch.nn.Module,
        params: ChainParams | None = None,
        threads: int | None = None,
        endplates: torch.nn.Module | None = None,
        second_pass: SecondPass | None = None,
    ) -> None:
        self.net = net.eval()
        self.params = params or ChainParams()
        self.threads = threads
        self.second_pass = second_pass or SecondPass()
        #: Six-point morphometry stage (`endplates`), when the model folder has one.
        self.endplates = endplates

    @classmethod
    def from_spec(cls, spec: ModelSpec, device: str = "cpu") -> VertebraModel:
        """Build from a registry spec (weights already verified by the registry)."""
        from inference.radiograph import endplates

        arch = spec.metadata.get("architecture") or {}
        net = network.build_network(arch)
        stages = network.read_stages(str(spec.weights), device)
        net.load_state_dict(stages["segmentation"])
        stage = None
        if stages.get("endplates") is not None:
            stage = endplates.load_net(stages["endplates"], int((arch.get("endplates") or {}).get("width", 24)))
        second = SecondPass.from_dict(((spec.metadata.get("inputs") or {}).get("preprocessing") or {}).get("second_pass"))
        return cls(net.eval(), ChainParams.from_dict(spec.metadata.get("postprocess")), endplates=stage, second_pass=second)

    @classmethod
    def from_registry(cls, registry: ModelRegistry) -> VertebraModel:
        """Load (once) through the registry."""
        return registry.load(MODEL_NAME, cls.from_spec)

    def probabilities(self, pixels: np.ndarray, spacing_mm: tuple[float, float] | None, zoom: float = 1.0) -> tuple[np.ndarray, tuple[float, float]]:
        """Network probabilities (C, h, w) for canonical source pixels, and the effective (row, col) scale."""
        image, _ = preprocess.prepare(pixels, spacing_mm, zoom)
        prob = network.predict(self.net, image)
        scale = (image.shape[0] / pixels.shape[0], image.shape[1] / pixels.shape[1])
        return prob, scale

    def detect(self, pixels: np.ndarray, spacing_mm: tuple[float, float] | None) -> tuple[np.ndarray, tuple[float, float], SpineDetection, float]:
        """Probabilities, scale, chain detection and the size correction (one re-run at a corrected zoom when
        the first pass's vertebrae come out far smaller or larger than the network was trained on; 1.0 when
        not needed), then the second pass, if the model has one, at that zoom times its factor."""
        start = zoom = first_zoom(pixels.shape, spacing_mm)
        prob, scale = self.probabilities(pixels, spacing_mm, zoom)
        det: SpineDetection | None  # None once a re-zoomed pass makes this chain stale
        det = postprocess.detect(prob, self.params)
        factor = corrected_zoom(postprocess.chain_steps(det.nodes), is_long_field(pixels.shape, spacing_mm))
        if factor is not None:
            capped = preprocess.network_scale(pixels.shape, spacing_mm, zoom * factor)
            if abs(capped[0] / scale[0] - 1.0) > 0.2:
                zoom *= factor
                prob, scale = self.probabilities(pixels, spacing_mm, zoom)
                det = None
        second = self.second_pass
        # Skipped where the network-side cap leaves no room to enlarge (the pass would repeat the first).
        if second.factor != 1.0 and abs(preprocess.network_scale(pixels.shape, spacing_mm, zoom * second.factor)[0] / scale[0] - 1.0) > 0.05:
            first = prob
            prob, scale = self.probabilities(pixels, spacing_mm, zoom * second.factor)
            if second.weight < 1.0:
                prob = second.weight * prob + (1.0 - second.weight) * preprocess.resample(first, shape=prob.shape[1:])
            det = None
        # The chain that answers is read once, from the final maps (a re-zoomed pass's own chain would only be replaced).
        if det is None:
            det = postprocess.detect(prob, self.params)
        return prob, scale, det, zoom / start

    def analyse(self, radiograph: preprocess.Radiograph) -> SpineInstances:
        """Vertebrae, sacrum and levels on one decoded radiograph."""
        import torch

        if not preprocess.has_contrast(radiograph.pixels):
            # Its percentile stretch would turn rounding noise into structure (measured: 33 "vertebrae" on an
            # all-zero image and 9 on a constant one, delivered to the PACS).
            return SpineInstances(vertebrae=[], sacrum=None, view=radiograph.view, view_inferred=False, anterior_sign=None,
                                  step_px=float("nan"), zoom=1.0, notes=["image without contrast: not analysed"])
        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            prob, scale, det, zoom = self.detect(radiograph.pixels, radiograph.pixel_spacing_mm)
        finally:
            if self.threads:
                torch.set_num_threads(previous)
        shape = radiograph.pixels.shape
        notes = list(det.notes)
        if first_zoom(shape, radiograph.pixel_spacing_mm) != 1.0:
            notes.append("no pixel spacing and about as wide as tall: read as one cassette (43 cm long side)")
        if zoom != 1.0:
            notes.append(f"vertebrae far from the expected size at the first pass's scale: re-analysed at zoom {zoom:.2f}")
        vertebrae = []
        for k, node in enumerate(det.nodes):
            made = _instance(prob[network.BODY], det.labels, k + 1, scale, shape)
            if made is None:
                continue
            offset, mask, membership = made
            vertebrae.append(
                _make_instance(offset, mask, membership, shape, level=det.levels[k], score=round(node.score, 3), inferred=node.inferred)
            )
        if len(vertebrae) < len(det.nodes):
            notes.append(f"{len(det.nodes) - len(vertebrae)} vertebra centre(s) found without a body outline: not reported")
        sacrum = None
        if det.sacrum is not None:
            labels = det.sacrum.astype(np.int32)
            made = _instance(prob[network.SACRUM], labels, 1, scale, shape)
            if made is not None:
                offset, mask, membership = made
                score = float(prob[network.SACRUM][det.sacrum].mean())
                sacrum = _make_instance(offset, mask, membership, shape, level="S1", score=round(score, 3), is_sacrum=True)

        view, inferred, anterior = radiograph.view, False, radiograph.anterior_sign
        offset_steps, votes = postprocess.posterior_offset(prob, det)
        if view is None and votes >= 2:
            view, inferred = ("LAT" if abs(offset_steps) >= 0.25 else "AP"), True
            notes.append(f"view not in the header: read as {view} from the image")
        if view == "LAT" and anterior is None and votes >= 2 and abs(offset_steps) >= 0.15:
            anterior = -1 if offset_steps > 0 else 1
            notes.append("anterior side not in the header: taken from the posterior elements' side")
        step_px = det.step / scale[1] if np.isfinite(det.step) else float("nan")
        return SpineInstances(vertebrae, sacrum, view, inferred, anterior, step_px, zoom, notes)
