"""The on-device agent: installs signed bundles, serves inference, reports telemetry.

Imports only protocol/, hardware_profiles/, the standard library, numpy, paho-mqtt, tenacity
and (lazily) the inference runtimes, so it installs on small devices without the fleet's or
the compiler's dependencies.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
