"""The operator's web dashboard, served by the fleet under ``/ui`` (see `fleet.dashboard.app`).

Pages are rendered on the server (Jinja2, SVG charts from `fleet.dashboard.svg`) and keep
themselves current by polling their own URL for live regions (static/dashboard.js).
"""

from fleet.dashboard.app import create_dashboard, mount_dashboard

__all__ = ["create_dashboard", "mount_dashboard"]
