"""The hardware_profiles exception tree: one root, a shallow tree, messages that say what to do."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "ProfileError",
    "ProfileFormatError",
    "UnknownProfileError",
]


class ProfileError(Exception):
    """Root of every error raised by hardware_profiles/."""

    #: A stable, machine-readable reason code (agents report it to the fleet).
    code: str = "profile_error"


class UnknownProfileError(ProfileError):
    """No profile of that name is on the search path, or the given profile file does not exist."""

    code = "unknown_profile"

    def __init__(self, message: str, *, name: str, available: Sequence[str]) -> None:
        self.name = name
        #: Names of the profiles that were found, so callers can offer them.
        self.available = tuple(available)
        super().__init__(message)


class ProfileFormatError(ProfileError):
    """A profile file is not valid TOML, or its content breaks the profile schema."""

    code = "bad_profile"

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        self.source = source
        #: Dotted key path inside the file (e.g. "runtime.backend"); None for file-level problems.
        self.key = key
        self.problem = problem
        where = f"{source}: key {key!r}" if key else source
        super().__init__(f"{where}: {problem}")
