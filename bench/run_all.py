"""``make bench``: ingest throughput against storescp and Orthanc, release-to-acknowledged latency, and the
radiograph models' CPU time per image against their 1 s budget (when the model folders are present)."""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
from pathlib import Path

from bench import inference_hardware, inference_vertebrae, ingest, latency
from inference.registry import ModelError, ModelRegistry


def _has_model(name: str) -> bool:
    try:
        ModelRegistry().spec(name)
    except ModelError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2, help="ingest runs per receiver (best counts)")
    parser.add_argument("--studies", type=int, default=10, help="latency studies")
    args = parser.parse_args()
    import os

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), Python {platform.python_version()}")
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    try:
        print("ingest (dcmtk storescu, TCP_NODELAY=1, one association, best of", args.repeats, "runs):")
        results = ingest.run(work / "ingest", args.repeats)
        print("\n".join(ingest.ratios(results)))
        shutil.rmtree(work / "ingest", ignore_errors=True)
        print("latency (association release -> last output acknowledged by Orthanc):")
        print("\n".join(latency.report(latency.run(work / "latency", args.studies))))
        available = {name for name in ("spine-xr-vertebrae", "spine-xr-hardware") if _has_model(name)}
        if "spine-xr-vertebrae" in available:
            print("\n".join(inference_vertebrae.report(inference_vertebrae.run())))
        if {"spine-xr-vertebrae", "spine-xr-hardware"} <= available:
            print("\n".join(inference_hardware.report(inference_hardware.run())))
        missing = {"spine-xr-vertebrae", "spine-xr-hardware"} - available
        if missing:
            print("not benchmarked (model folder missing):", ", ".join(sorted(missing)))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
