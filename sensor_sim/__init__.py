"""sensor-sim: simulated sensors speaking wire format v1, with fault injection and ground truth."""

import collector
from collector.errors import ConfigError, EncodeError  # what Sensor raises

from .api import DEFAULT_UDP_PORT, Sensor


def __getattr__(name: str) -> str:
    if name == "__version__":  # collector's, read when first asked for
        return collector.__version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_UDP_PORT", "ConfigError", "EncodeError", "Sensor", "__version__"]
