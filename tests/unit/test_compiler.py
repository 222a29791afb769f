"""The compiler on the shipped digits model: artifacts per profile, gate, data and model errors,
reproducibility, and bundles that verify against a trust root."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import onnx
import pytest

from compiler.errors import (
    DatasetError,
    GateRefusedError,
    ModelError,
    PrecisionError,
    ProfileNotFoundError,
    SigningKeyError,
)
from compiler.golden import deterministic_npz
from compiler.model import load_model
from compiler.onnx_target import onnx_runner
from compiler.pipeline import CompileOptions, CompileResult, compile_model, resolve_created_at
from protocol.bundle import BundleReader
from protocol.features import Baseline
from protocol.signing import generate_signing_key, save_signing_key
from protocol.trust import TrustRoot

DIGITS = Path(__file__).resolve().parents[2] / "models" / "digits"
CREATED = datetime(2025, 1, 1, tzinfo=UTC)
NOW = CREATED + timedelta(days=1)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compiler")


@pytest.fixture(scope="module")
def release_key(workspace: Path):
    key = generate_signing_key()
    save_signing_key(key, workspace / "release.pem")
    return key


@pytest.fixture(scope="module")
def trust(release_key) -> TrustRoot:
    return TrustRoot.create(
        root_keys=[generate_signing_key()],
        release_keys=[release_key],
        expires_at=CREATED + timedelta(days=3650),
    )


@pytest.fixture(scope="module")
def base_options(workspace: Path, release_key) -> CompileOptions:
    return CompileOptions(
        model_path=DIGITS / "model.onnx",
        profile="x86-cpu",
        calibration_path=DIGITS / "calibration.npz",
        heldout_path=DIGITS / "heldout.npz",
        key_path=workspace / "release.pem",
        out_dir=workspace / "out",
        model_name="digits",
        created_at=CREATED,
        latency_runs=3,
    )


@pytest.fixture(scope="module")
def compiled(base_options: CompileOptions, workspace: Path) -> dict[str, CompileResult]:
    """One bundle per ONNX-based profile, compiled once for the module."""
    return {
        p: compile_model(replace(base_options, profile=p, out_dir=workspace / p))
        for p in ("x86-cpu", "x86-cuda", "jetson-orin-nano")
    }


def _extract(result: CompileResult, trust: TrustRoot, dest: Path):
    verified = BundleReader(result.bundle_path).verify(
        trust, now=NOW, profile=result.manifest.profile, extract_to=dest
    )
    assert verified.sha256 == result.sha256
    return verified.manifest


def _zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [
        inits[n.input[2]]
        for n in model.graph.node
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2
    ]


def _activation_zero_points(model: onnx.ModelProto) -> list[np.ndarray]:
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]


# --------------------------------------------------------------------------- per profile


def test_x86_cpu_is_u8s8_int8_within_budget(compiled, trust, tmp_path):
    result = compiled["x86-cpu"]
    manifest = _extract(result, trust, tmp_path)
    assert result.bundle_path.name == "digits-v1-x86-cpu.efb"
    assert manifest.artifact.precision == "int8"
    assert manifest.quantization["scheme"] == "U8S8"
    model = onnx.load(str(tmp_path / "model" / "model.onnx"))
    act = _activation_zero_points(model)
    assert act and all(z.dtype == np.uint8 for z in act)
    weights = [z for z in _zero_points(model) if z.dtype == np.int8]
    assert weights, "weights should be int8"
    report = manifest.verification
    assert report.passed and report.top1_drop_points <= 1.0
    assert report.artifact_top1_accuracy >= 0.97
    assert manifest.host_figures["size_ratio"] < 0.5


def test_jetson_is_symmetric_s8s8_with_trt_recipe(compiled, trust, tmp_path):
    import json

    manifest = _extract(compiled["jetson-orin-nano"], trust, tmp_path)
    assert manifest.artifact.runtime == "tensorrt"
    assert manifest.artifact.execution_providers[0] == "TensorrtExecutionProvider"
    model = onnx.load(str(tmp_path / "model" / "model.onnx"))
    zps = _zero_points(model)
    # int8 activations and weights, int32 biases: every zero point is 0 (symmetric)
    assert zps and all(z.dtype in (np.int8, np.int32) and not z.any() for z in zps)
    assert any(z.dtype == np.int8 for z in zps)
    recipe = json.loads((tmp_path / "model" / "trt_recipe.json").read_bytes())
    assert recipe["precision"] == "int8"
    assert recipe["dla_core"] == -1
    assert recipe["input_shapes"]["input"] == {
        "min": [1, 1, 8, 8],
        "opt": [1, 1, 8, 8],
        "max": [8, 1, 8, 8],
    }
    assert manifest.file("model/trt_recipe.json").role == "recipe"
    assert manifest.verification.passed


def test_x86_cuda_defaults_to_fp16_with_float32_io(compiled, trust, tmp_path):
    manifest = _extract(compiled["x86-cuda"], trust, tmp_path)
    assert manifest.artifact.precision == "fp16"
    opts = manifest.artifact.runtime_options["provider_options"]
    assert opts["TensorrtExecutionProvider"]["trt_fp16_enable"] is True
    model = onnx.load(str(tmp_path / "model" / "model.onnx"))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert manifest.verification.passed
    assert manifest.verification.top1_drop_points <= 1.0


def test_golden_pairs_and_baseline_are_usable(compiled, trust, tmp_path):
    manifest = _extract(compiled["x86-cpu"], trust, tmp_path)
    golden = manifest.golden
    assert golden is not None and golden.count == 16 and golden.min_top1_match == 1.0
    with np.load(tmp_path / golden.path) as npz:
        inputs, expected = npz["in:input"], npz["out:logits"]
    assert inputs.shape == (16, 1, 8, 8)
    got = onnx_runner(tmp_path / "model" / "model.onnx", threads=1)({"input": inputs})[0]
    np.testing.assert_allclose(got, expected, atol=golden.atol, rtol=golden.rtol)
    assert (got.argmax(1) == expected.argmax(1)).all()
    # The tolerance must still catch a wrong model: the float model differs visibly.
    baseline = Baseline.model_validate_json((tmp_path / "baseline" / "sketches.json").read_bytes())
    assert baseline.rows == 256 + 540
    assert sum(baseline.output_class_counts) == baseline.rows
    assert baseline.confidence is not None and baseline.confidence.count == baseline.rows
    assert len(baseline.sketches) == len(baseline.features[0].names)


def test_lineage_records_sources_and_versions(compiled):
    lineage = compiled["x86-cpu"].manifest.lineage
    assert lineage["source_model_sha256"] == load_model(DIGITS / "model.onnx").sha256
    assert lineage["calibration_samples"] == 256 and lineage["heldout_samples"] == 540
    assert lineage["versions"]["onnxruntime"] and lineage["compiler_version"]
    assert lineage["options"]["gate"] == {"max_top1_drop_points": 1.0, "min_snr_db": 20.0}


def test_same_inputs_give_the_same_bundle_bytes(compiled, base_options, tmp_path):
    again = compile_model(replace(base_options, out_dir=tmp_path))
    assert again.sha256 == compiled["x86-cpu"].sha256
    # Latency is measured but kept out of a reproducible manifest.
    assert "artifact_latency_ms_median" in again.host_figures
    assert "artifact_latency_ms_median" not in again.manifest.host_figures


def test_created_at_from_source_date_epoch():
    ts, reproducible = resolve_created_at(None, {"SOURCE_DATE_EPOCH": "1735689600"})
    assert ts == CREATED and reproducible
    _, reproducible = resolve_created_at(None, {})
    assert not reproducible


# --------------------------------------------------------------------------- gate


def test_gate_refuses_with_figures_and_advice(base_options, tmp_path):
    opts = replace(base_options, out_dir=tmp_path / "out", min_snr_db=90.0)
    with pytest.raises(GateRefusedError) as err:
        compile_model(opts)
    msg = str(err.value)
    assert "SNR" in msg and "90.0 dB" in msg
    assert "--calibration-method" in msg and "--exclude-node" in msg and "--auto" in msg
    assert not err.value.report.passed
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_auto_keeps_the_smallest_artifact_within_budget(base_options, tmp_path):
    # int8 cannot reach 90 dB; x86-cpu offers fp32 as the fallback.
    result = compile_model(replace(base_options, out_dir=tmp_path, min_snr_db=90.0, auto=True))
    assert result.manifest.artifact.precision == "fp32"
    labels = [a.label for a in result.attempts]
    assert len(labels) >= 4 and any("excluding" in label for label in labels)
    assert [a.chosen for a in result.attempts].count(True) == 1
    assert result.sensitivity, "the exclusion tier ranks nodes first"


def test_sensitivity_lists_quantized_nodes(base_options, tmp_path):
    result = compile_model(replace(base_options, out_dir=tmp_path, sensitivity=True))
    nodes = {s.node for s in result.sensitivity}
    assert {"/0/Conv", "/2/Conv", "/6/Gemm", "/8/Gemm"} <= nodes
    snrs = [s.min_snr_db for s in result.sensitivity]
    assert snrs == sorted(snrs)


# --------------------------------------------------------------------------- bad input


def _npz(path: Path, **arrays: np.ndarray) -> Path:
    path.write_bytes(deterministic_npz(arrays))
    return path


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ({"x": np.zeros((4, 1, 8, 8), np.float32)}, "lacks model input(s) 'input' float32"),
        ({"input": np.zeros((4, 1, 8, 8), np.float64)}, "dtype float64"),
        ({"input": np.zeros((4, 8, 8), np.float32)}, "expects float32[batch, 1, 8, 8]"),
        ({"input": np.zeros((4, 1, 8, 9), np.float32)}, "axis 3 must be 8"),
        ({"input": np.zeros((0, 1, 8, 8), np.float32)}, "is empty"),
        ({"input": np.full((4, 1, 8, 8), np.nan, np.float32)}, "NaN/Inf"),
    ],
)
def test_bad_calibration_data_is_named(base_options, tmp_path, arrays, needle):
    cal = _npz(tmp_path / "cal.npz", **arrays)
    with pytest.raises(DatasetError, match="calibration") as err:
        compile_model(replace(base_options, calibration_path=cal, out_dir=tmp_path / "out"))
    assert needle in str(err.value)
    assert not (tmp_path / "out").exists()


def test_heldout_must_not_be_the_calibration_set(base_options, tmp_path):
    with pytest.raises(Exception, match="held-out data is the calibration data"):
        compile_model(replace(base_options, heldout_path=DIGITS / "calibration.npz"))


def test_data_directory_of_npy_files(base_options, tmp_path):
    from compiler.data import load_dataset

    (tmp_path / "held").mkdir()
    with np.load(DIGITS / "heldout.npz") as npz:
        np.save(tmp_path / "held" / "input.npy", npz["input"][:32])
        np.save(tmp_path / "held" / "label.npy", npz["label"][:32])
    data = load_dataset(
        tmp_path / "held", load_model(DIGITS / "model.onnx").inputs, role="held-out"
    )
    assert data.count == 32 and data.labels is not None


def _bad_models(tmp: Path) -> dict[str, Path]:
    raw = (DIGITS / "model.onnx").read_bytes()
    (tmp / "text.onnx").write_text("definitely not a protobuf")
    (tmp / "trunc.onnx").write_bytes(raw[: len(raw) // 2])
    m = onnx.load(str(DIGITS / "model.onnx"))
    m.opset_import[0].version = 99
    (tmp / "opset.onnx").write_bytes(m.SerializeToString())
    m = onnx.load(str(DIGITS / "model.onnx"))
    onnx.save_model(m, str(tmp / "ext.onnx"), save_as_external_data=True, location="w.bin")
    (tmp / "w.bin").unlink()
    return {
        "text": tmp / "text.onnx",
        "trunc": tmp / "trunc.onnx",
        "opset": tmp / "opset.onnx",
        "ext": tmp / "ext.onnx",
        "missing": tmp / "nope.onnx",
    }


@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("text", "is not an ONNX model"),
        ("trunc", "truncated"),
        ("opset", "opset 99"),
        ("ext", "external data"),
        ("missing", "does not exist"),
    ],
)
def test_bad_model_files_are_named(base_options, tmp_path, kind, needle):
    path = _bad_models(tmp_path)[kind]
    with pytest.raises(ModelError, match=needle):
        compile_model(replace(base_options, model_path=path, out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_unknown_profile(base_options):
    with pytest.raises(ProfileNotFoundError, match="x86-cpu"):
        compile_model(replace(base_options, profile="no-such-board"))


def test_missing_key_file(base_options, tmp_path):
    with pytest.raises(SigningKeyError, match="does not exist"):
        compile_model(replace(base_options, key_path=tmp_path / "absent.pem"))


def test_tflite_profile_makes_a_verified_tflite_bundle(base_options):
    result = compile_model(replace(base_options, profile="raspberry-pi-5"))
    m = result.manifest
    assert (m.artifact.format, m.artifact.runtime, m.artifact.precision) == (
        "tflite",
        "tflite",
        "int8",
    )
    assert m.verification is not None and m.verification.passed
    assert "LiteRT" in m.verification.runtime
    assert m.verification.top1_drop_points is not None
    assert m.verification.top1_drop_points <= 0.5


def test_precision_not_allowed_lists_allowed(base_options):
    with pytest.raises(PrecisionError, match="allowed: fp32, int8"):
        compile_model(replace(base_options, precision="fp16"))


def test_deterministic_npz_is_stable_and_loadable():
    arrays = {"in:x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    a, b = deterministic_npz(arrays), deterministic_npz(arrays)
    assert a == b
    with np.load(io.BytesIO(a)) as npz:
        np.testing.assert_array_equal(npz["in:x"], arrays["in:x"])
