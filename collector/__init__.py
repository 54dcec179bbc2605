"""gateway-telemetry collector: UDP in, sequence accounts, SQLite out."""

__version__ = "0.1.0"
