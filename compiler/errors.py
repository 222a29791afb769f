"""The compiler's exception tree: one root, a shallow tree, messages that say what to do."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from protocol.manifest import VerificationReport

__all__ = [
    "CompileError",
    "DatasetError",
    "GateRefusedError",
    "ModelError",
    "OutputPathError",
    "PrecisionError",
    "ProfileNotFoundError",
    "SigningKeyError",
    "TargetUnavailableError",
    "UnsupportedOpError",
]


class CompileError(Exception):
    """Root of every error raised by compiler/."""

    #: A stable, machine-readable reason code (printed by `--json`).
    code: str = "compile_error"


class ModelError(CompileError):
    """The source model cannot be read, checked or run (not ONNX, truncated, opset, data)."""

    code = "bad_model"


class UnsupportedOpError(ModelError):
    """The model holds operators the target runtime cannot run."""

    code = "unsupported_op"


class DatasetError(CompileError):
    """Calibration or held-out data is missing, empty, mis-shaped, mistyped or not finite."""

    code = "bad_dataset"


class ProfileNotFoundError(CompileError):
    """No hardware profile of that name or path."""

    code = "unknown_profile"


class PrecisionError(CompileError):
    """The requested precision is not one the profile allows."""

    code = "bad_precision"


class TargetUnavailableError(CompileError):
    """The profile's backend has no converter in this compiler yet."""

    code = "target_unavailable"


class SigningKeyError(CompileError):
    """The release key file is missing, unreadable or needs a passphrase."""

    code = "bad_key"


class OutputPathError(CompileError):
    """The output directory cannot be created or written."""

    code = "bad_output"


class GateRefusedError(CompileError):
    """The artifact is outside the accuracy budget; no bundle was written."""

    code = "gate_refused"

    def __init__(self, message: str, *, report: VerificationReport) -> None:
        super().__init__(message)
        #: The verification figures that failed the gate.
        self.report = report
