"""Whole models through the TFLite target: digits end to end (bundle -> agent self-test) and
torch-exported MobileNetV2-shaped, ResNet-style and MLP networks against ONNX Runtime."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("ai_edge_litert")

from compiler.data import validate_arrays  # noqa: E402
from compiler.errors import UnsupportedOpError  # noqa: E402
from compiler.model import load_model  # noqa: E402
from compiler.pipeline import CompileOptions, compile_model  # noqa: E402
from compiler.quantize import QuantConfig, preprocess, quantize_static  # noqa: E402
from compiler.tflite import convert, litert_runner, load_check  # noqa: E402
from protocol.signing import generate_signing_key, save_signing_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"


def _options(model: Path, key: Path, out: Path, **kw: Any) -> CompileOptions:
    return CompileOptions(
        model_path=model,
        profile="raspberry-pi-5",
        calibration_path=DIGITS / "calibration.npz",
        heldout_path=DIGITS / "heldout.npz",
        key_path=key,
        out_dir=out,
        model_name="digits",
        latency_runs=3,
        **kw,
    )


@pytest.fixture(scope="module")
def signing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    key = generate_signing_key()
    path = tmp_path_factory.mktemp("keys") / "release.pem"
    save_signing_key(key, path)
    return key, path


def test_digits_bundle_verifies_and_the_agent_self_tests_it(
    tmp_path: Path, signing: tuple[Any, Path]
) -> None:
    from agent.model import load_model as agent_load
    from agent.selftest import run_self_test
    from hardware_profiles import load_profile
    from protocol.bundle import BundleReader
    from protocol.trust import TrustRoot

    key, key_path = signing
    result = compile_model(_options(DIGITS / "model.onnx", key_path, tmp_path / "out"))
    m = result.manifest
    assert (m.artifact.path, m.artifact.format, m.artifact.runtime) == (
        "model/model.tflite",
        "tflite",
        "tflite",
    )
    assert m.artifact.precision == "int8"
    v = m.verification
    assert v is not None and v.passed
    assert v.top1_drop_points is not None and v.top1_drop_points <= 1.0
    qdq = [n for n in v.notes if n.startswith("QDQ agreement")]
    assert qdq and "top-1 agreement 1.0000" in qdq[0]

    trust = TrustRoot.create(
        root_keys=[key], release_keys=[key], expires_at=datetime.now(UTC) + timedelta(days=30)
    )
    extract = tmp_path / "slot"
    verified = BundleReader(result.bundle_path).verify(
        trust, profile="raspberry-pi-5", extract_to=extract
    )
    loaded = agent_load(extract, verified.manifest, verified.sha256, load_profile("raspberry-pi-5"))
    try:
        assert run_self_test(loaded).passed
    finally:
        loaded.backend.close()


def test_unsupported_op_writes_no_bundle(tmp_path: Path, signing: tuple[Any, Path]) -> None:
    from onnx import helper

    src = onnx.load(str(DIGITS / "model.onnx"))
    last = src.graph.node[-1]
    last.output[0] = "pre"
    src.graph.node.append(helper.make_node("Erf", ["pre"], ["logits"], name="odd_erf"))
    path = tmp_path / "erf.onnx"
    onnx.save(src, str(path))
    out = tmp_path / "out"
    with pytest.raises(UnsupportedOpError, match="odd_erf"):
        compile_model(_options(path, signing[1], out))
    assert not out.exists() or not any(out.iterdir())


# -- torch-exported networks -----------------------------------------------------------------
def _nets() -> dict[str, tuple[Any, tuple[int, ...]]]:
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    nn = torch.nn

    def cbr(i: int, o: int, s: int = 1, g: int = 1, k: int = 3) -> Any:
        return nn.Sequential(
            nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6()
        )

    class Inverted(nn.Module):
        def __init__(self, i: int, o: int, s: int, e: int) -> None:
            super().__init__()
            h = i * e
            self.res = s == 1 and i == o
            layers = [] if e == 1 else [cbr(i, h, k=1)]
            layers += [cbr(h, h, s, g=h), nn.Conv2d(h, o, 1, bias=False), nn.BatchNorm2d(o)]
            self.b = nn.Sequential(*layers)

        def forward(self, x: Any) -> Any:
            return x + self.b(x) if self.res else self.b(x)

    def mobilenet_v2(width: float = 0.35) -> Any:
        cfg = [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        ]
        c = max(8, int(32 * width))
        layers = [cbr(3, c, 2)]
        for t, o, n, s in cfg:
            o = max(8, int(o * width))
            for j in range(n):
                layers.append(Inverted(c, o, s if j == 0 else 1, t))
                c = o
        layers.append(cbr(c, 1280, k=1))
        return nn.Sequential(
            *layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(1280, 10)
        )

    class Block(nn.Module):
        def __init__(self, i: int, o: int, s: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o)
            self.c2, self.b2 = nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o)
            self.sc = (
                nn.Sequential()
                if s == 1 and i == o
                else nn.Sequential(nn.Conv2d(i, o, 1, s, bias=False), nn.BatchNorm2d(o))
            )

        def forward(self, x: Any) -> Any:
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.sc(x))

    resnet = nn.Sequential(
        nn.Conv2d(3, 16, 7, 2, 3, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),
        Block(16, 16, 1),
        Block(16, 32, 2),
        Block(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    mlp = nn.Sequential(
        nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 5)
    )
    return {
        "mobilenet_v2_96": (mobilenet_v2(), (1, 3, 96, 96)),
        "resnet_skip": (resnet, (1, 3, 64, 64)),
        "mlp_tabular": (mlp, (1, 20)),
    }


def export_onnx(net: Any, shape: tuple[int, ...], path: Path) -> None:
    """Export with a dynamic batch axis (the legacy exporter: fast, no external data)."""
    import torch

    torch.manual_seed(0)
    net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.randn(*shape),),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            dynamo=False,
            opset_version=17,
        )


@pytest.mark.parametrize("name", ["mobilenet_v2_96", "resnet_skip", "mlp_tabular"])
def test_torch_network_matches_onnx_runtime(name: str, tmp_path: Path) -> None:
    import onnxruntime as ort
    import torch

    torch.manual_seed(0)
    net, shape = _nets()[name]
    for p in net.parameters():  # non-trivial BatchNorm statistics, so folding is exercised
        p.data.normal_(0, 0.3) if p.dim() == 1 else None
    src = tmp_path / "m.onnx"
    export_onnx(net, shape, src)
    model = load_model(src)
    pre = tmp_path / "pre.onnx"
    preprocess(model.serialized(), pre)
    rng = np.random.default_rng(0)
    cal = validate_arrays(
        {"input": rng.standard_normal((48, *shape[1:])).astype(np.float32)},
        model.inputs,
        role="calibration",
        source="rng",
    )
    qdq = tmp_path / "qdq.onnx"
    quantize_static(
        pre,
        qdq,
        cal,
        QuantConfig(
            activation_type="int8",
            weight_type="int8",
            per_channel=True,
            symmetric_activations=False,
        ),
    )
    x = rng.standard_normal((8, *shape[1:])).astype(np.float32)
    for mode, onnx_path in (("fp32", pre), ("int8", qdq)):
        conv = convert(onnx.load(str(onnx_path)), mode=mode)  # type: ignore[arg-type]
        load_check(conv.data, origins=conv.origins)
        if len(shape) == 4:
            assert conv.op_counts.get("TRANSPOSE", 0) == 1  # the input edge only
        path = tmp_path / f"{mode}.tflite"
        path.write_bytes(conv.data)
        got = litert_runner(path, threads=2)({"input": x})[0]
        ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(
            None, {"input": x}
        )[0]
        span = float(ref.max() - ref.min())
        tol = 1e-4 * max(1.0, span) if mode == "fp32" else 0.05 * span
        assert np.abs(got - ref).max() <= tol, (mode, float(np.abs(got - ref).max()), span)
