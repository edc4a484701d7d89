"""Modbus: one register-map profile model and one poll loop, over every transport.

* :mod:`.profile` — the register-map model a technician writes (``protocol: modbus`` profiles),
  points resolved to kind, 0-based address and width;
* :mod:`.codec` — registers/bits <-> values, and the PDU/MBAP coding of a read transaction;
* :mod:`.planner` — a device's points -> the fewest read requests;
* :mod:`.errors` — the failures of a transaction, by kind;
* :mod:`.client` — the transport contract of the poller and the Modbus TCP client;
* :mod:`.poller` — one poller per connection, every unit id behind it;
* the drivers (each declares ``PROTOCOLS``): :mod:`.tcp` (``modbus_tcp``), :mod:`.rtu`
  (``modbus_rtu``, a serial port), :mod:`.rtu_tcp` (``modbus_rtu_tcp``, a serial device server),
  :mod:`.dtu` (``modbus_rtu_dtu``, cellular DTUs that dial in); the RTU master they share is
  :mod:`.rtu_client`, the DTU listener and its links :mod:`.dtu_link`.
"""
