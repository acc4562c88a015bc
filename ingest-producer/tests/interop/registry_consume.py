#!/usr/bin/env python3
"""An independent registry-aware consumer for the schema-registry tests.

Reads COUNT messages of partition 0 of TOPIC from the beginning and decodes each value with
confluent-kafka's `AvroDeserializer` (Confluent wire format; the writer schema fetched from
the registry by the id in the message). Prints one JSON line per message:
`{"schema_id": ..., "record": {...}}` (timestamps as microseconds since the epoch).

Usage: registry_consume.py BOOTSTRAP TOPIC REGISTRY_URL COUNT
"""
import datetime
import json
import sys

from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.serialization import MessageField, SerializationContext


def plain(value):
    if isinstance(value, datetime.datetime):
        delta = value - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def main() -> int:
    bootstrap, topic, registry_url, count = sys.argv[1:5]
    deserializer = AvroDeserializer(SchemaRegistryClient({"url": registry_url}))
    context = SerializationContext(topic, MessageField.VALUE)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "registry-consume-test",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, 0)])
    seen = 0
    while seen < int(count):
        message = consumer.poll(30)
        if message is None:
            print(f"only {seen} of {count} messages within 30 s", file=sys.stderr)
            return 1
        if message.error():
            print(f"consumer error: {message.error()}", file=sys.stderr)
            return 1
        value = message.value()
        record = deserializer(value, context)
        print(json.dumps({"schema_id": int.from_bytes(value[1:5], "big"),
                          "record": plain(record)}, sort_keys=True))
        seen += 1
    consumer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
