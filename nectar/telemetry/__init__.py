"""What the core and the backends exchange: the telemetry window and backend protocol, the one window-
energy choice both backends use, the chunk workload record, and the backend-neutral trace format."""
