"""{{name}}: counts app opens (event trigger) and logs a summary (schedule trigger).

Runs in the device sandbox: `walle.log` and `walle.storage` are the host APIs task.toml grants.
Try it before submitting:
    walle task run {{name}} --event app_open='{"screen": "home"}' --storage-from {{name}}/storage.json
    walle task run {{name}} --event schedule
"""
from walle import log, storage


def main(event):
    if event["name"] == "schedule":
        opens = storage.get("opens", 0)
        log.info(f"{opens} app opens so far")
        return {"opens": opens}
    opens = storage.get("opens", 0) + 1
    storage.put("opens", opens)
    screen = event.get("payload", {}).get("screen", "unknown")
    storage.insert("opens", [{"ts_ms": event.get("ts_ms", 0), "screen": screen}])
    return {"opens": opens, "screen": screen}
