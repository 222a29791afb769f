"""EdgeFleet: the one command-line entry point and the end-to-end demo.

The five parts live in their own top-level packages (protocol, hardware_profiles, compiler,
agent, fleet); this package only ties them together for the user.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgefleet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
