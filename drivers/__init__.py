"""Protocol drivers: one module per protocol. A driver reads devices and emits Readings; it never sees sinks."""
