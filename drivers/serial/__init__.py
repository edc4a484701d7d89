"""Serial sensors that are not Modbus — ASCII lines, NMEA 0183 GPS, weighing scales, binary
frames and code readers — described by profiles (``protocol: serial``), and the poller that owns
one serial port. Modules, each using only the ones above it:

* :mod:`.profile` — **profile and device models** (``ProfileModel``, ``DeviceModel``): what a
  technician writes. A profile has a ``format:`` (``lines``, ``nmea``, ``scale``, ``binary``,
  ``codes``); keys that do not apply to its format are errors at that key.
* :mod:`.framing` — **checksums** (``CHECKSUMS``) for binary frames (CRC-16/MODBUS and byte
  orders are :mod:`drivers.wire`'s, shared with the Modbus drivers) and **framers**
  (``TextFramer``, ``BinaryFramer``): bytes as they arrive -> complete frames, in a bounded
  buffer. Garbage, overlong lines, truncated frames (a partial frame older than ``frame_gap``
  when new bytes arrive) and bad binary checksums come out as ``FrameError`` values, never
  raised, and never merge into the next frame.
* :mod:`.parsers` — **parsers** (``parse_lines``, ``parse_nmea``, ``parse_scale``,
  ``parse_binary``, ``parse_codes``): one frame -> fields; they raise ``FrameError`` and nothing
  else, whatever the bytes. The **decoder** (``make_decoder``): framer + parser for a profile;
  ``feed(bytes, now)`` never raises.
* :mod:`.poller` — the **poller** (``SerialSensorPoller``), one per port, and the driver entry
  points (``PROTOCOLS = {"serial"}``): the port is opened with pyserial in non-blocking mode and
  its file descriptor is watched by the event loop (``add_reader``): no threads.
"""
