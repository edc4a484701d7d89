"""MQTT: the one layer (:mod:`gateway.mqtt.client`, paho-mqtt on the event loop) and the sink built
on it (:mod:`gateway.mqtt.sink`). The only package that imports paho-mqtt; ``sluice ingest`` and
the trace feed use it through here."""

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mqtt.client import Client, Message, NotConnected, Refused, Settings, Will, topic_matches
from gateway.mqtt.sink import MqttSink, SinkRefused, SinkUnavailable, watch

__all__ = ["Client", "Message", "MqttSink", "NotConnected", "PacketTypes", "Properties", "Refused", "Settings",
           "SinkRefused", "SinkUnavailable", "Will", "topic_matches", "watch"]
