"""Fakes of TensorFlow Serving's REST and gRPC APIs that run real SavedModels, for tests.

    models = ServedModels({"cells": "/path/MODEL_BASE"})       # serves every numeric version
    with rest_server(models) as url: ...                        # "http://127.0.0.1:PORT"
    with grpc_server(models) as address: ...                    # "127.0.0.1:PORT"

They follow https://www.tensorflow.org/tfx/serving/api_rest, the PredictionService
protos and TF Serving's sources (http_rest_api_handler.cc, json_tensor.cc): model
metadata (a GetModelMetadataResponse packing the SignatureDefMap of saved_model.pb; in
REST, TF Serving writes the map unpacked under metadata.signature_def), Predict in the
row ("instances") and columnar ("inputs") formats with {"b64": ...} for string inputs
and for outputs named *_bytes, errors as {"error": "..."} with TF Serving's HTTP codes,
and "Servable not found for request: ..." (NOT_FOUND / 404) for an unknown model or
version. `log` records (api, signature, rows) of every Predict, so tests see batching.
"""
from __future__ import annotations

import base64
import contextlib
import json
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, model_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
               grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INTERNAL: 500}
# TF Serving allows messages up to 2 GB; gRPC's default is 4 MB.
GRPC_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


class ServingError(Exception):
    """A failed request: the gRPC status code and TF Serving's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class Servable:
    """One model version: the loaded SavedModel and the signature defs of its saved_model.pb."""

    def __init__(self, name: str, version: int, path: Path):
        self.name, self.version = name, version
        saved = saved_model_pb2.SavedModel()
        saved.ParseFromString((path / "saved_model.pb").read_bytes())
        self.signature_defs = saved.meta_graphs[0].signature_def
        self.loaded = tf.saved_model.load(str(path))

    def run(self, signature: str, inputs: dict, output_filter=()) -> dict:
        """inputs {alias: np.ndarray} -> {alias: np.ndarray}, checked as TF Serving checks them."""
        signature = signature or "serving_default"
        if signature not in self.signature_defs or signature.startswith("__"):
            raise ServingError(grpc.StatusCode.FAILED_PRECONDITION,
                               f'Serving signature key "{signature}" not found.')
        sig = self.signature_defs[signature]
        expected, sent = set(sig.inputs), set(inputs)
        if expected != sent:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input size does not match signature: {len(sent)}!={len(expected)}. "
                               f"Sent extra: {sorted(sent - expected)}. Missing but required: "
                               f"{sorted(expected - sent)}.")
        unknown = set(output_filter) - set(sig.outputs)
        if unknown:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"output tensor alias not found in signature: {sorted(unknown)[0]}")
        tensors = {}
        for alias, value in inputs.items():
            dtype = tf.dtypes.as_dtype(sig.inputs[alias].dtype)
            if value.dtype != dtype.as_numpy_dtype and not (dtype == tf.string and value.dtype == object):
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"Expects arg[0] to be {dtype.name} but "
                                   f"{tf.dtypes.as_dtype(value.dtype).name} is provided")
            tensors[alias] = tf.constant(value, dtype=dtype)
        try:
            outputs = self.loaded.signatures[signature](**tensors)
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as err:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, str(err).splitlines()[0]) from None
        return {alias: outputs[alias].numpy() for alias in (output_filter or sig.outputs)}


class ServedModels:
    """What a model server holds: model name -> numeric versions under its MODEL_BASE."""

    def __init__(self, model_bases: dict):
        self.models = {}
        for name, base in model_bases.items():
            versions = sorted(int(p.name) for p in Path(base).iterdir()
                              if p.name.isdigit() and (p / "saved_model.pb").is_file())
            self.models[name] = {v: Servable(name, v, Path(base) / str(v)) for v in versions}
        self.log = []
        self._lock = threading.Lock()

    def find(self, name: str, version: int | None) -> Servable:
        versions = self.models.get(name, {})
        if version is None and versions:
            return versions[max(versions)]
        if version in versions:
            return versions[version]
        request = f"Latest({name})" if version is None else f"Specific({name}, {version})"
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")

    def predict(self, api: str, servable: Servable, signature: str, inputs: dict,
                output_filter=()) -> dict:
        rows = {len(v) for v in inputs.values() if np.ndim(v)}
        with self._lock:
            self.log.append((api, signature or "serving_default", max(rows, default=0)))
        return servable.run(signature, inputs, output_filter)

    def metadata(self, servable: Servable) -> get_model_metadata_pb2.GetModelMetadataResponse:
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=model_pb2.ModelSpec(name=servable.name, signature_name=""))
        response.model_spec.version.value = servable.version
        response.metadata["signature_def"].Pack(
            get_model_metadata_pb2.SignatureDefMap(signature_def=servable.signature_defs))
        return response


# --- REST ------------------------------------------------------------------------------------

REST_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?"
                       r"(?P<verb>/metadata|:predict)$")


def _from_json(value, dtype: tf.DType) -> np.ndarray:
    """A JSON tensor as a NumPy array of the signature's dtype ({"b64": ...} for strings)."""
    if dtype != tf.string:
        return np.asarray(value, dtype=dtype.as_numpy_dtype)

    def decode(v):
        if isinstance(v, list):
            return [decode(x) for x in v]
        if isinstance(v, dict) and set(v) == {"b64"}:
            return base64.b64decode(v["b64"])
        if isinstance(v, str):
            return v.encode()
        raise ValueError(f"expected a string or {{\"b64\": ...}}, got {v!r}")

    return np.asarray(decode(value), dtype=object)


def _to_json(value, alias: str):
    """An output (array, NumPy scalar or bytes) as JSON: bytes as {"b64": ...} for *_bytes aliases."""
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()} if alias.endswith("_bytes") \
            else value.decode("utf-8", "replace")
    if value.dtype != object:
        return value.tolist()
    return [_to_json(v, alias) for v in value]


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _is_named(value) -> bool:
    """A JSON object of named tensors (a {"b64": ...} object is one string value)."""
    return isinstance(value, dict) and set(value) != {"b64"}


def rest_predict(models: ServedModels, name: str, version: int | None, body: bytes) -> dict:
    """A :predict request body -> the response body, in the row or the columnar format.

    Checks in TF Serving's order: JSON, signature_name, the servable, the signature,
    then "instances" (a list of values, or of objects for several inputs) or "inputs"
    (a value, or an object keyed by input name).
    """
    try:
        request = json.loads(body) if body else None
    except ValueError as err:
        raise _invalid(f"JSON Parse error: {err}") from None
    if request is None:
        raise _invalid("JSON Parse error: The document is empty")
    if not isinstance(request, dict):
        raise _invalid(f"JSON Value: {json.dumps(request)} Is not object")
    signature = request.get("signature_name") or "serving_default"
    if not isinstance(signature, str):
        raise _invalid("'signature_name' key must be a string value.")
    servable = models.find(name, version)
    sig = servable.signature_defs.get(signature)
    if sig is None:
        raise _invalid(f'Serving signature name: "{signature}" not found in signature def')
    aliases = sorted(sig.inputs)
    if ("instances" in request) == ("inputs" in request):
        raise _invalid("Missing 'inputs' or 'instances' key" if "inputs" not in request else
                       "Not formatted correctly expecting only one of 'inputs' or 'instances' "
                       "keys to exist")
    row_format = "instances" in request
    if row_format:
        data = request["instances"]
        if not isinstance(data, list) or not data:
            raise _invalid("Expecting 'instances' to be a non-empty list/array")
        if not _is_named(data[0]) and len(aliases) > 1:
            raise _invalid("instances is a plain list, but expecting list of objects as multiple "
                           "input tensors required as per tensorinfo_map")
        if _is_named(data[0]):
            for i, row in enumerate(data):
                if not _is_named(row) or sorted(row) != aliases:
                    raise _invalid(f"Failed to process element: {i} of 'instances' list. "
                                   f"keys must be equal to: {','.join(aliases)}")
            values = {alias: [row[alias] for row in data] for alias in aliases}
        else:
            values = {aliases[0]: data}
    else:
        data = request["inputs"]
        if _is_named(data):
            missing = [alias for alias in aliases if alias not in data]
            if missing:
                raise _invalid(f"Missing named input: {missing[0]} in 'inputs' object.")
            values = {alias: data[alias] for alias in aliases}  # others are ignored
        elif len(aliases) > 1:
            raise _invalid("inputs is a plain value/list, but expecting an object as multiple "
                           "input tensors required as per tensorinfo_map")
        else:
            values = {aliases[0]: data}
    try:
        arrays = {alias: _from_json(v, tf.dtypes.as_dtype(sig.inputs[alias].dtype))
                  for alias, v in values.items()}
    except (ValueError, TypeError) as err:
        raise _invalid(f"Failed to process input: {err}") from None
    outputs = models.predict("rest", servable, signature, arrays)
    if row_format:
        if len(outputs) == 1:
            (alias, value), = outputs.items()
            return {"predictions": _to_json(value, alias)}
        rows = len(next(iter(outputs.values())))
        return {"predictions": [{alias: _to_json(v[i], alias) for alias, v in outputs.items()}
                                for i in range(rows)]}
    if len(outputs) == 1:
        (alias, value), = outputs.items()
        return {"outputs": _to_json(value, alias)}
    return {"outputs": {alias: _to_json(v, alias) for alias, v in outputs.items()}}


def rest_metadata(models: ServedModels, name: str, version: int | None) -> dict:
    """GetModelMetadataResponse as TF Serving writes it: the model spec and, under
    metadata.signature_def, the unpacked SignatureDefMap (proto field names, defaults shown)."""
    response = models.metadata(models.find(name, version))
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_defs)
    options = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return {"model_spec": json_format.MessageToDict(response.model_spec, **options),
            "metadata": {"signature_def": json_format.MessageToDict(signature_defs, **options)}}


def _rest_handler(models: ServedModels):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def reply(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def handle_request(self, method: str):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            match = REST_PATH.match(self.path)
            verb = match and match["verb"]
            try:
                if (method, verb) not in (("GET", "/metadata"), ("POST", ":predict")):
                    raise _invalid(f"Malformed request: {method} {self.path}")
                version = int(match["version"]) if match["version"] else None
                answer = rest_metadata(models, match["name"], version) if verb == "/metadata" \
                    else rest_predict(models, match["name"], version, body)
            except ServingError as err:
                self.reply(HTTP_STATUS.get(err.code, 500), {"error": err.message})
                return
            self.reply(200, answer)

        def do_GET(self):
            self.handle_request("GET")

        def do_POST(self):
            self.handle_request("POST")

    return Handler


@contextlib.contextmanager
def rest_server(models: ServedModels):
    """TF Serving's REST API on 127.0.0.1 at an ephemeral port; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(models))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# --- gRPC ------------------------------------------------------------------------------------

class _PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, models: ServedModels):
        self.models = models

    def _servable(self, spec: model_pb2.ModelSpec) -> Servable:
        return self.models.find(spec.name, spec.version.value if spec.HasField("version") else None)

    def Predict(self, request, context):
        try:
            servable = self._servable(request.model_spec)
            inputs = {alias: tf.make_ndarray(proto) for alias, proto in request.inputs.items()}
            outputs = self.models.predict("grpc", servable, request.model_spec.signature_name,
                                          inputs, list(request.output_filter))
        except ServingError as err:
            context.abort(err.code, err.message)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.model_spec.signature_name = request.model_spec.signature_name or "serving_default"
        for alias, value in outputs.items():
            response.outputs[alias].CopyFrom(tf.make_tensor_proto(value))
        return response

    def GetModelMetadata(self, request, context):
        try:
            if not request.metadata_field:
                raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                   "GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != "signature_def":
                    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                                       f"Metadata field {field} is not supported")
            return self.models.metadata(self._servable(request.model_spec))
        except ServingError as err:
            context.abort(err.code, err.message)


@contextlib.contextmanager
def grpc_server(models: ServedModels):
    """TF Serving's gRPC PredictionService on 127.0.0.1 at an ephemeral port; yields host:port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=GRPC_OPTIONS)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _PredictionService(models), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()
