"""Sluice gateway core: configuration, outbox, forwarders, sinks and the CLI."""
