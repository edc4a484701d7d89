"""Traceability feed: lots bound to locations, EPCIS 2.0 sensor events, hash-chained and signed."""
