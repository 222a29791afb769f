"""fp16 conversion of an ONNX model (inputs and outputs stay float32)."""

from __future__ import annotations

import warnings
from typing import Any

from compiler.errors import CompileError

__all__ = ["convert_to_fp16"]


def convert_to_fp16(model_bytes: bytes) -> tuple[bytes, list[str]]:
    """Convert weights and compute to fp16, keeping float32 I/O; returns (bytes, notes)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto: Any = onnx.load_model_from_string(model_bytes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # keep_io_types: the application and the golden file keep feeding float32.
            converted = convert_float_to_float16(proto, keep_io_types=True)
        except Exception as exc:
            raise CompileError(f"fp16 conversion failed: {exc}; use --precision fp32") from exc
    notes = sorted({f"fp16: {str(w.message).splitlines()[0][:200]}" for w in caught})
    return bytes(converted.SerializeToString()), notes
