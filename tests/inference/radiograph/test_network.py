"""The vertebra network's channels: a four-channel (pre-L5) model still loads and fine-tunes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.radiograph import network


def test_legacy_four_channel_weights_widen_to_the_l5_channel() -> None:
    torch.manual_seed(0)
    legacy = network.build_network({**network.DEFAULT_ARCHITECTURE, "out_channels": 4, "channels": list(network.LEGACY_CHANNELS)})
    net = network.build_network()
    net.load_state_dict(network.widen_state(legacy.state_dict(), len(network.CHANNELS)))
    image = np.random.default_rng(0).random((64, 48)).astype(np.float32)
    old, new = network.predict(legacy.eval(), image), network.predict(net.eval(), image)
    assert new.shape[0] == len(network.CHANNELS) == old.shape[0] + 1
    np.testing.assert_allclose(new[: old.shape[0]], old, atol=1e-6)
    # The L5 channel starts as the centre heatmap and learns to keep only L5.
    np.testing.assert_allclose(new[network.L5], old[network.CENTRE], atol=1e-6)


def test_unknown_channel_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="channels"):
        network.build_network({**network.DEFAULT_ARCHITECTURE, "channels": ["body", "centre"]})
