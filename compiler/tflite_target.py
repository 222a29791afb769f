"""Placeholder for the TFLite target (Raspberry Pi profiles) until its converter lands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compiler.errors import TargetUnavailableError

if TYPE_CHECKING:
    from compiler.target import BuildRequest, BuiltArtifact, Runner
    from hardware_profiles import HardwareProfile

__all__ = ["TfliteTarget"]


class TfliteTarget:
    """Refuses clearly; the real converter replaces this via `register_target("tflite", ...)`."""

    backend = "tflite"

    def check(self, profile: HardwareProfile) -> None:
        raise TargetUnavailableError(
            f"TFLite conversion is not available yet: profile {profile.name} runs "
            f"TFLite/LiteRT and this compiler has no ONNX->TFLite converter yet. Compile for an "
            f"ONNX Runtime profile (x86-cpu, x86-cuda, jetson-orin-nano) meanwhile."
        )

    def build(self, request: BuildRequest) -> BuiltArtifact:
        self.check(request.profile)
        raise AssertionError("unreachable")

    def runner(self, artifact: BuiltArtifact, *, threads: int, optimized: bool = True) -> Runner:
        raise TargetUnavailableError("TFLite artifacts cannot be run yet")
