"""serve: answer requests with the trained model (the standard library's HTTP server, one process, threads).

Reads /model/model.joblib and /model/model_card.json once (the train stage's outputs, mounted read-only).
GET  /health    200 once the model is loaded
GET  /metadata  run id, model digest, metrics, the card, the request count, the host (container) that answered
POST /predict   JSON rows ([{feature: value}, ...] or {"rows": [...]}) -> {"predictions": [...], "digest": ...}
                (/invocations answers the same, as MLflow's scoring server names it)
"""

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import joblib
import pandas as pd

MODEL = Path("/model")
CARD = json.loads((MODEL / "model_card.json").read_text())
ESTIMATOR = joblib.load(MODEL / "model.joblib")
META = {"run_id": os.environ.get("PIPE_RUN_ID"), "digest": os.environ.get("PIPE_MODEL_DIGEST"),
        "metrics": json.loads(os.environ.get("PIPE_MODEL_METRICS") or "{}"), "model": CARD,
        "host": socket.gethostname()}  # with serve.replicas above 1, which replica answered
COUNT = {"requests": 0}
LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/health":
            self._send(200, {"status": "ok", "digest": META["digest"]})
        elif self.path == "/metadata":
            with LOCK:
                count = COUNT["requests"]
            self._send(200, {**META, "requests": count})
        else:
            self._send(404, {"error": f"no such path {self.path}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path not in ("/predict", "/invocations"):
            self._send(404, {"error": f"no such path {self.path}"})
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
            rows = body["rows"] if isinstance(body, dict) else body
            frame = pd.DataFrame(rows)[CARD["features"]]
        except (ValueError, KeyError, TypeError) as e:
            self._send(400, {"error": f"expected JSON rows with the features {CARD['features']}: {e}"})
            return
        with LOCK:
            COUNT["requests"] += 1
        predictions = [round(float(p), 3) for p in ESTIMATOR.predict(frame)]
        self._send(200, {"predictions": predictions, "run_id": META["run_id"], "digest": META["digest"]})

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - one line per request is noise
        return


if __name__ == "__main__":
    port = int(os.environ.get("PIPE_SERVE_PORT", "8080"))
    print(f"serve: model {META['digest']} of run {META['run_id']} on port {port}", flush=True)
    ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()  # noqa: S104 - the internal network only
