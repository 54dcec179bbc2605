"""gateway-telemetry query service: newline-delimited JSON over TLS, and its client."""
