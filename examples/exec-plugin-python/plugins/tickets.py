#!/usr/bin/env python3
"""A tripline exec sink that opens a ticket per firing alert and closes it
when the alert resolves.

tripline starts this program once and keeps it running:

  stdin   one alert per line, as JSON (fingerprint, rule, name, severity,
          status "firing" | "resolved", labels, annotations, starts_at,
          ends_at, origin)
  stdout  one line per alert once it is handled: `ok`, or `error <reason>`
          to have tripline retry the batch. Flush after each line.
  stderr  anything; every line shows up in tripline's log.

An alert may arrive twice (a retried batch is sent whole): the ticket key is
the alert's fingerprint, and opening an open ticket or closing a closed one
does nothing, so a repeat is harmless.

Here a "ticket" is a line appended to the file named by the first argument;
replace `record` with a call to your ticketing system's API.
"""

import json
import sys


def record(path, ticket):
    with open(path, "a", encoding="utf-8") as out:
        out.write(json.dumps(ticket, sort_keys=True) + "\n")


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "tickets.jsonl"
    open_tickets = set()
    for raw in sys.stdin:
        if not raw.strip():
            continue
        try:
            alert = json.loads(raw)
            key = alert["fingerprint"]
            firing = alert["status"] == "firing"
            if firing == (key in open_tickets):
                print("ok", flush=True)  # a repeat: nothing to do
                continue
            record(path, {
                "action": "open" if firing else "close",
                "key": key,
                "title": alert["annotations"].get("summary", alert["name"]),
                "severity": alert["severity"],
                "labels": alert["labels"],
            })
            if firing:
                open_tickets.add(key)
            else:
                open_tickets.discard(key)
        except Exception as e:  # noqa: BLE001 - any failure is reported to tripline
            print(f"error {type(e).__name__}: {e}", flush=True)
            continue
        print(f"ticket {'opened' if firing else 'closed'} for {key}", file=sys.stderr, flush=True)
        print("ok", flush=True)


if __name__ == "__main__":
    main()
