"""sensor-sim: simulated sensors speaking wire format v1, with fault injection and ground truth."""

__version__ = "0.1.0"

from .api import DEFAULT_UDP_PORT, Sensor  # noqa: E402  (after __version__, which cli imports)

__all__ = ["DEFAULT_UDP_PORT", "Sensor", "__version__"]
