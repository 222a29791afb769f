"""agent backends: provider choice, LiteRT int8 IO, the TensorRT fallback, and the CLI."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.backends import create_backend
from agent.backends.litert import dequantize, quantize
from agent.backends.onnx_runtime import choose_providers
from agent.errors import ModelLoadError
from hardware_profiles import load_profile
from protocol.manifest import ArtifactInfo, BundleManifest, FileEntry, ModelInfo, TensorSpec

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "models" / "digits"


def manifest(path: str, runtime: str, fmt: str, inp: TensorSpec, out: TensorSpec) -> BundleManifest:
    now = datetime.now(UTC)
    return BundleManifest(
        model=ModelInfo(name="m", version=1),
        profile="x",
        created_at=now,
        expires_at=now + timedelta(days=1),
        files=(FileEntry(path=path, sha256="0" * 64, size=1, role="artifact"),),
        artifact=ArtifactInfo(path=path, format=fmt, runtime=runtime, precision="int8"),  # type: ignore[arg-type]
        inputs=(inp,),
        outputs=(out,),
    )


def relu_int8_tflite(path: Path, scale: float, zero_point: int) -> None:
    """A one-op LiteRT model with int8 input and output and a dynamic batch."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    m = S.ModelT()
    m.version = 3
    m.buffers = [S.BufferT()]
    code = S.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = S.BuiltinOperator.RELU
    code.version = 1
    m.operatorCodes = [code]

    def tensor(name: str) -> S.TensorT:
        t = S.TensorT()
        t.name, t.shape, t.shapeSignature = name.encode(), [1, 4], [-1, 4]
        t.type, t.buffer = S.TensorType.INT8, 0
        q = S.QuantizationParametersT()
        q.scale, q.zeroPoint = [scale], [zero_point]
        t.quantization = q
        return t

    sg = S.SubGraphT()
    sg.tensors, sg.inputs, sg.outputs = [tensor("serving_x:0"), tensor("y")], [0], [1]
    op = S.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0], [1]
    sg.operators, m.subgraphs = [op], [sg]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))


def test_choose_providers_intersects_and_keeps_cpu() -> None:
    avail = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["TensorrtExecutionProvider", "CUDAExecutionProvider"], avail) == [
        "CPUExecutionProvider"
    ]
    assert choose_providers(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        [
            "CUDAExecutionProvider",
            "CPUExecutionProvider",
        ],
    ) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_quantize_round_trip_saturates() -> None:
    x = np.array([-1.0, 0.0, 0.5, 100.0], dtype=np.float32)
    q = quantize(x, 0.05, -10, np.dtype(np.int8))
    assert q.dtype == np.int8 and q[-1] == 127
    np.testing.assert_allclose(dequantize(q, 0.05, -10)[:3], x[:3], atol=0.025)


def test_litert_backend_handles_int8_io_and_batch(tmp_path: Path) -> None:
    path = tmp_path / "model.tflite"
    relu_int8_tflite(path, scale=0.05, zero_point=-10)
    spec_in = TensorSpec(name="input", dtype="float32", shape=(None, 4))
    spec_out = TensorSpec(name="output", dtype="float32", shape=(None, 4))
    be = create_backend("tflite")
    be.load(
        path,
        manifest("model.tflite", "tflite", "tflite", spec_in, spec_out),
        load_profile("raspberry-pi-5"),
    )
    x = np.array([[-2.0, -0.1, 0.3, 1.0]] * 3, dtype=np.float32)
    y = be.run({"input": x})["output"]
    assert y.shape == (3, 4) and y.dtype == np.float32
    np.testing.assert_allclose(y, np.maximum(x, 0), atol=0.026)
    be.close()


def test_tensorrt_backend_falls_back_to_onnxruntime_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec_in = TensorSpec(name="input", dtype="float32", shape=(None, 1, 8, 8))
    spec_out = TensorSpec(name="logits", dtype="float32", shape=(None, 10))
    be = create_backend("tensorrt")
    with caplog.at_level(logging.WARNING):
        be.load(
            DIGITS / "model.onnx",
            manifest("model.onnx", "tensorrt", "onnx", spec_in, spec_out),
            load_profile("jetson-orin-nano"),
        )
    assert "TensorrtExecutionProvider" in be.description or "not available" in caplog.text
    y = be.run({"input": np.zeros((2, 1, 8, 8), np.float32)})["logits"]
    assert y.shape == (2, 10)
    be.close()


def test_unknown_runtime_and_bad_artifact_fail_to_load(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not know"):
        create_backend("coreml")
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not a model")
    spec = TensorSpec(name="input", dtype="float32", shape=(None, 4))
    with pytest.raises(ModelLoadError, match="cannot load"):
        create_backend("onnxruntime").load(
            bad, manifest("model.onnx", "onnxruntime", "onnx", spec, spec), load_profile("x86-cpu")
        )


def test_cli_help_and_config_errors(tmp_path: Path) -> None:
    from agent.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["run", "--help"])
    assert res.exit_code == 0 and "--state-dir" in res.output
    res = runner.invoke(
        app,
        ["run", "--state-dir", str(tmp_path), "--device-id", "bad/id", "--profile", "x86-cpu"],
    )
    assert res.exit_code == 2
    res = runner.invoke(
        app,
        ["run", "--state-dir", str(tmp_path), "--device-id", "d1", "--profile", "x86-cpu"],
    )
    assert res.exit_code == 2  # no trust root anywhere yet
