"""Contact sheet of synthetic samples, to look at what the engine makes.

    python -m inference.synth.preview --data ../shared/data --out /tmp/synth_sheet.png [--labels]

Rows: AP and lateral DRRs over the fields, compression deformities, implants with failure modes, and
implants rendered onto real radiographs (TRAIN split).  With ``--labels`` every tile is followed by a copy
with the body / implant label maps overlaid.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from inference.results import FractureShape
from inference.synth.augment import resize
from inference.synth.render import SynthConfig, render_sample

TILE_H = 300


def _tile(sample, labels: bool) -> list[np.ndarray]:
    h = TILE_H
    w = max(8, int(round(sample.image.shape[1] * h / sample.image.shape[0])))
    g = np.clip(resize(sample.image, (h, w)), 0, 1)
    rgb = np.stack([g] * 3, -1)
    tiles = [rgb]
    if labels:
        b = resize(sample.body, (h, w), order=0).astype(int)
        m = resize(sample.implants, (h, w), order=0).astype(int)
        col = np.stack([(b * 53) % 255, (b * 97) % 255, (b * 151) % 255], -1) / 255.0
        ov = np.where(b[..., None] > 0, 0.55 * rgb + 0.45 * col, rgb)
        ov = np.where(b[..., None] == -2, 0.6 * ov + 0.4 * np.array([0.0, 1.0, 0.0]), ov)
        ov = np.where(m[..., None] > 0, 0.4 * ov + 0.6 * np.array([1.0, 0.2, 0.2]), ov)
        tiles.append(ov)
    return tiles


def contact_sheet(data: str | None, labels: bool = False, seed: int = 0) -> np.ndarray:
    """Sheet (rows of tiles) as float RGB."""
    base = SynthConfig(data_dir=data, out_px=(500, 700), p_implants=0.0, p_fracture=0.0)
    src = "stitched" if data else "phantom"
    # (view, field, source, forced extras) of each tile
    rows_spec: list[list[tuple[str, str, str, dict[str, Any]]]] = [
        [("AP", "lumbar", "ts-abdomen" if data else "phantom", {}), ("LAT", "lumbar", "ts-abdomen" if data else "phantom", {}),
         ("AP", "thoracolumbar", "dd-chest" if data else "phantom", {}), ("LAT", "thoracic", "dd-chest" if data else "phantom", {}),
         ("AP", "whole", src, {}), ("LAT", "whole", src, {}), ("AP", "lumbar", "phantom", {}), ("LAT", "thoracolumbar", "phantom", {})],
        [("LAT", "lumbar", "ts-abdomen" if data else "phantom", {"fracture": ("L2", FractureShape.WEDGE, 0.45)}),
         ("LAT", "thoracolumbar", "dd-chest" if data else "phantom", {"fracture": ("T12", FractureShape.BICONCAVE, 0.4)}),
         ("LAT", "lumbar", src, {"fracture": ("L1", FractureShape.CRUSH, 0.35)}),
         ("AP", "lumbar", "ts-abdomen" if data else "phantom", {"implants": ("posterior", "cage")}),
         ("LAT", "lumbar", "ts-abdomen" if data else "phantom", {"implants": ("posterior", "loosening", "cage", "subsidence")}),
         ("AP", "thoracolumbar", src, {"implants": ("posterior", "rod_fracture", "breakage")}),
         ("LAT", "thoracolumbar", "phantom", {"implants": ("plate",)})],
    ]
    sheet_rows = []
    for r, spec in enumerate(rows_spec):
        tiles = []
        for k, (view, field, source, extra) in enumerate(spec):
            force = [("view", view), ("field", field), ("source", source)]
            cfg = base
            if "fracture" in extra:
                force.append(("fracture", extra["fracture"]))
                cfg = replace(cfg, shift=0.0)
            if "implants" in extra:
                force.append(("implants", extra["implants"]))
                cfg = replace(cfg, p_implants=1.0, shift=0.05)
            sample = render_sample(seed + 100 * r + k, replace(cfg, force=tuple(force)))
            tiles += _tile(sample, labels)
        sheet_rows.append(tiles)
    if data and (Path(data) / "radiographs").is_dir():
        from inference.synth.real import render_real_sample

        tiles = []
        for k in range(8):
            real_force = (("implants", [("posterior",), ("posterior", "cage"), ("posterior", "rod_fracture"), ("plate",)][k % 4]),)
            tiles += _tile(render_real_sample(seed + 300 + k, replace(base, force=real_force), data, split="train"), labels)
        sheet_rows.append(tiles)
    width = max(sum(t.shape[1] + 4 for t in row) for row in sheet_rows)
    out = []
    for row in sheet_rows:
        line = np.concatenate([np.pad(t, ((0, 0), (0, 4), (0, 0)), constant_values=1.0) for t in row], 1)
        out.append(np.pad(line, ((0, 4), (0, width - line.shape[1]), (0, 0)), constant_values=1.0))
    return np.concatenate(out, 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m inference.synth.preview", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="data folder with ct/ (e.g. ../shared/data)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--labels", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=0, help="resize the sheet to this width (0: as rendered)")
    args = ap.parse_args(argv)
    from PIL import Image

    data = args.data if (Path(args.data) / "ct").is_dir() else None
    sheet = contact_sheet(data, args.labels, args.seed)
    img = Image.fromarray((np.clip(sheet, 0, 1) * 255).astype(np.uint8))
    if args.width:
        img = img.resize((args.width, int(img.height * args.width / img.width)), Image.Resampling.LANCZOS)
    img.save(args.out, optimize=True)
    print(f"{args.out}: {img.width}x{img.height}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
