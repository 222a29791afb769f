"""Hard limits on untrusted input. Every length read from the wire is checked against one."""

from __future__ import annotations

from typing import Final

__all__ = [
    "MAX_BUNDLE_BYTES",
    "MAX_BUNDLE_FILES",
    "MAX_CHUNK_BYTES",
    "MAX_CHUNK_INDEXES",
    "MAX_DEVICE_ID_CHARS",
    "MAX_FEATURES",
    "MAX_MANIFEST_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_SIGNATURES",
    "MAX_SKETCH_BYTES",
    "MAX_TELEMETRY_BYTES",
    "MAX_TRUST_ROOT_BYTES",
]

MAX_DEVICE_ID_CHARS: Final = 64
#: Commands, status events, heartbeats and presence are small.
MAX_MESSAGE_BYTES: Final = 64 * 1024
#: A telemetry window carries up to MAX_FEATURES sketches of a few KB each.
MAX_TELEMETRY_BYTES: Final = 1024 * 1024
MAX_FEATURES: Final = 256
MAX_SKETCH_BYTES: Final = 32 * 1024
MAX_MANIFEST_BYTES: Final = 1024 * 1024
MAX_TRUST_ROOT_BYTES: Final = 256 * 1024
MAX_SIGNATURES: Final = 16
MAX_BUNDLE_FILES: Final = 64
MAX_BUNDLE_BYTES: Final = 2 * 1024 * 1024 * 1024
#: One bundle chunk's payload (the frame adds a small JSON header), and chunks per request.
MAX_CHUNK_BYTES: Final = 1024 * 1024
MAX_CHUNK_INDEXES: Final = 64
