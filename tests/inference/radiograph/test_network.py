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


def test_an_l5_weight_of_zero_leaves_the_l5_channel_out_of_the_loss() -> None:
    """`--l5-weight 0`: a fine-tune of widened weights whose copied L5 channel (a peak on every vertebra, first
    loss ~45) would otherwise drown the other channels' clipped gradient."""
    from inference.train.vertebrae import loss_fn

    torch.manual_seed(0)
    logits = torch.randn(2, len(network.CHANNELS), 16, 16, requires_grad=True)
    target = torch.zeros_like(logits)
    target[:, :, 8, 8] = 1.0
    weight = torch.ones_like(logits)
    with_l5, parts = loss_fn(logits, target, weight)
    without, same_parts = loss_fn(logits, target, weight, l5_weight=0.0)
    assert parts == same_parts and parts["l5"] > 0
    assert float((with_l5 - without).detach()) == pytest.approx(0.5 * parts["l5"], rel=1e-5)
    without.backward()
    assert logits.grad is not None and not logits.grad[:, network.L5].any()
    assert logits.grad[:, network.CENTRE].abs().sum() > 0
