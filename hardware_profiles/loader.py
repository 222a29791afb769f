"""Finding, reading and validating profile TOML files.

Profiles are looked up by name in the directories of `EDGEFLEET_PROFILE_PATH` (colon-separated,
searched first, in order, like PATH) and then among the TOMLs shipped inside this package; the
first `<name>.toml` found wins. A new device class is therefore a new file, not new code.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Collection, Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final, NoReturn, TypeVar

from hardware_profiles.errors import ProfileError, ProfileFormatError, UnknownProfileError
from hardware_profiles.profile import (
    BACKENDS,
    CPU_ARCHES,
    PRECISIONS,
    QUANT_TYPES,
    AccuracySpec,
    HardwareProfile,
    LimitsSpec,
    PrecisionSpec,
    RuntimeSpec,
    TensorRTSpec,
)

__all__ = [
    "EXECUTION_PROVIDERS",
    "PROFILE_PATH_ENV",
    "TFLITE_DELEGATES",
    "list_profiles",
    "load_all",
    "load_profile",
    "parse_profile",
    "search_path",
]

PROFILE_PATH_ENV: Final = "EDGEFLEET_PROFILE_PATH"

#: ONNX Runtime execution provider names, spelled as `onnxruntime.get_available_providers()`
#: spells them. Checked so a typo fails here instead of ORT silently falling back to CPU.
EXECUTION_PROVIDERS: Final[frozenset[str]] = frozenset(
    {
        "ACLExecutionProvider",
        "ArmNNExecutionProvider",
        "CANNExecutionProvider",
        "CPUExecutionProvider",
        "CUDAExecutionProvider",
        "CoreMLExecutionProvider",
        "DmlExecutionProvider",
        "DnnlExecutionProvider",
        "MIGraphXExecutionProvider",
        "NnapiExecutionProvider",
        "OpenVINOExecutionProvider",
        "QNNExecutionProvider",
        "ROCMExecutionProvider",
        "RknpuExecutionProvider",
        "TensorrtExecutionProvider",
        "VitisAIExecutionProvider",
        "XnnpackExecutionProvider",
    }
)

#: TFLite / LiteRT delegates the agent knows how to attach.
TFLITE_DELEGATES: Final[frozenset[str]] = frozenset(
    {"XNNPACK", "GPU", "NNAPI", "EdgeTPU", "Hexagon"}
)

_TRT_EP: Final = "TensorrtExecutionProvider"
_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]*")
_TRT_MAX_OPT_LEVEL: Final = 5

_E = TypeVar("_E", bound=str)


# --------------------------------------------------------------------------- public API


def search_path() -> list[Traversable]:
    """Directories searched for `<name>.toml`, in order: EDGEFLEET_PROFILE_PATH, then shipped."""
    dirs: list[Traversable] = [
        Path(entry) for entry in os.environ.get(PROFILE_PATH_ENV, "").split(os.pathsep) if entry
    ]
    dirs.append(resources.files(__package__ or "hardware_profiles"))
    return dirs


def list_profiles() -> list[str]:
    """Names of every profile on the search path, sorted."""
    return sorted({name for name, _ in _profile_files()})


def load_profile(name_or_path: str | os.PathLike[str]) -> HardwareProfile:
    """Load a profile by name (from the search path) or from a path to a `.toml` file."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path)
        if not path.is_file():
            raise UnknownProfileError(
                f"hardware profile file {str(path)!r} does not exist; available profiles by "
                f"name: {_available_text()}",
                name=str(path),
                available=list_profiles(),
            )
        return _load_file(path, expected_name=path.stem)

    name = str(name_or_path)
    for found_name, file in _profile_files():
        if found_name == name:
            return _load_file(file, expected_name=name)
    searched = ", ".join(_describe_dir(d) for d in search_path())
    raise UnknownProfileError(
        f"unknown hardware profile {name!r}; available profiles: {_available_text()} "
        f"(searched: {searched}). To add a device class, put a {name}.toml in a directory "
        f"listed in {PROFILE_PATH_ENV}.",
        name=name,
        available=list_profiles(),
    )


def load_all() -> dict[str, HardwareProfile]:
    """Load and validate every profile on the search path, keyed by name (sorted)."""
    return {name: load_profile(name) for name in list_profiles()}


def parse_profile(
    text: str, *, source: str = "<string>", expected_name: str | None = None
) -> HardwareProfile:
    """Parse and validate one profile's TOML text; `source` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileFormatError(source, None, f"not valid TOML: {exc}") from exc
    return _build(_Table(data, source, "", _TOP_KEYS), expected_name)


# --------------------------------------------------------------------------- finding files


def _looks_like_path(name_or_path: str | os.PathLike[str]) -> bool:
    if not isinstance(name_or_path, str):
        return True
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return name_or_path.endswith(".toml") or any(sep in name_or_path for sep in seps)


def _profile_files() -> Iterator[tuple[str, Traversable]]:
    """(name, file) for every `*.toml` on the search path; earlier directories shadow later."""
    seen: set[str] = set()
    for directory in search_path():
        if not directory.is_dir():
            continue  # like PATH: a missing entry is skipped (the lookup error lists it)
        for entry in sorted(directory.iterdir(), key=lambda e: e.name):
            if not entry.name.endswith(".toml") or not entry.is_file():
                continue
            name = entry.name.removesuffix(".toml")
            if name not in seen:
                seen.add(name)
                yield name, entry


def _describe_dir(directory: Traversable) -> str:
    return str(directory) if directory.is_dir() else f"{directory} (missing)"


def _available_text() -> str:
    return ", ".join(list_profiles()) or "(none)"


def _load_file(file: Traversable, *, expected_name: str) -> HardwareProfile:
    source = str(file)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ProfileError(f"{source}: cannot read profile file: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProfileFormatError(source, None, f"not UTF-8 text: {exc}") from exc
    return parse_profile(text, source=source, expected_name=expected_name)


# --------------------------------------------------------------------------- schema


_TOP_KEYS: Final = (
    "name",
    "description",
    "cpu_arch",
    "runtime",
    "precision",
    "limits",
    "accuracy",
    "tensorrt",
)
_RUNTIME_KEYS: Final = ("backend", "execution_providers", "delegates", "threads")
_PRECISION_KEYS: Final = (
    "supported",
    "preferred",
    "activation_type",
    "weight_type",
    "per_channel",
    "symmetric_activations",
)
_LIMITS_KEYS: Final = ("memory_bytes", "max_model_bytes", "latency_budget_ms")
_ACCURACY_KEYS: Final = ("max_top1_drop_points", "min_snr_db")
_TENSORRT_KEYS: Final = ("workspace_bytes", "dla_core", "builder_optimization_level")


def _build(top: _Table, expected_name: str | None) -> HardwareProfile:
    name = top.string("name")
    if not _NAME_RE.fullmatch(name):
        top.fail("name", f"{name!r} is not a valid profile name; use lowercase a-z, 0-9 and '-'")
    if expected_name is not None and name != expected_name:
        top.fail(
            "name",
            f"{name!r} does not match the file name {expected_name + '.toml'!r}; "
            f"rename the file to {name + '.toml'!r} or set name = {expected_name!r}",
        )
    description = top.string("description")
    cpu_arch = top.enum("cpu_arch", CPU_ARCHES)

    runtime = _build_runtime(top.table("runtime", _RUNTIME_KEYS))
    limits = _build_limits(top.table("limits", _LIMITS_KEYS))
    precision = _build_precision(top.table("precision", _PRECISION_KEYS), runtime)
    accuracy = _build_accuracy(top.table("accuracy", _ACCURACY_KEYS))

    trt_table = top.optional_table("tensorrt", _TENSORRT_KEYS)
    tensorrt: TensorRTSpec | None = None
    if runtime.backend == "tensorrt":
        if trt_table is None:
            top.fail("tensorrt", "backend 'tensorrt' needs a [tensorrt] table; add one")
        tensorrt = _build_tensorrt(trt_table, limits)
    elif trt_table is not None:
        top.fail(
            "tensorrt",
            f"a [tensorrt] table is only read when runtime.backend = 'tensorrt' "
            f"(this profile's backend is {runtime.backend!r}); remove it",
        )

    return HardwareProfile(
        name=name,
        description=description,
        cpu_arch=cpu_arch,
        runtime=runtime,
        precision=precision,
        limits=limits,
        accuracy=accuracy,
        tensorrt=tensorrt,
        source=top.source,
    )


def _build_runtime(t: _Table) -> RuntimeSpec:
    backend = t.enum("backend", BACKENDS)
    providers = t.choice_list("execution_providers", EXECUTION_PROVIDERS, default=())
    delegates = t.choice_list("delegates", TFLITE_DELEGATES, default=())
    threads = t.integer("threads", minimum=1)

    if backend == "tflite":
        if providers:
            t.fail(
                "execution_providers",
                "backend 'tflite' runs a TFLite flatbuffer, which uses delegates, not ONNX "
                "Runtime execution providers; move them to delegates (e.g. ['XNNPACK']) or "
                "set backend = 'onnxruntime'",
            )
    else:
        if delegates:
            t.fail(
                "delegates",
                f"delegates are TFLite-only; backend {backend!r} runs ONNX Runtime, which uses "
                f"execution_providers; remove delegates or set backend = 'tflite'",
            )
        if not providers:
            t.fail(
                "execution_providers",
                f"backend {backend!r} needs at least one ONNX Runtime execution provider, "
                f"e.g. ['CPUExecutionProvider']",
            )
        if backend == "tensorrt" and providers[0] != _TRT_EP:
            t.fail(
                "execution_providers",
                f"backend 'tensorrt' needs {_TRT_EP!r} first (got {providers[0]!r}); "
                f"otherwise the TensorRT-ready artifact never reaches TensorRT",
            )
    return RuntimeSpec(
        backend=backend, execution_providers=providers, delegates=delegates, threads=threads
    )


def _build_precision(t: _Table, runtime: RuntimeSpec) -> PrecisionSpec:
    supported = t.choice_list("supported", PRECISIONS)
    if not supported:
        t.fail("supported", f"must list at least one of {_quoted(PRECISIONS)}")
    preferred = t.enum("preferred", PRECISIONS)
    if preferred not in supported:
        t.fail(
            "preferred",
            f"{preferred!r} is not in precision.supported {list(supported)}; "
            f"pick one of those or add it to supported",
        )
    activation_type = t.enum("activation_type", QUANT_TYPES)
    weight_type = t.enum("weight_type", QUANT_TYPES)
    per_channel = t.boolean("per_channel")
    symmetric_activations = t.boolean("symmetric_activations")

    if "int8" in supported:
        # TensorRT only consumes symmetric int8 Q/DQ (zero point 0) for weights and activations.
        if runtime.backend == "tensorrt" or _TRT_EP in runtime.execution_providers:
            why = "TensorRT only accepts symmetric int8 Q/DQ"
            if activation_type != "int8":
                t.fail("activation_type", f"must be 'int8' here: {why}")
            if weight_type != "int8":
                t.fail("weight_type", f"must be 'int8' here: {why}")
            if not symmetric_activations:
                t.fail("symmetric_activations", f"must be true here: {why}")
        # The TFLite int8 quantization spec is int8 throughout; uint8 is the legacy scheme.
        if runtime.backend == "tflite":
            why = "the TFLite int8 quantization spec uses int8 tensors"
            if activation_type != "int8":
                t.fail("activation_type", f"must be 'int8' for backend 'tflite': {why}")
            if weight_type != "int8":
                t.fail("weight_type", f"must be 'int8' for backend 'tflite': {why}")
    return PrecisionSpec(
        supported=supported,
        preferred=preferred,
        activation_type=activation_type,
        weight_type=weight_type,
        per_channel=per_channel,
        symmetric_activations=symmetric_activations,
    )


def _build_limits(t: _Table) -> LimitsSpec:
    memory_bytes = t.integer("memory_bytes", minimum=1)
    max_model_bytes = t.integer("max_model_bytes", minimum=1)
    latency_budget_ms = t.number("latency_budget_ms", positive=True)
    if max_model_bytes > memory_bytes:
        t.fail(
            "max_model_bytes",
            f"{max_model_bytes} is larger than limits.memory_bytes ({memory_bytes}); "
            f"a model that large could never be loaded",
        )
    return LimitsSpec(
        memory_bytes=memory_bytes,
        max_model_bytes=max_model_bytes,
        latency_budget_ms=latency_budget_ms,
    )


def _build_accuracy(t: _Table) -> AccuracySpec:
    max_drop = t.number("max_top1_drop_points", positive=False)
    if max_drop > 100:
        t.fail("max_top1_drop_points", f"{max_drop} is more than 100 percentage points")
    return AccuracySpec(
        max_top1_drop_points=max_drop,
        min_snr_db=t.number("min_snr_db", positive=True),
    )


def _build_tensorrt(t: _Table, limits: LimitsSpec) -> TensorRTSpec:
    workspace_bytes = t.integer("workspace_bytes", minimum=1)
    if workspace_bytes > limits.memory_bytes:
        t.fail(
            "workspace_bytes",
            f"{workspace_bytes} is larger than limits.memory_bytes ({limits.memory_bytes})",
        )
    dla_core = t.integer("dla_core", minimum=-1)
    level = t.integer("builder_optimization_level", minimum=0)
    if level > _TRT_MAX_OPT_LEVEL:
        t.fail("builder_optimization_level", f"{level} is out of range; TensorRT accepts 0..5")
    return TensorRTSpec(
        workspace_bytes=workspace_bytes, dla_core=dla_core, builder_optimization_level=level
    )


# --------------------------------------------------------------------------- typed reading


class _Table:
    """One TOML table being read: typed getters that blame the file and the dotted key."""

    __slots__ = ("_data", "_known", "_prefix", "source")

    def __init__(
        self, data: dict[str, object], source: str, prefix: str, known: Collection[str]
    ) -> None:
        self._data = data
        self._known = known
        self._prefix = prefix
        self.source = source
        # Unknown keys first: a typo'd key would otherwise surface as "missing <real key>".
        for key in data:
            if key not in known:
                self._unknown(key)

    def fail(self, key: str, problem: str) -> NoReturn:
        raise ProfileFormatError(self.source, self._prefix + key, problem)

    def _unknown(self, key: str) -> NoReturn:
        close = _suggest(key, self._known)
        hint = f"did you mean {close!r}? " if close else ""
        where = f"[{self._prefix.rstrip('.')}]" if self._prefix else "the top level"
        self.fail(key, f"unknown key; {hint}allowed keys in {where}: {_quoted(self._known)}")

    def _get(self, key: str) -> object:
        if key not in self._data:
            where = f"the [{self._prefix.rstrip('.')}] table" if self._prefix else "the file"
            self.fail(key, f"missing required key; add it to {where}")
        return self._data[key]

    def string(self, key: str) -> str:
        value = self._get(key)
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_describe(value)}")
        if not value.strip():
            self.fail(key, "must not be empty")
        return value

    def enum(self, key: str, allowed: tuple[_E, ...]) -> _E:
        value = self.string(key)
        return self._pick(key, value, allowed)

    def _pick(self, key: str, value: str, allowed: Collection[_E]) -> _E:
        for option in allowed:
            if option == value:
                return option
        close = _suggest(value, allowed)
        hint = f"; did you mean {close!r}?" if close else ""
        self.fail(key, f"{value!r} is not one of {_quoted(allowed)}{hint}")

    def choice_list(
        self, key: str, allowed: Collection[_E], default: tuple[_E, ...] | None = None
    ) -> tuple[_E, ...]:
        if default is not None and key not in self._data:
            return default
        value = self._get(key)
        if not isinstance(value, list):
            self.fail(key, f"expected an array of strings, got {_describe(value)}")
        picked: list[_E] = []
        for item in value:
            if not isinstance(item, str):
                self.fail(key, f"expected an array of strings, found {_describe(item)}")
            choice = self._pick(key, item, allowed)
            if choice in picked:
                self.fail(key, f"{choice!r} is listed twice")
            picked.append(choice)
        return tuple(picked)

    def integer(self, key: str, *, minimum: int) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_describe(value)}")
        if value < minimum:
            need = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.fail(key, f"{value} is out of range; must be {need}")
        return value

    def number(self, key: str, *, positive: bool) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number, got {_describe(value)}")
        number = float(value)
        if not math.isfinite(number):
            self.fail(key, f"{value} is not a finite number")
        if positive and number <= 0:
            self.fail(key, f"{value} is out of range; must be > 0")
        if not positive and number < 0:
            self.fail(key, f"{value} is out of range; must be >= 0")
        return number

    def boolean(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_describe(value)}")
        return value

    def table(self, key: str, known: Collection[str]) -> _Table:
        value = self._get(key)
        return self._as_table(key, value, known)

    def optional_table(self, key: str, known: Collection[str]) -> _Table | None:
        if key not in self._data:
            return None
        return self._as_table(key, self._data[key], known)

    def _as_table(self, key: str, value: object, known: Collection[str]) -> _Table:
        if not isinstance(value, dict):
            self.fail(key, f"expected a [{self._prefix}{key}] table, got {_describe(value)}")
        return _Table(value, self.source, f"{self._prefix}{key}.", known)


def _suggest(value: str, options: Collection[str]) -> str | None:
    """The option closest to `value`, ignoring case (provider names are easy to mis-case)."""
    import difflib  # only on the error path: keeps the agent's import cheap

    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(value.lower(), list(by_lower), n=1)
    return by_lower[close[0]] if close else None


def _describe(value: object) -> str:
    kind = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), "a date/time")
    return f"{kind} ({value!r})" if not isinstance(value, dict | list) else kind


def _quoted(options: Collection[str]) -> str:
    return ", ".join(repr(o) for o in sorted(options))
