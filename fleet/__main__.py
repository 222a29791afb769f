"""``python -m fleet serve ...``: the same commands as ``edgefleet fleet ...``."""

from fleet.cli import app

app(prog_name="python -m fleet")
