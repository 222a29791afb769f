"""Hardware profiles: one TOML file per edge device class, and the loader that validates them.

Imports nothing of ours and only the standard library, so the agent can load it cheaply on
small devices.
"""

from __future__ import annotations

from hardware_profiles.errors import ProfileError, ProfileFormatError, UnknownProfileError
from hardware_profiles.loader import (
    EXECUTION_PROVIDERS,
    PROFILE_PATH_ENV,
    TFLITE_DELEGATES,
    list_profiles,
    load_all,
    load_profile,
    parse_profile,
    search_path,
)
from hardware_profiles.profile import (
    BACKENDS,
    CPU_ARCHES,
    PRECISIONS,
    QUANT_TYPES,
    AccuracySpec,
    Backend,
    CpuArch,
    HardwareProfile,
    LimitsSpec,
    Precision,
    PrecisionSpec,
    QuantType,
    RuntimeSpec,
    TensorRTSpec,
)

__all__ = [
    "BACKENDS",
    "CPU_ARCHES",
    "EXECUTION_PROVIDERS",
    "PRECISIONS",
    "PROFILE_PATH_ENV",
    "QUANT_TYPES",
    "TFLITE_DELEGATES",
    "AccuracySpec",
    "Backend",
    "CpuArch",
    "HardwareProfile",
    "LimitsSpec",
    "Precision",
    "PrecisionSpec",
    "ProfileError",
    "ProfileFormatError",
    "QuantType",
    "RuntimeSpec",
    "TensorRTSpec",
    "UnknownProfileError",
    "list_profiles",
    "load_all",
    "load_profile",
    "parse_profile",
    "search_path",
]
