#!/usr/bin/env python3
"""An external tripline sink, as a template for your own (any language works).

tripline starts this program once and keeps it running. The protocol:

  stdin   one alert per line, as JSON:
          {"fingerprint": "...", "rule": "...", "name": "HighInputErrors",
           "severity": "major", "status": "firing" | "resolved",
           "labels": {...}, "annotations": {"summary": ...},
           "starts_at": "...", "ends_at": "..." (resolved only),
           "origin": {"stream": ..., "id": ..., "group": ...}}
  stdout  one line per alert once it is handled: `ok`, or `error <reason>`
          to have tripline retry the batch. Flush after each line. Print
          nothing else here.
  stderr  anything; every line shows up in tripline's log.

An alert may arrive twice (a retried batch is sent whole): use its
`fingerprint` + `status` to deduplicate if that matters. When stdin closes,
finish and exit; if this program exits, tripline restarts it and resends the
batch it had not acknowledged.

This example appends one readable line per alert to the file named by its
first argument (default: exec-alerts.txt) and logs the same line.
"""

import json
import sys


def describe(alert):
    labels = ", ".join(f"{k}={v}" for k, v in sorted(alert["labels"].items()))
    summary = alert["annotations"].get("summary", alert["name"])
    return (
        f'{alert["status"].upper()} {alert["severity"]} {alert["name"]} '
        f"{{{labels}}} {summary}"
    )


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "exec-alerts.txt"
    with open(path, "a", encoding="utf-8") as out:
        for raw in sys.stdin:
            if not raw.strip():
                continue
            try:
                line = describe(json.loads(raw))
                out.write(line + "\n")
                out.flush()
            except Exception as e:  # noqa: BLE001 - report any failure to tripline
                print(f"error {type(e).__name__}: {e}", flush=True)
                continue
            print(f"notified: {line}", file=sys.stderr, flush=True)
            print("ok", flush=True)


if __name__ == "__main__":
    main()
