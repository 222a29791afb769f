"""The contract agent and fleet speak: wire messages, topics, bundles, signatures, sketches.

protocol/ imports nothing of ours. Import from the submodules (``protocol.messages``,
``protocol.bundle``, ...); this package root stays cheap to import.
"""

__all__: list[str] = []
