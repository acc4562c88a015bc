#!/usr/bin/env python3
"""An independent registry-aware producer for the sink's schema-registry test.

Reads JSON lines `{"key": ..., "record": {...}}` on stdin, serializes each record with
confluent-kafka's `AvroSerializer` (Confluent wire format: `00`, the 4-byte schema id, the
body; the schema registered under `<topic>-value` by the serializer itself) and produces it.
With `--add-field NAME`, the writer schema is the given one plus an optional string field
NAME (default null): a newer, backward-compatible version. Prints the schema id of the
messages and the number acknowledged.

Usage: registry_produce.py BOOTSTRAP TOPIC REGISTRY_URL SCHEMA.avsc [--add-field NAME]
"""
import json
import sys

from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext


def main() -> int:
    bootstrap, topic, registry_url, schema_path = sys.argv[1:5]
    with open(schema_path, encoding="utf-8") as f:
        schema_str = f.read()
    if len(sys.argv) > 6 and sys.argv[5] == "--add-field":
        schema = json.loads(schema_str)
        schema["fields"].append(
            {"name": sys.argv[6], "type": ["null", "string"], "default": None})
        schema_str = json.dumps(schema)
    registry = SchemaRegistryClient({"url": registry_url})
    serializer = AvroSerializer(registry, schema_str)
    context = SerializationContext(topic, MessageField.VALUE)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    failures = []
    acked = 0
    schema_id = None

    def delivered(err, _msg):
        nonlocal acked
        if err is not None:
            failures.append(str(err))
        else:
            acked += 1

    def serialize(record):
        # The client retries a registration that timed out (`max.retries`) while the first
        # attempt may still be creating the subject; the registry then answers the retry
        # with 409 "already exists" (seen once in CI on a loaded machine). Registering again
        # finds the subject and returns its id.
        for attempt in range(3):
            try:
                return serializer(record, context)
            except SchemaRegistryError as err:
                if err.http_status_code != 409 or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    for line in sys.stdin:
        message = json.loads(line)
        value = serialize(message["record"])
        schema_id = int.from_bytes(value[1:5], "big")
        producer.produce(topic, key=message["key"].encode(), value=value, on_delivery=delivered)
        producer.poll(0)
    producer.flush(60)
    if failures:
        print(f"delivery failed: {failures[:3]}", file=sys.stderr)
        return 1
    print(f"{schema_id} {acked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
