"""telemetry-query command line (placeholder until the query service lands)."""

import sys


def main() -> None:
    sys.stderr.write("telemetry-query: not built yet\n")
    sys.exit(2)
