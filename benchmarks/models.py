"""Benchmark models: a MobileNetV2-shaped network exported from PyTorch, cached on disk.

The network follows MobileNetV2's layout (Sandler et al. 2018: a 32-channel stem, 17 inverted
residual blocks with depthwise 3x3 convolutions and ReLU6, a 1280-channel head, global average
pooling, a 1000-way classifier) with random weights: right for size and speed figures, useless
for accuracy figures (its outputs barely depend on its input).

Exported at 224x224 with opset 17 and a dynamic batch axis. Torch's exporter may write an empty
`<model>.onnx.data` beside the model; the cached model is re-saved self-contained (weights
inline) so the compiler and ONNX Runtime read one file.

torch is a dev dependency; it is imported only when a model has to be exported.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CACHE_DIR",
    "MOBILENET_INPUT",
    "MOBILENET_OUTPUT",
    "image_set",
    "mobilenet_v2_onnx",
]

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
MOBILENET_INPUT = "input"
MOBILENET_OUTPUT = "logits"
#: bump when the network definition or the export settings change (invalidates the cache)
_MOBILENET_REVISION = 1
_OPSET = 17

#: (expansion t, output channels c, repeats n, first stride s), from the paper's Table 2
_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _build_network(num_classes: int, seed: int) -> Any:
    import torch
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True):
        layers: list[nn.Module] = [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
        ]
        if act:
            layers.append(nn.ReLU6(inplace=True))
        return nn.Sequential(*layers)

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers.append(conv_bn(cin, hidden, 1, 1))  # pointwise expansion
            layers.append(conv_bn(hidden, hidden, 3, stride, groups=hidden))  # depthwise
            layers.append(conv_bn(hidden, cout, 1, 1, act=False))  # linear bottleneck
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return x + y if self.residual else y

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [conv_bn(3, 32, 3, 2)]
            cin = 32
            for t, c, n, s in _BLOCKS:
                for i in range(n):
                    layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers.append(conv_bn(cin, 1280, 1, 1))
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(1280, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    torch.manual_seed(seed)
    net = MobileNetV2()
    # Non-trivial BatchNorm statistics, so folding them into the convs is not an identity.
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def _export(out: Path, num_classes: int, seed: int) -> None:
    import onnx
    import torch

    net = _build_network(num_classes, seed)
    example = torch.zeros(1, 3, 224, 224)
    with tempfile.TemporaryDirectory(prefix="edgefleet-export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        torch.onnx.export(
            net,
            (example,),
            str(raw),
            input_names=[MOBILENET_INPUT],
            output_names=[MOBILENET_OUTPUT],
            opset_version=_OPSET,
            dynamic_axes={MOBILENET_INPUT: {0: "batch"}, MOBILENET_OUTPUT: {0: "batch"}},
        )
        # Loads the weights wherever the exporter put them (inline or in model.onnx.data)...
        proto = onnx.load(str(raw), load_external_data=True)
    # ...and saves them inline: one self-contained file (MobileNetV2 is far below 2 GB).
    onnx.checker.check_model(proto)
    tmp_out = out.with_suffix(f".tmp{os.getpid()}")
    tmp_out.write_bytes(proto.SerializeToString())
    tmp_out.replace(out)


def mobilenet_v2_onnx(
    *, num_classes: int = 1000, seed: int = 0, cache_dir: Path = CACHE_DIR
) -> Path:
    """Path of the MobileNetV2-shaped float32 ONNX model (exported on first use, then cached)."""
    key = hashlib.sha256(f"{_MOBILENET_REVISION}:{num_classes}:{seed}:{_OPSET}".encode())
    out = Path(cache_dir) / f"mobilenet_v2-{key.hexdigest()[:12]}.onnx"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        _export(out, num_classes, seed)
    return out


def image_set(
    count: int, *, seed: int, size: int = 224, kind: str = "normal"
) -> dict[str, np.ndarray]:
    """Random NCHW float32 images keyed by MOBILENET_INPUT (kind 'normal' or 'uniform')."""
    rng = np.random.default_rng(seed)
    shape = (count, 3, size, size)
    if kind == "normal":
        images = rng.standard_normal(shape, dtype=np.float32)
    elif kind == "uniform":
        images = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    else:
        raise ValueError(f"kind must be 'normal' or 'uniform', not {kind!r}")
    return {MOBILENET_INPUT: images}
