"""sensor-sim: simulated sensors speaking wire format v1, with fault injection and ground truth."""
