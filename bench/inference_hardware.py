"""CPU inference benchmark of the hardware model (the "adds <= 1 s per radiograph on 2 cores" requirement).

    .venv/bin/python -m bench.inference_hardware [--repeat 3] [--threads 2]

Postoperative radiographs are made here (procedural phantoms from the data engine with implants inserted
before projection, written as real DICOM DX/CR at the matrix sizes hospitals send) and analysed exactly as
the node does (`inference.analyses.create("spine-xr")` with the shipped models).  Printed per case: the
median time the hardware step adds (its own preprocessing, network, instances, source-resolution masks,
levels, complications), its stages, the whole analysis for context, and the ratio of the added time to the
1 s budget.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from bench.common import phantom_radiograph, timed

BUDGET_S = 1.0

# (name, view, field, implants forced, output long side px, pixel spacing mm, bits, modality, photometric)
CASES: tuple[tuple[str, str, str, tuple[str, ...], int, float, int, str, str], ...] = (
    ("lumbar AP 2000 px DX, screws+rods+cages", "AP", "lumbar", ("posterior", "cage"), 2000, 0.17, 12, "DX", "MONOCHROME2"),
    ("lumbar LAT 2000 px DX, screws+rods", "LAT", "lumbar", ("posterior",), 2000, 0.17, 12, "DX", "MONOCHROME2"),
    ("whole spine AP 3000 px DX, construct", "AP", "whole", ("posterior",), 3000, 0.25, 14, "DX", "MONOCHROME2"),
    ("thoracolumbar AP 2500 px CR MONO1, plate", "AP", "thoracolumbar", ("plate",), 2500, 0.15, 10, "CR", "MONOCHROME1"),
    ("lumbar AP 2000 px DX, no implants", "AP", "lumbar", (), 2000, 0.17, 12, "DX", "MONOCHROME2"),
    ("small 416 px, no spacing, screws+rods", "AP", "whole", ("posterior",), 416, 0.0, 8, "DX", "MONOCHROME2"),
)


def make_case(case: tuple, seed: int):  # noqa: ANN201 - returns (pydicom Dataset, implants drawn)
    """A phantom radiograph (with the case's implants) written as DICOM at the case's matrix size."""
    name, view, field, implants, long_side, spacing, bits, modality, photometric = case
    return phantom_radiograph(f"hw-{name}", view, field, long_side, spacing, bits, modality, photometric, seed=seed,
                              implants=implants)


def run(repeat: int = 3, threads: int = 2, model_root: str | None = None) -> list[dict[str, Any]]:
    """Benchmark every case (the shipped models; a candidate under `model_root` overrides them); one row per case."""
    import torch

    from inference import analyses
    from inference.radiograph import network
    from inference.radiograph.analysis import ImageWork, SpineXrAnalysis, source_image
    from inference.radiograph.hardware import HardwareModel, interpret, prepare, vertebra_geometry
    from inference.radiograph.preprocess import decode
    from inference.registry import ModelRegistry

    torch.set_num_threads(threads)
    from pathlib import Path

    from inference.registry import BUILTIN_MODELS

    registry = ModelRegistry([BUILTIN_MODELS] + ([Path(model_root)] if model_root else []))
    analysis = analyses.create("spine-xr", registry)
    assert isinstance(analysis, SpineXrAnalysis)  # its steps are timed one by one below
    if analysis.hardware_step is None:
        raise SystemExit("the hardware model (inference/models/spine-xr-hardware) is not installed")
    analysis.models()  # load once, as the node does at start-up
    model = HardwareModel.from_registry(registry)
    rows = []
    for k, case in enumerate(CASES):
        ds, n_true = make_case(case, seed=200 + k)
        ds.pixel_array  # noqa: B018 - decode once outside the timing, like a stored instance read from disk
        rad = decode(ds)
        source = source_image(ds, rad)
        work = ImageWork(ds, rad, source)
        analysis.vertebra_step.run(work)
        analysis.fracture_step.run(work)  # as the analysis runs it (grading as its model.json says)
        analysis.run([ds])  # warm-up
        added, whole = [], []
        stages: dict[str, list[float]] = {"preprocess": [], "network": [], "instances": []}
        outcome = None
        for _ in range(repeat):
            outcome, dt = timed(analysis.hardware_step.run, rad, work.vertebrae, source)
            added.append(dt)
            _, dt = timed(analysis.run, [ds.copy()])
            whole.append(dt)
            (image, _), t = timed(prepare, rad.pixels, rad.pixel_spacing_mm)
            stages["preprocess"].append(t)
            prob, t = timed(network.predict, model.net, image)
            stages["network"].append(t)
            scale = (image.shape[0] / rad.pixels.shape[0], image.shape[1] / rad.pixels.shape[1])
            mm = rad.pixel_spacing_mm[0] / scale[0] if rad.pixel_spacing_mm else model.spacing_mm
            geoms = vertebra_geometry(work.vertebrae, rad.orientation)
            _, t = timed(interpret, prob, scale, mm, rad, geoms, source, model.params)
            stages["instances"].append(t)
        median = statistics.median(added)
        rows.append(
            {
                "case": case[0],
                "matrix": f"{ds.Rows}x{ds.Columns}",
                "added_seconds": round(median, 3),
                "analysis_seconds": round(statistics.median(whole), 3),
                "ratio_to_budget": round(median / BUDGET_S, 2),
                "stages_s": {k: round(statistics.median(v), 3) for k, v in stages.items()},
                "implants_true": n_true,
                "implants_found": len(outcome.implants) if outcome else 0,
                "status": outcome.status.value if outcome else None,
                "instrumentation": outcome.instrumentation if outcome else "",
            }
        )
    return rows


def report(rows: list[dict[str, Any]], threads: int = 2, repeat: int = 3) -> list[str]:
    """Printable lines for `run`'s rows."""
    lines = [f"spine-xr hardware step, {threads} threads, median of {repeat} (budget: adds <= {BUDGET_S:.1f} s per radiograph)"]
    for r in rows:
        st = r["stages_s"]
        lines.append(
            f"  {r['case']:<42} {r['matrix']:>10}  adds {r['added_seconds']:.3f} s = {r['ratio_to_budget']:.2f} x budget "
            f"(preprocess {st['preprocess']:.3f}, network {st['network']:.3f}, instances {st['instances']:.3f}); "
            f"whole analysis {r['analysis_seconds']:.3f} s; {r['implants_found']} implants found ({r['implants_true']} drawn), {r['status']}"
        )
    worst = max(r["ratio_to_budget"] for r in rows)
    lines.append(f"worst case: {worst:.2f} x budget -> {'OK' if worst <= 1.0 else 'OVER BUDGET'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.inference_hardware", description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model-root", default=None, help="extra model folder root (a candidate model, before it is shipped)")
    args = ap.parse_args(argv)
    print("\n".join(report(run(args.repeat, args.threads, args.model_root), args.threads, args.repeat)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
