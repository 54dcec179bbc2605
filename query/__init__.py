"""gateway-telemetry query service: newline-delimited JSON over TLS, and its client."""

__version__ = "0.1.0"
