"""gateway-telemetry collector: UDP in, sequence accounts, SQLite out.

The modules here that the other programs import are the contract between
them (see README, Layout): wire (the datagram format), auth (signed
datagrams), schema and ingestlog (the database), config, errors and
sdnotify.  query/ and sensor_sim/ import collector; collector imports
neither.
"""

PACKAGE = "gateway-telemetry"  # the distribution: its version is stated once, in pyproject.toml


def __getattr__(name: str) -> str:
    """`__version__`, read from the installed metadata when first asked for: importing
    importlib.metadata costs ~50 ms of CPU, which a command's start need not pay
    (the CLIs' `--version` asks click, which reads it only then)."""
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version(PACKAGE)
    except PackageNotFoundError:  # run from a source tree that was never installed
        found = "0+unknown"
    globals()["__version__"] = found
    return found
