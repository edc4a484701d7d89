"""The cloud side: ``sluice ingest`` takes the gateways' messages from the broker into InfluxDB.

:mod:`gateway.cloud.config` reads ``ingest.yaml``, :mod:`gateway.cloud.lineproto` judges payloads
(and turns the gateway's JSON into line protocol), :mod:`gateway.cloud.ingest` is the service. Its
commands are in :mod:`gateway.cli.ingest`. Nothing here is imported by ``sluice run``.
"""
