"""``make bench``: ingest throughput against storescp and Orthanc, and release-to-acknowledged latency."""

from __future__ import annotations

import argparse
import platform
import shutil
import tempfile
from pathlib import Path

from bench import ingest, latency


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
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
