"""Example walle task: greets whoever the event names and counts its runs in on-device storage.

Runs inside the device sandbox, where `walle.log` and `walle.storage` are the host APIs granted by
task.toml's `apis`. The host calls main(event) and records the JSON-able value it returns.
"""
from walle import log, storage


def main(event):
    n = storage.get("runs", 0) + 1
    storage.put("runs", n)
    who = event.get("payload", {}).get("who", "world")
    log.info(f"hello {who}, run {n}")
    return {"hello": who, "runs": n}
