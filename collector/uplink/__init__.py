"""telemetry-uplink: the collector's committed data to NATS JetStream, and back into a central database.

core.py is the pure part (subjects, message ids, payload codec, batching,
backoff, cursor format); source.py reads the gateway database read-only;
central.py writes the central database; broker.py, publisher.py and
consumer.py are the nats-py edge; cli.py is `telemetry-uplink`.
"""
