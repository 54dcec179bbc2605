"""gateway-telemetry query service: newline-delimited JSON over TLS, and its client."""

from collector import __version__

__all__ = ["__version__"]
