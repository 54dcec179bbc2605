"""gateway-telemetry collector: UDP in, sequence accounts, SQLite out.

The modules here that the other programs import are the contract between
them (see README, Layout): wire (the datagram format), auth (signed
datagrams), schema and ingestlog (the database), config, errors and
sdnotify.  query/ and sensor_sim/ import collector; collector imports
neither.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gateway-telemetry")  # stated once, in pyproject.toml
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
