"""The vertebra network: a compact MONAI 2D U-Net with one output channel per task.

Channels (all sigmoid):

* ``body``: vertebral body (C2-L5), the structure heights are measured on;
* ``vertebra``: the whole vertebra (body + posterior elements), tells anterior from posterior on laterals;
* ``sacrum``: the sacrum, the anchor for naming levels;
* ``centre``: a Gaussian around each vertebral body centre, whose peaks are the instance markers;
* ``l5``: a Gaussian around the fifth lumbar body only, the anchor for naming levels on real radiographs
  (the sacrum channel, taught by synthetic images, rarely fired on them).  Models trained before this
  channel existed have the first four only (`LEGACY_CHANNELS`) and name levels from the sacrum.

torch and MONAI are imported inside the functions so importing this module stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from inference.radiograph.preprocess import pad_to_multiple

if TYPE_CHECKING:
    import torch

CHANNELS: tuple[str, ...] = ("body", "vertebra", "sacrum", "centre", "l5")
BODY, VERTEBRA, SACRUM, CENTRE, L5 = range(len(CHANNELS))
LEGACY_CHANNELS = CHANNELS[:4]

#: Architecture of the shipped model (also written to model.json so a folder is self-describing).
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "type": "monai.networks.nets.BasicUNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": len(CHANNELS),
    "features": [16, 24, 48, 96, 192, 16],
    "channels": list(CHANNELS),
}


def build_network(architecture: dict[str, Any] | None = None) -> torch.nn.Module:
    """An untrained network for `architecture` (a model.json "architecture" entry)."""
    from monai.networks.nets import BasicUNet

    arch = dict(DEFAULT_ARCHITECTURE if architecture is None else architecture)
    if arch.get("type") != DEFAULT_ARCHITECTURE["type"]:
        raise ValueError(f"unsupported architecture type {arch.get('type')!r}")
    if tuple(arch.get("channels", CHANNELS)) not in (CHANNELS, LEGACY_CHANNELS):
        raise ValueError(f"model channels {arch.get('channels')} differ from this code's {list(CHANNELS)}")
    return BasicUNet(
        spatial_dims=int(arch["spatial_dims"]),
        in_channels=int(arch["in_channels"]),
        out_channels=int(arch["out_channels"]),
        features=tuple(int(f) for f in arch["features"]),
    )


def forward_logits(net: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    """Logits (C, H, W) for one normalised network-scale image (padded internally, cropped back)."""
    import torch

    padded, (rows, cols) = pad_to_multiple(image)
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))[None, None]
        logits = net(x)[0, :, :rows, :cols]
    return logits


def predict(net: torch.nn.Module, image: np.ndarray) -> np.ndarray:
    """Probabilities (C, H, W) float32 for one normalised network-scale image."""
    import torch

    return torch.sigmoid(forward_logits(net, image)).numpy()


def widen_state(state: dict[str, Any], out_channels: int) -> dict[str, Any]:
    """A legacy (four-channel) state dict for a network with more output channels: each new channel starts
    as a copy of the centre channel (it is a centre heatmap too, restricted to one vertebra)."""
    import torch

    state = dict(state)
    for key in ("final_conv.weight", "final_conv.bias"):
        old = state[key]
        if old.shape[0] < out_channels:
            extra = old[CENTRE : CENTRE + 1].repeat(out_channels - old.shape[0], *([1] * (old.dim() - 1)))
            state[key] = torch.cat([old, extra], dim=0)
    return state


def read_stages(path: str, device: str = "cpu") -> dict[str, Any]:
    """A model folder's weights file as ``{"segmentation": U-Net state dict, <later stage>: state dict, ...}``
    (a file holding the U-Net state dict alone comes back under "segmentation"), read once."""
    import torch

    state = torch.load(path, map_location=device, weights_only=True)
    return dict(state) if "segmentation" in state else {"segmentation": state}


def double_conv(cin: int, cout: int) -> list[torch.nn.Module]:
    """Two 3x3 conv + batch norm + ReLU layers: the block of the models' small second-stage CNNs (kept a
    flat list so each network's state-dict keys stay as trained)."""
    from torch import nn

    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def parameter_count(net: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(int(p.numel()) for p in net.parameters() if p.requires_grad)


