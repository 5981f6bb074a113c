#!/usr/bin/env python3
"""A function that takes batches (a `process` function: the batch arrives on stdin).

Subscribed with `connector.batch.size` (see docs/configuration.md), it receives up to that
many events in one call, as a CloudEvents JSON batch
(Content-Type: application/cloudevents-batch+json): a JSON array of events, each with its
`id`, `type`, `topic`, `time` and `data` (or `data_base64` for bytes).

It answers for each item, in the shape of AWS Lambda's ReportBatchItemFailures: the ids of
the items it could not handle, in `batchItemFailures`. The connector retries those (and
dead-letters them one by one after their attempts); every other item counts as delivered.
An empty list, or any 2xx without one, means every item was handled. Handle items
idempotently: a failed item comes back, possibly in a batch with new ones, and a message
the broker redelivers comes back with the same `id`.

Here an order whose `data` says `"fail": true` fails; the others are counted.
"""
import json
import sys

events = json.load(sys.stdin)
failures = []
handled = 0
for event in events:
    data = event.get("data")
    if isinstance(data, dict) and data.get("fail"):
        failures.append({"itemIdentifier": event["id"]})
        continue
    handled += 1
print(f"batch of {len(events)}: {handled} handled, {len(failures)} failed", file=sys.stderr)
json.dump({"batchItemFailures": failures}, sys.stdout)
