"""MQTT: the one layer (:mod:`gateway.mqtt.client`, paho-mqtt on the event loop). The only package
that imports paho-mqtt; the sinks built on it (gateway/sinks/mqtt.py, gateway/sinks/trace_mqtt.py)
and ``sluice ingest`` use it through here."""

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.mqtt.client import Client, Message, NotConnected, Refused, Settings, Will, topic_matches
from gateway.mqtt.watch import watch

__all__ = ["Client", "Message", "NotConnected", "PacketTypes", "Properties", "Refused", "Settings", "Will",
           "topic_matches", "watch"]
