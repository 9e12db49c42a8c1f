"""A small OIP v2 HTTP client (docs/http-protocol.md) with the socket client's interface: `health`,
`info`, `predict` and `predict_batch` return the replies `PredictionClient` returns, so
`stream-cl predict --http` prints the same thing either way. Standard library and numpy only
(part of the torch-free `stream-cl-client` distribution)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from types import TracebackType
from typing import Any

import numpy as np

from stream_cl_client.socket_client import PredictionError

# HTTP status -> the socket protocol's error code, so callers handle both fronts alike.
CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    413: "too_large",
    429: "bad_request",
    503: "not_ready",
}


class HttpPredictionClient:
    """OIP v2 over HTTP(S): one model, `model` (a per-key server: pass the key as `key`)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        token: str | None = None,
        timeout: float = 10.0,
        tls: bool = False,
        cafile: str | None = None,
        model: str = "stream_cl",
    ) -> None:
        self.base = f"{'https' if tls or cafile else 'http'}://{host}:{port}"
        self.timeout = timeout
        self.model = model
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._context = ssl.create_default_context(cafile=cafile) if tls or cafile else None
        self._classes: dict[str, tuple[int, list[Any]]] = {}  # model -> (version, classes)

    def __enter__(self) -> HttpPredictionClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pass

    def _call(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base + path, data=data, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                message = json.loads(raw)["error"]
            except (ValueError, KeyError, TypeError):
                message = raw.decode(errors="replace")[:200] or e.reason
            return e.code, {"error": message}

    def _model_path(self, key: str | None) -> str:
        return "/v2/models/" + urllib.parse.quote(key if key is not None else self.model, safe="")

    @staticmethod
    def _raise(status: int, reply: dict[str, Any]) -> None:
        if status != 200:
            raise PredictionError(CODES.get(status, f"http_{status}"), str(reply.get("error")))

    def health(self, key: str | None = None) -> dict[str, Any]:
        path = "/v2/health/ready" if key is None else self._model_path(key) + "/ready"
        status, reply = self._call(path)
        if status not in (200, 503):
            self._raise(status, reply)
        return {"ok": True, "status": "ready" if status == 200 else "starting"}

    def info(self, key: str | None = None) -> dict[str, Any]:
        status, meta = self._call(self._model_path(key))
        self._raise(status, meta)
        version = int(meta["versions"][0])
        params = meta.get("parameters", {})
        self._classes[key or self.model] = (version, list(params.get("classes", [])))
        return {
            "ok": True,
            "model_version": version,
            "strategy": params.get("strategy"),
            "classes": params.get("classes"),
            "tasks": params.get("tasks"),
            "input_shape": meta["inputs"][0]["shape"][1:],
        }

    def predict(self, x: Any, task: int | str | None = None, key: str | None = None) -> dict[str, Any]:
        """One sample: `{"ok", "label", "proba", "model_version"}` as the socket's `predict`."""
        reply = self.predict_batch(np.asarray(x, dtype=np.float32)[None, :], task=task, key=key)
        return {"ok": True, **reply["results"][0], "model_version": reply["model_version"]}

    def predict_batch(self, xs: Any, task: int | str | None = None, key: str | None = None) -> dict[str, Any]:
        """Several samples in one infer request: `{"ok", "results": [{"label", "proba"}], "model_version"}`."""
        xs = np.asarray(xs, dtype=np.float32).reshape(len(xs), -1)
        body: dict[str, Any] = {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": list(xs.shape), "data": xs.ravel().tolist()}
            ],
            "outputs": [{"name": "probabilities"}],
        }
        if task is not None:
            body["parameters"] = {"task": task}
        status, reply = self._call(self._model_path(key) + "/infer", body)
        self._raise(status, reply)
        version = int(reply["model_version"])
        known = self._classes.get(key or self.model)
        if known is None or known[0] != version:  # labels come from the version that answered
            self.info(key)
            known = self._classes[key or self.model]
        classes = known[1]
        (out,) = reply["outputs"]
        proba = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
        if proba.shape[1] != len(classes):  # a newer version (more classes) answered: ask again
            self.info(key)
            classes = self._classes[key or self.model][1]
        results = [
            {"label": classes[int(row.argmax())], "proba": dict(zip(classes, row.tolist(), strict=True))}
            for row in proba
        ]
        return {"ok": True, "results": results, "model_version": version}
