"""The protocol's exception tree: one root, a shallow tree, messages that say what to do."""

from __future__ import annotations

__all__ = [
    "BundleError",
    "BundleFormatError",
    "BundleIntegrityError",
    "ExpiredError",
    "KeyFileError",
    "MessageDecodeError",
    "MessageTooLargeError",
    "ProtocolError",
    "SignatureError",
    "SketchError",
    "TopicError",
    "TrustRootError",
    "WrongTargetError",
]


class ProtocolError(Exception):
    """Root of every error raised by protocol/."""

    #: A stable, machine-readable reason code (agents report it to the fleet).
    code: str = "protocol_error"


class TopicError(ProtocolError):
    code = "bad_topic"


class MessageDecodeError(ProtocolError):
    code = "bad_message"


class MessageTooLargeError(MessageDecodeError):
    code = "message_too_large"


class KeyFileError(ProtocolError):
    code = "bad_key_file"


class TrustRootError(ProtocolError):
    code = "bad_trust_root"


class SignatureError(ProtocolError):
    code = "bad_signature"


class BundleError(ProtocolError):
    code = "bad_bundle"


class BundleFormatError(BundleError):
    code = "bad_bundle_format"


class BundleIntegrityError(BundleError):
    code = "bad_bundle_hash"


class ExpiredError(BundleError):
    code = "bundle_expired"


class WrongTargetError(BundleError):
    code = "wrong_target"


class SketchError(ProtocolError):
    code = "bad_sketch"
