"""ONNX -> TFLite int8 / fp16 / fp32 converter writing LiteRT's flatbuffer schema directly.

- `qdq`: reads ONNX Runtime's calibration (scales, zero points) out of a QDQ model.
- `graph`: static shapes (batch fixed to 1, resizable), constant folding.
- `context`: per-tensor layout (NCHW-origin tensors stored NHWC) and type bookkeeping.
- `ops`: one handler per ONNX op type (`HANDLERS`).
- `flatbuffer`: the schema writer; `convert`: the driver; `runner`: LiteRT on this host.
"""

from __future__ import annotations

from compiler.tflite.convert import Conversion, IoType, check_supported, convert, load_check
from compiler.tflite.ops import HANDLERS
from compiler.tflite.runner import litert_runner

__all__ = [
    "HANDLERS",
    "Conversion",
    "IoType",
    "check_supported",
    "convert",
    "litert_runner",
    "load_check",
]
