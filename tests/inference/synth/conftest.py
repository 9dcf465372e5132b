"""Small phantom-only configurations for the data-engine tests (tests never read the shared data)."""

from __future__ import annotations

import pytest

from inference.synth.render import SynthConfig


@pytest.fixture(scope="session")
def small_config() -> SynthConfig:
    """A lumbar phantom (T10-S1, 3 mm grid) rendered at 256 px: about a second per sample."""
    return SynthConfig(
        data_dir=None,
        sources=(("phantom", 1.0),),
        fields=(("lumbar", 1.0),),
        phantom_variants=2,
        phantom_span=("T10", "S1"),
        phantom_spacing=3.0,
        render_px=256,
        out_px=(256, 320),
    )
