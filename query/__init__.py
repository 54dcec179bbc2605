"""gateway-telemetry query service: newline-delimited JSON over TLS, and its client."""

import collector


def __getattr__(name: str) -> str:
    if name == "__version__":  # collector's, read when first asked for
        return collector.__version__
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["__version__"]
