"""telemetry-collector command line (placeholder until the collector lands)."""

import sys


def main() -> None:
    sys.stderr.write("telemetry-collector: not built yet\n")
    sys.exit(2)
