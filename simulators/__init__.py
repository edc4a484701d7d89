"""Simulators of every device Sluice supports, driven by the same profiles as the gateway."""
