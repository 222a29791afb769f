"""hardware_profiles: shipped profiles load, bad files fail with errors naming file and key."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hardware_profiles import (
    PROFILE_PATH_ENV,
    HardwareProfile,
    ProfileError,
    ProfileFormatError,
    UnknownProfileError,
    list_profiles,
    load_all,
    load_profile,
    parse_profile,
    search_path,
)

SHIPPED = ["jetson-orin-nano", "raspberry-pi-4", "raspberry-pi-5", "x86-cpu", "x86-cuda"]
PACKAGE_DIR = Path(__file__).resolve().parents[2] / "hardware_profiles"

# A minimal valid TFLite device; tests mutate it with exact-substring replacements.
VALID = """\
name = "test-board"
description = "A board that exists only in tests"
cpu_arch = "aarch64"

[runtime]
backend = "tflite"
delegates = ["XNNPACK"]
threads = 4

[precision]
supported = ["fp32", "int8"]
preferred = "int8"
activation_type = "int8"
weight_type = "int8"
per_channel = true
symmetric_activations = false

[limits]
memory_bytes = 1_000_000
max_model_bytes = 500_000
latency_budget_ms = 100.0

[accuracy]
max_top1_drop_points = 1.0
min_snr_db = 20.0
"""


@pytest.fixture(autouse=True)
def _no_user_profile_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's own EDGEFLEET_PROFILE_PATH must not leak into these tests.
    monkeypatch.delenv(PROFILE_PATH_ENV, raising=False)


def _mutate(text: str, *replacements: tuple[str, str]) -> str:
    for old, new in replacements:
        assert old in text, f"test bug: {old!r} not in base text"
        text = text.replace(old, new, 1)
    return text


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _shipped_text(name: str) -> str:
    return (PACKAGE_DIR / f"{name}.toml").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- shipped profiles


def test_shipped_profiles_are_listed() -> None:
    assert list_profiles() == SHIPPED


def test_all_shipped_profiles_load() -> None:
    profiles = load_all()
    assert list(profiles) == SHIPPED
    for name, profile in profiles.items():
        assert isinstance(profile, HardwareProfile)
        assert profile.name == name
        assert profile.source.endswith(f"{name}.toml")
        assert profile.allows(profile.precision.preferred)
        assert profile.limits.max_model_bytes <= profile.limits.memory_bytes


def test_jetson_uses_tensorrt_with_symmetric_int8() -> None:
    p = load_profile("jetson-orin-nano")
    assert p.cpu_arch == "aarch64"
    assert p.backend == p.runtime.backend == "tensorrt"
    assert p.runtime.execution_providers == (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    assert p.runtime.threads == 4
    assert p.precision.preferred == "int8"
    assert p.precision.activation_type == "int8"
    assert p.precision.symmetric_activations is True
    assert p.tensorrt is not None
    assert p.tensorrt.dla_core == -1
    assert not p.tensorrt.uses_dla


def test_x86_cpu_uses_u8s8() -> None:
    p = load_profile("x86-cpu")
    assert p.runtime.backend == "onnxruntime"
    assert p.runtime.execution_providers == ("CPUExecutionProvider",)
    assert p.runtime.threads == 2
    assert p.precision.activation_type == "uint8"
    assert p.precision.weight_type == "int8"
    assert p.tensorrt is None
    assert p.allows("int8")
    assert not p.allows("fp16")


def test_pis_use_tflite_delegates() -> None:
    for name in ("raspberry-pi-4", "raspberry-pi-5"):
        p = load_profile(name)
        assert p.runtime.backend == "tflite"
        assert p.runtime.execution_providers == ()
        assert p.runtime.delegates == ("XNNPACK",)
        assert p.runtime.threads == 4
    # Cortex-A72 has no fp16 arithmetic; Cortex-A76 does.
    assert not load_profile("raspberry-pi-4").allows("fp16")
    assert load_profile("raspberry-pi-5").allows("fp16")


def test_profiles_are_frozen() -> None:
    p = load_profile("x86-cuda")
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.name = "other"  # type: ignore[misc]


def test_load_by_path_equals_load_by_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "x86-cpu", _shipped_text("x86-cpu"))
    by_path = load_profile(str(path))
    assert by_path == load_profile("x86-cpu")
    assert by_path.source == str(path)
    assert load_profile(path) == by_path  # os.PathLike works too


def test_parse_profile_from_text() -> None:
    p = parse_profile(VALID, source="inline")
    assert p.name == "test-board"
    assert p.source == "inline"
    assert p.limits.latency_budget_ms == 100.0


def test_integers_are_accepted_for_float_fields(tmp_path: Path) -> None:
    text = _mutate(VALID, ("latency_budget_ms = 100.0", "latency_budget_ms = 100"))
    p = load_profile(str(_write(tmp_path, "test-board", text)))
    assert p.limits.latency_budget_ms == 100.0
    assert isinstance(p.limits.latency_budget_ms, float)


def test_import_is_cheap() -> None:
    # The agent imports this on small devices: no pydantic, no difflib until an error occurs.
    code = (
        "import sys, hardware_profiles; "
        "hardware_profiles.load_all(); "
        "bad = {'pydantic', 'difflib', 'numpy'} & set(sys.modules); "
        "assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_DIR.parent)}
    env.pop(PROFILE_PATH_ENV, None)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --------------------------------------------------------------------------- unknown profiles


def test_unknown_name_lists_available_profiles() -> None:
    with pytest.raises(UnknownProfileError) as info:
        load_profile("raspberry-pi-3")
    message = str(info.value)
    assert "'raspberry-pi-3'" in message
    for name in SHIPPED:
        assert name in message
    assert PROFILE_PATH_ENV in message
    assert info.value.available == tuple(SHIPPED)
    assert isinstance(info.value, ProfileError)


def test_missing_file_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(UnknownProfileError) as info:
        load_profile(str(missing))
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)


# --------------------------------------------------------------------------- bad files

BAD_CASES = [
    pytest.param(
        VALID + "[oops\n",
        None,
        "not valid TOML",
        id="toml-syntax",
    ),
    pytest.param(
        _mutate(VALID, ("description =", "descripton =")),
        "descripton",
        "did you mean 'description'",
        id="unknown-top-key",
    ),
    pytest.param(
        _mutate(VALID, ("threads = 4", "threads = 4\nthread_count = 2")),
        "runtime.thread_count",
        "unknown key",
        id="unknown-nested-key",
    ),
    pytest.param(
        _mutate(VALID, ('backend = "tflite"', 'backnd = "tflite"')),
        "runtime.backnd",
        "did you mean 'backend'",
        id="typo-wins-over-missing",
    ),
    pytest.param(
        _mutate(VALID, ("threads = 4\n", "")),
        "runtime.threads",
        "missing required key",
        id="missing-field",
    ),
    pytest.param(
        VALID.split("[accuracy]")[0],
        "accuracy",
        "missing required key",
        id="missing-table",
    ),
    pytest.param(
        _mutate(VALID, ("threads = 4", 'threads = "4"')),
        "runtime.threads",
        "expected an integer, got a string",
        id="wrong-type-int",
    ),
    pytest.param(
        _mutate(VALID, ("threads = 4", "threads = true")),
        "runtime.threads",
        "expected an integer, got a boolean",
        id="bool-is-not-int",
    ),
    pytest.param(
        _mutate(VALID, ("per_channel = true", "per_channel = 1")),
        "precision.per_channel",
        "expected true or false",
        id="wrong-type-bool",
    ),
    pytest.param(
        _mutate(VALID, ('supported = ["fp32", "int8"]', 'supported = "int8"')),
        "precision.supported",
        "expected an array",
        id="wrong-type-list",
    ),
    pytest.param(
        _mutate(VALID, ("memory_bytes = 1_000_000", "memory_bytes = 1.5e6")),
        "limits.memory_bytes",
        "expected an integer, got a float",
        id="wrong-type-float-for-int",
    ),
    pytest.param(
        "accuracy = 3\n" + VALID.split("[accuracy]")[0],
        "accuracy",
        "expected a [accuracy] table, got an integer",
        id="table-expected",
    ),
    pytest.param(
        _mutate(VALID, ('backend = "tflite"', 'backend = "tflit"')),
        "runtime.backend",
        "'tflit' is not one of 'onnxruntime', 'tensorrt', 'tflite'",
        id="bad-enum-backend",
    ),
    pytest.param(
        _mutate(VALID, ('cpu_arch = "aarch64"', 'cpu_arch = "arm64"')),
        "cpu_arch",
        "'arm64' is not one of 'aarch64', 'x86_64'",
        id="bad-enum-arch",
    ),
    pytest.param(
        _mutate(VALID, ('supported = ["fp32", "int8"]', 'supported = ["fp32", "bf16"]')),
        "precision.supported",
        "'bf16' is not one of 'fp16', 'fp32', 'int8'",
        id="bad-enum-in-list",
    ),
    pytest.param(
        _mutate(VALID, ('supported = ["fp32", "int8"]', 'supported = ["int8", "int8"]')),
        "precision.supported",
        "listed twice",
        id="duplicate-in-list",
    ),
    pytest.param(
        _mutate(VALID, ('supported = ["fp32", "int8"]', "supported = []")),
        "precision.supported",
        "at least one",
        id="empty-supported",
    ),
    pytest.param(
        _mutate(VALID, ('preferred = "int8"', 'preferred = "fp16"')),
        "precision.preferred",
        "'fp16' is not in precision.supported",
        id="preferred-not-supported",
    ),
    pytest.param(
        _mutate(VALID, ("memory_bytes = 1_000_000", "memory_bytes = 0")),
        "limits.memory_bytes",
        "must be a positive integer",
        id="zero-memory",
    ),
    pytest.param(
        _mutate(VALID, ("max_model_bytes = 500_000", "max_model_bytes = -1")),
        "limits.max_model_bytes",
        "must be a positive integer",
        id="negative-model-size",
    ),
    pytest.param(
        _mutate(VALID, ("latency_budget_ms = 100.0", "latency_budget_ms = 0.0")),
        "limits.latency_budget_ms",
        "must be > 0",
        id="zero-latency",
    ),
    pytest.param(
        _mutate(VALID, ("latency_budget_ms = 100.0", "latency_budget_ms = inf")),
        "limits.latency_budget_ms",
        "not a finite number",
        id="infinite-latency",
    ),
    pytest.param(
        _mutate(VALID, ("threads = 4", "threads = 0")),
        "runtime.threads",
        "must be a positive integer",
        id="zero-threads",
    ),
    pytest.param(
        _mutate(VALID, ("max_model_bytes = 500_000", "max_model_bytes = 2_000_000")),
        "limits.max_model_bytes",
        "larger than limits.memory_bytes",
        id="model-bigger-than-memory",
    ),
    pytest.param(
        _mutate(VALID, ("max_top1_drop_points = 1.0", "max_top1_drop_points = -0.5")),
        "accuracy.max_top1_drop_points",
        "must be >= 0",
        id="negative-accuracy-drop",
    ),
    pytest.param(
        _mutate(
            VALID, ('delegates = ["XNNPACK"]', 'execution_providers = ["CPUExecutionProvider"]')
        ),
        "runtime.execution_providers",
        "backend 'tflite'",
        id="tflite-with-ort-providers",
    ),
    pytest.param(
        _mutate(
            VALID,
            ('backend = "tflite"', 'backend = "onnxruntime"'),
            (
                'delegates = ["XNNPACK"]',
                'execution_providers = ["CPUExecutionProvider"]\ndelegates = ["XNNPACK"]',
            ),
        ),
        "runtime.delegates",
        "delegates are TFLite-only",
        id="onnxruntime-with-delegates",
    ),
    pytest.param(
        _mutate(
            VALID,
            ('backend = "tflite"', 'backend = "onnxruntime"'),
            ('delegates = ["XNNPACK"]\n', ""),
        ),
        "runtime.execution_providers",
        "needs at least one",
        id="onnxruntime-without-providers",
    ),
    pytest.param(
        _mutate(
            VALID,
            ('backend = "tflite"', 'backend = "onnxruntime"'),
            ('delegates = ["XNNPACK"]', 'execution_providers = ["CudaExecutionProvider"]'),
        ),
        "runtime.execution_providers",
        "did you mean 'CUDAExecutionProvider'",
        id="provider-typo",
    ),
    pytest.param(
        _mutate(VALID, ('delegates = ["XNNPACK"]', 'delegates = ["xnnpack"]')),
        "runtime.delegates",
        "did you mean 'XNNPACK'",
        id="delegate-typo",
    ),
    pytest.param(
        _mutate(VALID, ('activation_type = "int8"', 'activation_type = "uint8"')),
        "precision.activation_type",
        "TFLite int8 quantization spec",
        id="tflite-uint8",
    ),
    pytest.param(
        VALID
        + "\n[tensorrt]\nworkspace_bytes = 1\ndla_core = -1\nbuilder_optimization_level = 3\n",
        "tensorrt",
        "only read when runtime.backend = 'tensorrt'",
        id="tensorrt-table-on-tflite",
    ),
]


@pytest.mark.parametrize(("text", "key", "fragment"), BAD_CASES)
def test_bad_profile_names_file_key_and_problem(
    tmp_path: Path, text: str, key: str | None, fragment: str
) -> None:
    path = _write(tmp_path, "test-board", text)
    with pytest.raises(ProfileFormatError) as info:
        load_profile(str(path))
    error = info.value
    message = str(error)
    assert str(path) in message
    assert error.source == str(path)
    assert error.key == key
    if key is not None:
        assert repr(key) in message
    assert fragment in message
    assert isinstance(error, ProfileError)


def _jetson(*replacements: tuple[str, str]) -> str:
    return _mutate(_shipped_text("jetson-orin-nano"), *replacements)


JETSON_CASES = [
    pytest.param(
        _jetson(
            ('    "TensorrtExecutionProvider",\n', ""),
        ),
        "runtime.execution_providers",
        "needs 'TensorrtExecutionProvider' first",
        id="tensorrt-backend-without-trt-ep-first",
    ),
    pytest.param(
        _jetson(("[tensorrt]", "[unused]")).split("[unused]")[0],
        "tensorrt",
        "needs a [tensorrt] table",
        id="tensorrt-backend-without-table",
    ),
    pytest.param(
        _jetson(("builder_optimization_level = 3", "builder_optimization_level = 7")),
        "tensorrt.builder_optimization_level",
        "0..5",
        id="trt-opt-level-range",
    ),
    pytest.param(
        _jetson(("dla_core = -1", "dla_core = -2")),
        "tensorrt.dla_core",
        ">= -1",
        id="dla-core-range",
    ),
    pytest.param(
        _jetson(("symmetric_activations = true", "symmetric_activations = false")),
        "precision.symmetric_activations",
        "TensorRT only accepts symmetric int8",
        id="trt-asymmetric",
    ),
    pytest.param(
        _jetson(('activation_type = "int8"', 'activation_type = "uint8"')),
        "precision.activation_type",
        "TensorRT only accepts symmetric int8",
        id="trt-uint8",
    ),
    pytest.param(
        _jetson(("workspace_bytes = 1_073_741_824", "workspace_bytes = 8_589_934_592")),
        "tensorrt.workspace_bytes",
        "larger than limits.memory_bytes",
        id="trt-workspace-too-big",
    ),
]


@pytest.mark.parametrize(("text", "key", "fragment"), JETSON_CASES)
def test_bad_tensorrt_profile(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = _write(tmp_path, "jetson-orin-nano", text)
    with pytest.raises(ProfileFormatError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message
    assert info.value.key == key
    assert repr(key) in message
    assert fragment in message


def test_trt_ep_on_onnxruntime_backend_needs_symmetric_int8(tmp_path: Path) -> None:
    text = _mutate(
        _shipped_text("x86-cuda"), ("symmetric_activations = true", "symmetric_activations = false")
    )
    path = _write(tmp_path, "x86-cuda", text)
    with pytest.raises(ProfileFormatError, match="TensorRT only accepts symmetric int8") as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_file_name_must_match_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "other-board", VALID)
    with pytest.raises(ProfileFormatError) as info:
        load_profile(str(path))
    message = str(info.value)
    assert str(path) in message
    assert info.value.key == "name"
    assert "'test-board' does not match the file name 'other-board.toml'" in message


def test_invalid_profile_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "Test_Board", _mutate(VALID, ('"test-board"', '"Test_Board"')))
    with pytest.raises(ProfileFormatError, match="not a valid profile name") as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "test-board.toml"
    path.write_bytes(VALID.encode("utf-8").replace(b"A board", b"A \xff board"))
    with pytest.raises(ProfileFormatError, match="not UTF-8") as info:
        load_profile(str(path))
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- EDGEFLEET_PROFILE_PATH


def test_profile_path_adds_a_device_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = tmp_path / "profiles"
    extra.mkdir()
    _write(extra, "test-board", VALID)
    with pytest.raises(UnknownProfileError):
        load_profile("test-board")

    missing = tmp_path / "not-there"
    monkeypatch.setenv(PROFILE_PATH_ENV, f"{missing}{os.pathsep}{os.pathsep}{extra}")

    assert "test-board" in list_profiles()
    profile = load_profile("test-board")
    assert profile.name == "test-board"
    assert profile.source == str(extra / "test-board.toml")
    assert set(load_all()) == {*SHIPPED, "test-board"}
    assert str(extra) in [str(d) for d in search_path()]


def test_profile_path_lookup_error_lists_searched_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "not-there"
    monkeypatch.setenv(PROFILE_PATH_ENV, str(missing))
    with pytest.raises(UnknownProfileError) as info:
        load_profile("test-board")
    assert f"{missing} (missing)" in str(info.value)


def test_profile_path_shadows_shipped_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like PATH: earlier directories win, so a site can tune a shipped device class.
    text = _mutate(_shipped_text("x86-cpu"), ("threads = 2", "threads = 8"))
    _write(tmp_path, "x86-cpu", text)
    monkeypatch.setenv(PROFILE_PATH_ENV, str(tmp_path))
    assert load_profile("x86-cpu").runtime.threads == 8
    assert list_profiles() == SHIPPED


def test_bad_file_on_profile_path_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path, "test-board", _mutate(VALID, ("threads = 4", "threads = -1")))
    monkeypatch.setenv(PROFILE_PATH_ENV, str(tmp_path))
    with pytest.raises(ProfileFormatError) as info:
        load_all()
    assert str(path) in str(info.value)
    assert "runtime.threads" in str(info.value)
