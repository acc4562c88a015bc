#!/usr/bin/env python3
"""An independent producer for the sink's interoperability test.

Reads JSON lines `{"key": ..., "record": {...}}` on stdin, encodes each record with fastavro
in Avro single-object encoding (`C3 01`, the CRC-64-AVRO fingerprint of the schema's Parsing
Canonical Form as fastavro computes it, then the body), and produces it with confluent-kafka.
Prints the fingerprint (hex of the header's 8 bytes) and the number of messages acknowledged.

Usage: fastavro_produce.py BOOTSTRAP TOPIC SCHEMA.avsc < readings.jsonl
"""
import io
import json
import sys

import fastavro
from confluent_kafka import Producer
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form


def main() -> int:
    bootstrap, topic, schema_path = sys.argv[1:4]
    with open(schema_path, encoding="utf-8") as f:
        schema = parse_schema(json.load(f))
    # fastavro gives the 8 fingerprint bytes in the order single-object encoding writes them.
    fp = fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO")
    header = b"\xc3\x01" + bytes.fromhex(fp)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    failures = []
    acked = 0

    def delivered(err, _msg):
        nonlocal acked
        if err is not None:
            failures.append(str(err))
        else:
            acked += 1

    for line in sys.stdin:
        message = json.loads(line)
        body = io.BytesIO()
        fastavro.schemaless_writer(body, schema, message["record"])
        producer.produce(topic, key=message["key"].encode(), value=header + body.getvalue(),
                         on_delivery=delivered)
        producer.poll(0)
    producer.flush(60)
    if failures:
        print(f"delivery failed: {failures[:3]}", file=sys.stderr)
        return 1
    print(f"{fp} {acked}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
