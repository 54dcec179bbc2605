"""sensor-sim: simulated sensors speaking wire format v1, with fault injection and ground truth."""

from collector import __version__
from collector.errors import ConfigError, EncodeError  # what Sensor raises

from .api import DEFAULT_UDP_PORT, Sensor

__all__ = ["DEFAULT_UDP_PORT", "ConfigError", "EncodeError", "Sensor", "__version__"]
