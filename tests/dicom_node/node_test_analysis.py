"""A small but real analysis for the node's tests: a tiny torch model loaded through the real
`ModelRegistry` from a model folder the tests create, producing vertebra-like masks.

The model is a fixed 5x5 mean filter followed by a threshold: on the test images (bright blocks on a
dark background, see `spine_like_pixels`) every block comes out as one "vertebra", named caudal to
cranial from L5 upward.  It lets the node's tests run the pipeline, registry and encoders for real in
milliseconds; the radiograph models ("spine-xr") take a second or two per image and have tests of their own.

Importing this module registers the analysis (also usable as ``[models] plugins = ["node_test_analysis"]``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from inference import analyses
from inference.registry import ModelRegistry, ModelSpec
from inference.results import (
    LEVELS,
    ImageResult,
    ModelInfo,
    RegionMask,
    ScreeningOutcome,
    ScreeningVerdict,
    SourceImage,
    StudyResult,
    Vertebra,
)

NAME = "node-test-vertebrae"
MODEL = "node-test-blockfinder"
MODEL_VERSION = "1.0.0"


def spine_like_pixels(rows: int = 128, columns: int = 96, blocks: int = 4, seed: int = 0) -> np.ndarray:
    """12-bit image: `blocks` bright vertebra-like blocks stacked vertically on a noisy dark background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(100, 300, size=(rows, columns)).astype(np.uint16)
    pitch = rows // (blocks + 1)
    height = max(3, int(pitch * 0.6))
    for k in range(blocks):
        top = pitch // 2 + k * pitch
        img[top:top + height, columns // 3: 2 * columns // 3] = 3000 + 50 * k
    return img


def write_model_folder(root: Path) -> Path:
    """Create the model folder (model.json + weights.pt with a sha256) under `root`; returns the folder."""
    import torch

    folder = Path(root) / MODEL
    folder.mkdir(parents=True, exist_ok=True)
    conv = torch.nn.Conv2d(1, 1, kernel_size=5, padding=2, bias=True)
    with torch.no_grad():
        conv.weight.fill_(1.0 / 25.0)
        conv.bias.fill_(-0.5)
    weights = folder / "weights.pt"
    torch.save(conv.state_dict(), weights)
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "model.json").write_text(json.dumps({
        "name": MODEL, "version": MODEL_VERSION, "task": "test block segmentation", "weights": "weights.pt",
        "sha256": digest, "architecture": "Conv2d(1,1,5) mean filter + threshold",
    }))
    return folder


def _build(spec: ModelSpec, device: str):  # noqa: ANN202 - torch module
    import torch

    conv = torch.nn.Conv2d(1, 1, kernel_size=5, padding=2, bias=True)
    conv.load_state_dict(torch.load(spec.weights, map_location=device, weights_only=True))
    return conv.eval().to(device)


def _normalised(ds) -> np.ndarray:  # noqa: ANN001
    img = ds.pixel_array.astype(np.float32)
    lo, hi = float(img.min()), float(img.max())
    img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        img = 1.0 - img
    return img


class BlockFinderAnalysis:
    """Finds bright blocks; each becomes a `Vertebra` with mask, outline and centroid."""

    name = NAME

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def models(self) -> tuple[ModelInfo, ...]:
        self.registry.load(MODEL, _build)  # as the protocol says: loads them if needed
        return (self.registry.spec(MODEL).info,)

    def run(self, datasets: Sequence) -> StudyResult:
        import torch
        from scipy import ndimage

        model = self.registry.load(MODEL, _build)
        images = []
        for ds in datasets:
            img = _normalised(ds)
            with torch.no_grad():
                out = model(torch.from_numpy(img)[None, None])[0, 0].numpy()
            labels, n = ndimage.label(out > 0.0)
            comps = []
            for k in range(1, n + 1):
                mask = labels == k
                if mask.sum() < 9:
                    continue
                rr, cc = np.nonzero(mask)
                comps.append((float(rr.mean()), mask, rr, cc))
            comps.sort(key=lambda c: c[0])
            start = LEVELS.index("L5") - len(comps) + 1
            vertebrae = []
            for i, (_, mask, rr, cc) in enumerate(comps):
                r0, r1, c0, c1 = int(rr.min()), int(rr.max()) + 1, int(cc.min()), int(cc.max()) + 1
                vertebrae.append(Vertebra(
                    level=LEVELS[start + i] if start + i >= 0 else None,
                    mask=RegionMask.from_dense(mask),
                    outline=((c0, r0), (c1, r0), (c1, r1), (c0, r1)),
                    centroid=(float(cc.mean()) + 0.5, float(rr.mean()) + 0.5),
                ))
            spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
            source = SourceImage(
                study_instance_uid=str(ds.StudyInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                sop_class_uid=str(ds.SOPClassUID), sop_instance_uids=(str(ds.SOPInstanceUID),),
                rows=int(ds.Rows), columns=int(ds.Columns),
                pixel_spacing_mm=(float(spacing[0]), float(spacing[1])) if spacing else None,
                spacing_source="ImagerPixelSpacing" if spacing else "none",
                view="LAT" if str(ds.get("ViewPosition", "")) in ("LL", "RL", "LAT", "LATERAL") else "AP",
                modality=str(ds.get("Modality", "")),
            )
            images.append(ImageResult(source=source, vertebrae=tuple(vertebrae)))
        return StudyResult(
            study_instance_uid=str(datasets[0].StudyInstanceUID), analysis=NAME, models=self.models(),
            images=tuple(images), verdict=ScreeningVerdict(ScreeningOutcome.NO_FINDING, ("test analysis",)),
        )


analyses.register(NAME, BlockFinderAnalysis)
