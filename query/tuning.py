"""The query service's limits and their defaults, each stated once with its unit.

`serve`'s settings (flags, TELEMETRY_QUERY_*, the [query] table) take their
defaults from here, and so do ServerLimits (query/server.py) and Limits
(query/ops.py), so the help, --check, the TOML reference and the code agree.
"""

MAX_CONNECTIONS = 1000  # open connections; more are closed at once
IDLE_TIMEOUT_S = 300.0  # seconds without a byte moving either way
HANDSHAKE_TIMEOUT_S = 10.0  # seconds from accept to a finished TLS handshake
# Seconds from the first byte of a request line to its newline.  The idle
# timeout alone lets a slowloris client hold a connection for ever by
# dripping one byte per idle period; a real client sends a line at once.
LINE_TIMEOUT_S = 30.0
MAX_OUTPUT_BYTES = 4 * 1024 * 1024  # queued response bytes before a client is no longer read
# Unsent response bytes of all connections together; past it the connection
# holding the most is closed (Redis' client-output-buffer-limit does the same).
# Without it 1,000 clients that pipeline and never read hold MAX_OUTPUT_BYTES
# plus one response each: gigabytes (issue 13.3; bench/query_memory.py).
OUTPUT_BUDGET_BYTES = 64 * 1024 * 1024
MAX_ROWS = 10_000  # rows in any one response (readings pages, lists)
MAX_BUCKETS = 10_000  # buckets one aggregate may span
QUERY_TIMEOUT_S = 2.0  # SQL budget of one request (it holds a worker that long)
WORKERS = 2  # threads running SQL, each with its own read-only connection
