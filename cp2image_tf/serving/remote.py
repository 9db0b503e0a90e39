"""remote: images from a decoder that TensorFlow Serving serves.

    model = RemoteModel("http://localhost:8501", "cells")            # REST API
    model = RemoteModel("localhost:8500", "cells", grpc=True)        # gRPC API
    model.feature_names, model.channels, model.crop_shape            # from `describe`
    model.images(raw)   # [N, F] raw CellProfiler values -> float32 [N, H, W, C] in [0, 1]
    model.pngs(raw)     # -> one composite PNG (bytes) per cell

The served model must be a SavedModel written by `cp2image_tf.serving.export` (signatures
serving_default, generate_png and describe). Requests carry at most BATCH rows.
The REST path needs numpy and requests only; the gRPC path imports TensorFlow.
"""
from __future__ import annotations

import base64
import json
import re

import numpy as np

from tfrecords_tools.errors import UserInputError

BATCH = 256
CONNECT_TIMEOUT = 5.0
REQUIRED = {"serving_default": (("features",), ("images",)),
            "generate_png": (("features",), ("png_bytes",)),
            "describe": (("key",), ("value",))}


class RemoteModel:
    """A cp2image-tf model on a running TensorFlow Serving, checked and described on creation.

    url: REST "http://host:8501" (or "host:8501"); with grpc=True, gRPC "host:8500".
    version: a model version number; the server's latest when None.
    timeout: seconds allowed for each request (connecting gets at most CONNECT_TIMEOUT).
    """

    def __init__(self, url: str, model_name: str, grpc: bool = False, version: int | None = None,
                 timeout: float = 10.0):
        self.model_name = model_name
        self.version = version
        transport = _Grpc if grpc else _Rest
        self._transport = transport(url, model_name, version, timeout)
        self.source = self._transport.source
        try:
            self.n_features = self._check_signatures(self._transport.signatures())
            self.description = self._describe()
        except BaseException:
            self.close()
            raise
        self.feature_names = list(self.description["feature_names"])
        self.channels = list(self.description["channels"])
        self.crop_shape = tuple(int(n) for n in self.description["crop"])
        self.median = np.asarray(self.description["median"], dtype=np.float32)
        self.sd = np.asarray(self.description["sd"], dtype=np.float32)

    def images(self, raw) -> np.ndarray:
        """Raw CellProfiler features [N, F] -> float32 images [N, H, W, C] in [0, 1]."""
        parts = [self._transport.predict("serving_default", "features", batch, "images")
                 for batch in self._batches(raw)]
        if not parts:
            return np.zeros((0, *self.crop_shape), dtype=np.float32)
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])

    def pngs(self, raw) -> list[bytes]:
        """Raw CellProfiler features [N, F] -> one composite PNG per cell."""
        return [bytes(png) for batch in self._batches(raw)
                for png in self._transport.predict("generate_png", "features", batch, "png_bytes")]

    def close(self) -> None:
        """Release the connection (a gRPC channel or an HTTP session)."""
        self._transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_signatures(self, signatures: dict) -> int:
        """The number of features F, once the cp2image-tf signatures are found."""
        missing = [f"{name} ({', '.join(ins)} -> {', '.join(outs)})"
                   for name, (ins, outs) in REQUIRED.items()
                   if name not in signatures
                   or not set(ins) <= set(signatures[name]["inputs"])
                   or not set(outs) <= set(signatures[name]["outputs"])]
        if missing:
            served = ", ".join(sorted(s for s in signatures if not s.startswith("__"))) or "none"
            raise UserInputError(f"{self.source}: not a cp2image-tf model: it lacks the signatures "
                                 f"{'; '.join(missing)} (it has {served}). Serve a model exported "
                                 "by cp2image-tf export.")
        shape = signatures["serving_default"]["inputs"]["features"]
        if shape is None or len(shape) != 2 or shape[0] != -1 or shape[1] < 1:
            raise UserInputError(f"{self.source}: serving_default input features has shape {shape}, "
                                 "not [-1, F]; serve a model exported by cp2image-tf export.")
        return shape[1]

    def _describe(self) -> dict:
        value = self._transport.predict("describe", "key", np.array([b"model"], dtype=object),
                                        "value")[0]
        try:
            description = json.loads(value)
        except ValueError:
            description = None
        keys = ("feature_names", "channels", "crop", "median", "sd")
        if not isinstance(description, dict) or not all(k in description for k in keys):
            raise UserInputError(f"{self.source}: its describe signature gives no model description; "
                                 "serve a model exported by cp2image-tf export.")
        if len(description["feature_names"]) != self.n_features \
                or len(description["median"]) != self.n_features:
            raise UserInputError(f"{self.source}: its describe signature lists "
                                 f"{len(description['feature_names'])} features but serving_default "
                                 f"takes {self.n_features}; export the model again.")
        return description

    def _batches(self, raw):
        """Rows of at most BATCH (one profile [F] is one row), non-finite values replaced by
        the training medians."""
        try:
            raw = np.asarray(raw, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise UserInputError(f"features for {self.source}: not numbers ({err}).") from None
        shape = list(raw.shape)
        if raw.ndim == 1:
            raw = raw[None]
        if raw.ndim != 2 or raw.shape[1] != self.n_features:
            names = ", ".join(self.feature_names[:3]) + (", ..." if self.n_features > 3 else "")
            raise UserInputError(f"features of shape {shape}: {self.source} takes "
                                 f"[N, {self.n_features}] (feature_names {names}).")
        raw = np.where(np.isfinite(raw), raw, self.median)
        for start in range(0, len(raw), BATCH):
            yield raw[start:start + BATCH]


def _version_text(version) -> str:
    return f" version {version}" if version is not None else ""


class _Rest:
    """TensorFlow Serving's REST API: /v1/models/NAME[/versions/V](/metadata|:predict)."""

    def __init__(self, url: str, model_name: str, version, timeout: float):
        import requests

        url = url.rstrip("/")
        if not re.match(r"^https?://", url):
            url = "http://" + url
        self.url, self.model_name, self.version = url, model_name, version
        self.base = f"{url}/v1/models/{model_name}" + (f"/versions/{version}" if version is not None else "")
        self.timeout = (min(CONNECT_TIMEOUT, timeout), timeout)
        self.source = f"TensorFlow Serving REST {url} model {model_name}{_version_text(version)}"
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def _call(self, method: str, url: str, body: dict | None = None) -> dict:
        import requests

        try:
            response = self.session.request(method, url, json=body, timeout=self.timeout)
        except requests.exceptions.ConnectionError as err:
            if "Connection aborted" in str(err):
                raise UserInputError(f"{self.url}: no HTTP answer, so not TensorFlow Serving's REST API; "
                                     "give its --rest_api_port (or use gRPC for the --port).") from None
            if isinstance(err, requests.exceptions.ConnectTimeout):
                reason = f"no connection within {self.timeout[0]:g} s"
            else:
                found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(err))
                reason = found.group(1) if found else "connection failed"
            raise UserInputError(f"{self.url}: cannot reach TensorFlow Serving's REST API ({reason}); "
                                 "start tensorflow_model_server with --rest_api_port or fix the URL."
                                 ) from None
        except requests.exceptions.Timeout:
            raise UserInputError(f"{self.url}: TensorFlow Serving gave no answer within "
                                 f"{self.timeout[1]:g} s; raise the timeout or check the server.") from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise UserInputError(f"{self.url}: HTTP {response.status_code} without a JSON object, so not "
                                 "TensorFlow Serving's REST API; check the URL and its --rest_api_port.")
        if response.status_code == 404 and "Servable not found" in str(answer.get("error")):
            raise UserInputError(f"{self.url}: TensorFlow Serving has no model "
                                 f"{self.model_name!r}{_version_text(self.version)}; give the "
                                 "--model_name the server was started with (and an existing version).")
        if response.status_code != 200 or "error" in answer:
            raise UserInputError(f"{self.source}: HTTP {response.status_code}: "
                                 f"{answer.get('error', answer)}")
        return answer

    def signatures(self) -> dict:
        answer = self._call("GET", self.base + "/metadata")
        try:
            defs = answer["metadata"]["signature_def"]["signature_def"]
            return {name: {side: {key: _json_shape(spec.get("tensor_shape", {}))
                                  for key, spec in sig.get(side, {}).items()}
                           for side in ("inputs", "outputs")}
                    for name, sig in defs.items()}
        except (KeyError, TypeError, AttributeError, ValueError):
            raise UserInputError(f"{self.source}: the metadata answer has no signature_def map; "
                                 "not TensorFlow Serving's REST API.") from None

    def predict(self, signature: str, input_name: str, values: np.ndarray, output: str):
        """Columnar request {"inputs": {input_name: values}} -> the output as a list or array."""
        if values.dtype == object:
            values = [v.decode() if isinstance(v, bytes) else v for v in values]
        else:
            values = values.tolist()
        answer = self._call("POST", self.base + ":predict",
                            {"signature_name": signature, "inputs": {input_name: values}})
        outputs = answer.get("outputs")
        if isinstance(outputs, dict):
            outputs = outputs.get(output)
        if not isinstance(outputs, list) or len(outputs) != len(values):
            raise UserInputError(f"{self.source}: signature {signature} answered without "
                                 f"{len(values)} values of output {output}.")
        if outputs and isinstance(outputs[0], (dict, str)):  # strings; {"b64": ...} for *_bytes
            return [base64.b64decode(v["b64"]) if isinstance(v, dict) else v.encode() for v in outputs]
        return np.asarray(outputs, dtype=np.float32)


def _json_shape(shape: dict):
    """A TensorShapeProto as JSON (sizes are int64, hence strings) -> list of ints, None if unknown."""
    if shape.get("unknown_rank"):
        return None
    return [int(d.get("size", 0)) for d in shape.get("dim", [])]


class _Grpc:
    """TensorFlow Serving's gRPC PredictionService."""

    def __init__(self, url: str, model_name: str, version, timeout: float):
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.address = re.sub(r"^(grpcs?|https?)://", "", url.strip()).rstrip("/")
        self.model_name, self.version, self.timeout = model_name, version, timeout
        self.source = f"TensorFlow Serving gRPC {self.address} model {model_name}{_version_text(version)}"
        # Crops of 256 cells exceed gRPC's default 4 MB; TensorFlow Serving allows 2 GB.
        self.channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        try:
            grpc.channel_ready_future(self.channel).result(timeout=min(CONNECT_TIMEOUT, timeout))
        except grpc.FutureTimeoutError:
            self.channel.close()
            raise UserInputError(f"{self.address}: cannot reach TensorFlow Serving's gRPC API within "
                                 f"{min(CONNECT_TIMEOUT, timeout):g} s; start tensorflow_model_server "
                                 "with --port or fix the address (its gRPC port, not the REST one)."
                                 ) from None
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def _spec(self, signature: str = ""):
        from tensorflow_serving.apis import model_pb2

        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature)
        if self.version is not None:
            spec.version.value = int(self.version)
        return spec

    def _call(self, method, request):
        import grpc

        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
        if code == grpc.StatusCode.NOT_FOUND and "Servable not found" in (details or ""):
            raise UserInputError(f"{self.address}: TensorFlow Serving has no model "
                                 f"{self.model_name!r}{_version_text(self.version)}; give the "
                                 "--model_name the server was started with (and an existing version).")
        if code == grpc.StatusCode.UNAVAILABLE:
            raise UserInputError(f"{self.address}: TensorFlow Serving's gRPC API is unavailable "
                                 f"({details}); check the server and the address.")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise UserInputError(f"{self.address}: TensorFlow Serving gave no answer within "
                                 f"{self.timeout:g} s; raise the timeout or check the server.")
        raise UserInputError(f"{self.source}: {code.name}: {details}")

    def signatures(self) -> dict:
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._spec(), metadata_field=["signature_def"])
        response = self._call(self.stub.GetModelMetadata, request)
        defs = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(defs):
            raise UserInputError(f"{self.source}: the metadata answer has no SignatureDefMap; "
                                 "not TensorFlow Serving.")
        return {name: {side: {key: None if spec.tensor_shape.unknown_rank
                              else [d.size for d in spec.tensor_shape.dim]
                              for key, spec in getattr(sig, side).items()}
                       for side in ("inputs", "outputs")}
                for name, sig in defs.signature_def.items()}

    def predict(self, signature: str, input_name: str, values: np.ndarray, output: str):
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest(model_spec=self._spec(signature))
        request.inputs[input_name].CopyFrom(tf.make_tensor_proto(values))
        response = self._call(self.stub.Predict, request)
        if output not in response.outputs:
            raise UserInputError(f"{self.source}: signature {signature} answered without output {output}.")
        return tf.make_ndarray(response.outputs[output])
