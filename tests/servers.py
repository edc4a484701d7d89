"""Fixtures that start real servers (Mosquitto, ...) on free loopback ports. Filled in per area."""
