"""`make render-docs`: PNGs of what the radiologist sees, from the synthetic test studies.

For each example study (`reports.examples`, results built by hand to show every kind of content) and
for one phantom postoperative radiograph analysed by the shipped models (`model_case`: what the node
says today), the outputs are built exactly as the node builds them, then rendered from the encoded
DICOM objects, not from the results:

* ``<case>_sc.png``: the Secondary Capture's pixels, and ``<case>_sc_thumb.png`` at PACS thumbnail
  size (256 px);
* ``<case>_seg.png``: the SEG decoded with highdicom and blended over the windowed source in each
  segment's recommended display colour (for a CT series, on its busiest slice);
* ``<case>_sr.txt``: the SR as dcmtk's ``dsrdump`` prints it (when dcmtk is installed).

Usage: ``python -m reports.render_docs --out docs/images``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from reports import OutputKind, build_outputs, examples
from reports.sc import display_pixels

THUMBNAIL = 256
ALPHA = 0.45
#: Longest side of the pictures in the docs (the DICOM objects themselves are larger).
DOC_SIDE = 1200


def seg_overlay(seg: Dataset, sources: Sequence[Dataset]) -> Image.Image:
    """The SEG's segments blended over the windowed source (the slice with most segment pixels)."""
    parsed = hd.seg.Segmentation.from_dataset(seg, copy=True)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    referenced = [uid for uid in uids if uid in {ref[2] for ref in parsed.get_source_image_uids()}]
    numbers = list(parsed.segment_numbers)
    if parsed.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP:
        labels = parsed.get_pixels_by_source_instance(referenced, segment_numbers=numbers, combine_segments=True)
        stacked = np.stack([labels == n for n in numbers], axis=-1)
    else:
        stacked = parsed.get_pixels_by_source_instance(referenced, segment_numbers=numbers).astype(bool)
    busiest = int(np.argmax(stacked.reshape(stacked.shape[0], -1).sum(axis=1)))
    source = sources[uids.index(referenced[busiest])]
    grey = display_pixels(source)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=-1)
    for s, number in enumerate(numbers):
        description = parsed.get_segment_description(number)
        lab = description.get("RecommendedDisplayCIELabValue")
        colour = np.asarray(hd.color.CIELabColor.from_dicom_value(lab).to_rgb() if lab is not None else (255, 0, 0),
                            dtype=float) / 255.0
        mask = stacked[busiest, ..., s]
        rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colour
    image = Image.fromarray(np.rint(np.clip(rgb, 0, 1) * 255).astype(np.uint8))
    factor = 768 / max(image.size) if max(image.size) < 768 else 1.0  # small CT slices: enlarge for the page
    if factor != 1.0:
        image = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    size = max(14, image.height // 40)  # the font's size (Pillow types load_default's font as size-less too)
    font = ImageFont.load_default(size=size)
    left = 0
    for s, number in enumerate(numbers):
        rows, cols = np.nonzero(stacked[busiest, ..., s])
        if not len(rows):
            continue
        description = parsed.get_segment_description(number)
        label = description.segment_label
        if description.segmented_property_category.meaning == "Anatomical Structure":
            xy, anchor = ((cols.max() + 1) * factor + 6, rows.mean() * factor), "lm"
        else:  # implants: left of their extent, stacked so classes sharing a region do not collide
            xy, anchor = (cols.min() * factor - 6, rows.min() * factor + left * size * 1.3), "rt"
            left += 1
        draw.text(xy, label, font=font, fill=(255, 255, 255), anchor=anchor, stroke_width=2, stroke_fill=(0, 0, 0))
    _caption(image, "DICOM-SEG decoded and overlaid (segment colours from the SEG)")
    return image


def _fit(image: Image.Image) -> Image.Image:
    if max(image.size) <= DOC_SIDE:
        return image
    factor = DOC_SIDE / max(image.size)
    return image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.LANCZOS)


def _caption(image: Image.Image, text: str) -> None:
    draw = ImageDraw.Draw(image)
    size = max(12, image.height // 45)  # the font's size (Pillow types load_default's font as size-less too)
    font = ImageFont.load_default(size=size)
    draw.rectangle((0, 0, image.width, round(size * 1.6)), fill=(0, 0, 0))
    draw.text((round(size * 0.4), round(size * 0.3)), text, font=font, fill=(255, 255, 255))


def render_case(case: examples.Case, out: Path) -> list[Path]:
    """Write the PNGs (and SR text) of one example study into `out`."""
    written: list[Path] = []
    outputs = build_outputs(case.result, case.sources)
    for output in outputs:
        if output.kind is OutputKind.SC:
            image = Image.fromarray(output.dataset.pixel_array)
            path = out / f"{case.name}_sc.png"
            _fit(image).save(path, optimize=True)
            thumb = image.copy()
            thumb.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
            thumb_path = out / f"{case.name}_sc_thumb.png"
            thumb.save(thumb_path, optimize=True)
            written += [path, thumb_path]
        elif output.kind is OutputKind.SEG:
            path = out / f"{case.name}_seg.png"
            _fit(seg_overlay(output.dataset, case.sources)).save(path, optimize=True)
            written.append(path)
        elif output.kind is OutputKind.SR and shutil.which("dsrdump"):
            with tempfile.TemporaryDirectory() as tmp:
                file = Path(tmp) / "sr.dcm"
                output.dataset.save_as(file, enforce_file_format=True)
                text = subprocess.run(["dsrdump", "+Pn", str(file)], capture_output=True, text=True,
                                      check=True).stdout
            # The creation time changes on every run; leave it out so the docs only change with the content.
            text = "".join(line for line in text.splitlines(keepends=True) if not line.startswith("Content Date/Time"))
            path = out / f"{case.name}_sr.txt"
            path.write_text(text)
            written.append(path)
    return written


#: Data-engine seed of the phantom in `model_case`, chosen because its whole construct lies inside the field.
MODEL_CASE_SEED = 300


def model_case(seed: int = MODEL_CASE_SEED) -> examples.Case:
    """A phantom postoperative lumbar AP (pedicle screws, rods, a cage) made by the data engine and analysed
    by the shipped models, so the docs also show what the node reports today, switched-off outputs included."""
    from inference import analyses
    from inference.registry import ModelRegistry
    from inference.synth.dicom import sample_dataset
    from inference.synth.render import SynthConfig, render_sample

    force = (("view", "AP"), ("field", "lumbar"), ("implants", ("posterior", "cage")))
    sample = render_sample(seed, SynthConfig(sources=(("phantom", 1.0),), p_implants=1.0, force=force))
    source = sample_dataset(sample, seed=f"docs-model-case-{seed}")
    result = analyses.create("spine-xr", ModelRegistry()).run([source])
    return examples.Case("model-ap-dx", (source,), result)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = (examples.lateral_dx(scale=3.0), examples.ap_cr(scale=3.0), examples.ct(slices=60, size=160), model_case())
    for case in cases:
        for path in render_case(case, args.out):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
