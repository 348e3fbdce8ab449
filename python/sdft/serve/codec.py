"""The wire formats of Tinker's protocol: protobuf bodies (``forward_backward`` requests,
``forward_backward`` and ``sample`` results), optional zstd compression, and JSON requests read
into the SDK's own pydantic request types.

Every decoding error is a :class:`~sdft.serve.errors.ServeError` (400) naming the endpoint, the
datum and the field, so the SDK shows the user what is wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import pydantic
from tinker import types
from tinker.proto import tinker_public_pb2 as pb
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from sdft.serve.errors import ServeError

PROTOBUF = "application/x-protobuf"
Model = TypeVar("Model", bound=pydantic.BaseModel)

_TENSOR_DTYPES: dict[int, tuple[str, np.dtype[Any]]] = {
    pb.DTYPE_FLOAT32: ("float32", np.dtype(np.float32)),
    pb.DTYPE_INT64: ("int64", np.dtype(np.int64)),
    pb.DTYPE_INT32: ("int64", np.dtype(np.int32)),
}
_OUTPUT_DTYPES: dict[str, Any] = {"float32": pb.DTYPE_FLOAT32, "int64": pb.DTYPE_INT64}
_STOP_REASONS: dict[str, Any] = {"stop": pb.STOP_REASON_STOP, "length": pb.STOP_REASON_LENGTH}


# --- bodies -------------------------------------------------------------------------------------


def decompress(body: bytes, content_encoding: str | None, *, limit: int, where: str) -> bytes:
    """The body without its ``Content-Encoding`` (identity or zstd), at most ``limit`` bytes."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding != "zstd":
        raise ServeError(415, f"{where}: Content-Encoding {encoding!r} is not supported (zstd is)")
    import zstandard

    try:
        with zstandard.ZstdDecompressor().stream_reader(body) as reader:
            data = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise ServeError(400, f"{where}: body is not valid zstd ({exc})") from None
    if len(data) > limit:
        raise ServeError(
            413, f"{where}: decompressed body exceeds the server's limit of {limit} bytes"
        )
    return data


def parse_json(model: type[Model], body: bytes, where: str) -> Model:
    """``body`` as JSON validated into the SDK's request type ``model``."""
    try:
        raw = json.loads(body) if body else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServeError(400, f"{where}: body is not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise ServeError(400, f"{where}: body must be a JSON object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors()[:5]
        )
        raise ServeError(400, f"{where}: invalid request: {problems}") from None


def to_json(value: Any) -> dict[str, Any]:
    """A pydantic response as the JSON object the SDK reads."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# --- forward_backward requests ------------------------------------------------------------------


def _tensor(msg: pb.Tensor, where: str) -> types.TensorData:
    entry = _TENSOR_DTYPES.get(msg.dtype)
    if entry is None:
        raise ServeError(400, f"{where}: unsupported tensor dtype {msg.dtype}")
    dtype, np_dtype = entry
    shape = [int(s) for s in msg.shape]
    if any(s < 0 for s in shape):
        raise ServeError(400, f"{where}: negative dimension in shape {shape}")

    def array(raw: bytes, item: np.dtype[Any], what: str) -> np.ndarray:
        if len(raw) % item.itemsize:
            raise ServeError(
                400, f"{where}: {what} has {len(raw)} bytes, not a multiple of {item.itemsize}"
            )
        return np.frombuffer(raw, dtype=item)

    if msg.WhichOneof("encoding") == "sparse_csr":
        if len(shape) != 2:
            raise ServeError(400, f"{where}: a sparse CSR tensor must be 2-D, got shape {shape}")
        values = array(msg.sparse_csr.values, np_dtype, "sparse values")
        crow = array(msg.sparse_csr.crow_indices, np.dtype(np.int64), "crow_indices")
        cols = array(msg.sparse_csr.col_indices, np.dtype(np.int64), "col_indices")
        if len(crow) != shape[0] + 1:
            raise ServeError(
                400,
                f"{where}: crow_indices has {len(crow)} entries, shape {shape} needs "
                f"{shape[0] + 1}",
            )
        if len(cols) != len(values):
            raise ServeError(
                400, f"{where}: {len(cols)} column indices for {len(values)} sparse values"
            )
        if len(crow) and (
            crow[0] != 0 or crow[-1] != len(values) or bool(np.any(np.diff(crow) < 0))
        ):
            raise ServeError(400, f"{where}: crow_indices are not a valid CSR row pointer")
        if len(cols) and (cols.min() < 0 or cols.max() >= shape[1]):
            raise ServeError(400, f"{where}: a column index is outside [0, {shape[1]})")
        return types.TensorData(
            data=values.astype(np_dtype if dtype != "int64" else np.int64),
            dtype=dtype,  # type: ignore[arg-type]
            shape=shape,
            sparse_crow_indices=crow.tolist(),
            sparse_col_indices=cols.tolist(),
        )
    values = array(msg.dense, np_dtype, "data")
    if shape and math.prod(shape) != len(values):
        raise ServeError(
            400, f"{where}: shape {shape} needs {math.prod(shape)} values, got {len(values)}"
        )
    return types.TensorData(data=values, dtype=dtype, shape=shape or [len(values)])  # type: ignore[arg-type]


def _model_input(chunks: Sequence[pb.Chunk], where: str) -> types.ModelInput:
    parsed: list[types.ModelInputChunk] = []
    for index, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise ServeError(
                400,
                f"{where}: chunk {index} is {kind or 'empty'}; this server runs text-only "
                "models (encoded_text chunks)",
            )
        raw = chunk.encoded_text.tokens
        if len(raw) % 4:
            raise ServeError(400, f"{where}: chunk {index} tokens are not int32 bytes")
        tokens = np.frombuffer(raw, dtype=np.int32).tolist()
        parsed.append(types.EncodedTextChunk(tokens=tokens))
    return types.ModelInput(chunks=parsed)


def decode_forward_backward(
    body: bytes, where: str
) -> tuple[pb.ForwardBackwardRequest, list[types.Datum], dict[str, float | str] | None]:
    """The protobuf ``ForwardBackwardRequest``: (message, datums, loss_fn_config)."""
    message = pb.ForwardBackwardRequest()
    try:
        message.ParseFromString(body)
    except Exception as exc:  # protobuf's DecodeError
        raise ServeError(
            400, f"{where}: body is not a ForwardBackwardRequest protobuf ({exc})"
        ) from None
    if not message.model_id:
        raise ServeError(400, f"{where}: model_id is missing")
    if not message.data:
        raise ServeError(400, f"{where}: no data")
    datums = []
    for index, datum in enumerate(message.data):
        here = f"{where}: datum {index}"
        inputs = {
            name: _tensor(tensor, f"{here}: loss_fn_inputs[{name!r}]")
            for name, tensor in datum.loss_fn_inputs.items()
        }
        datums.append(
            types.Datum(
                model_input=_model_input(datum.model_input, here),
                loss_fn_inputs=inputs,
            )
        )
    config: dict[str, float | str] | None = None
    if message.loss_fn_config_v2:
        config = {
            key: (value.text if value.WhichOneof("value") == "text" else value.number)
            for key, value in message.loss_fn_config_v2.items()
        }
    elif message.loss_fn_config:
        config = {key: float(value) for key, value in message.loss_fn_config.items()}
    return message, datums, config


# --- results -------------------------------------------------------------------------------------


def encode_forward_backward_output(output: types.ForwardBackwardOutput) -> bytes:
    """``ForwardBackwardOutput`` as the protobuf the SDK decodes (one ``ArrayRecord`` per run of
    datums whose fields share dtype and trailing shape)."""
    message = pb.ForwardBackwardOutput(
        loss_fn_output_type=output.loss_fn_output_type or "ArrayRecord",
        metrics={key: float(value) for key, value in output.metrics.items()},
    )
    arrays: list[dict[str, np.ndarray]] = []
    for datum in output.loss_fn_outputs:
        arrays.append({name: np.asarray(td.to_numpy()) for name, td in datum.items()})

    def signature(datum: dict[str, np.ndarray]) -> tuple[Any, ...]:
        return tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(datum.items()))

    start = 0
    while start < len(arrays):
        end = start + 1
        while end < len(arrays) and signature(arrays[end]) == signature(arrays[start]):
            end += 1
        record = message.loss_fn_outputs.add(num_datums=end - start)
        for name in arrays[start]:
            parts = [_output_array(arrays[i][name], name) for i in range(start, end)]
            offsets = np.zeros(len(parts) + 1, dtype=np.int64)
            offsets[1:] = np.cumsum([p.nbytes for p in parts])
            sample = parts[0]
            record.fields[name].CopyFrom(
                pb.BatchedTensor(
                    data=b"".join(p.tobytes() for p in parts),
                    offsets=offsets.tobytes(),
                    dtype=_OUTPUT_DTYPES[sample.dtype.name],
                    trailing_shape=list(sample.shape[1:]),
                )
            )
        start = end
    return message.SerializeToString()


def _output_array(array: np.ndarray, name: str) -> np.ndarray:
    if np.issubdtype(array.dtype, np.floating):
        return np.ascontiguousarray(array, dtype=np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return np.ascontiguousarray(array, dtype=np.int64)
    raise TypeError(f"loss_fn_outputs[{name!r}] has dtype {array.dtype}")


def _topk(value: Any) -> pb.TopkLogprobs | None:
    """Dense top-K rows (from a ``TopkLogprobs`` or the list view) with ``(0, -99999.0)`` cells."""
    if value is None:
        return None
    if isinstance(value, TopkLogprobs):
        ids = np.ascontiguousarray(value.token_ids, dtype=np.int32)
        lps = np.ascontiguousarray(value.logprobs, dtype=np.float32)
    else:
        rows = list(value)
        k = max((len(row) for row in rows if row), default=0)
        ids = np.zeros((len(rows), k), dtype=np.int32)
        lps = np.full((len(rows), k), MASK_LOGPROB, dtype=np.float32)
        for i, row in enumerate(rows):
            for j, (token, logprob) in enumerate(row or ()):
                ids[i, j] = token
                lps[i, j] = logprob
    length, k = ids.shape if ids.ndim == 2 else (0, 0)
    return pb.TopkLogprobs(token_ids=ids.tobytes(), logprobs=lps.tobytes(), k=k, length=length)


def _tensor_message(td: types.TensorData) -> pb.Tensor:
    array = np.asarray(td._numpy)
    message = pb.Tensor(dtype=_OUTPUT_DTYPES[td.dtype], shape=list(td.shape or [array.size]))
    cast = array.astype(np.float32 if td.dtype == "float32" else np.int64)
    if td.sparse_crow_indices is not None:
        message.sparse_csr.values = cast.tobytes()
        message.sparse_csr.crow_indices = np.asarray(td.sparse_crow_indices, np.int64).tobytes()
        message.sparse_csr.col_indices = np.asarray(td.sparse_col_indices, np.int64).tobytes()
    else:
        message.dense = cast.tobytes()
    return message


def encode_sample_response(response: types.SampleResponse) -> bytes:
    """``SampleResponse`` as the protobuf the SDK decodes (NaN where a prompt log-prob is absent)."""
    message = pb.SampleResponse(prompt_cache_hit_tokens=int(response.prompt_cache_hit_tokens))
    for sequence in response.sequences:
        tokens = (
            sequence.tokens_np if sequence.tokens_np is not None else np.asarray(sequence.tokens)
        )
        seq = message.sequences.add(
            stop_reason=_STOP_REASONS[sequence.stop_reason],
            tokens=np.ascontiguousarray(tokens, dtype=np.int32).tobytes(),
        )
        logprobs = sequence.logprobs_np if sequence.logprobs_np is not None else sequence.logprobs
        if logprobs is not None:
            seq.logprobs = np.asarray(logprobs, dtype=np.float32).tobytes()
        topk = (
            sequence.topk_logprobs_np
            if sequence.topk_logprobs_np is not None
            else sequence.topk_logprobs
        )
        encoded = _topk(topk)
        if encoded is not None:
            seq.topk_sampled_logprobs.CopyFrom(encoded)
    prompt = response.prompt_logprobs_np
    if prompt is None and response.prompt_logprobs is not None:
        prompt = np.array(
            [math.nan if v is None else v for v in response.prompt_logprobs], dtype=np.float32
        )
    if prompt is not None:
        message.prompt_logprobs = np.asarray(prompt, dtype=np.float32).tobytes()
    topk_prompt = (
        response.topk_prompt_logprobs_np
        if response.topk_prompt_logprobs_np is not None
        else response.topk_prompt_logprobs
    )
    encoded = _topk(topk_prompt)
    if encoded is not None:
        message.topk_prompt_logprobs.CopyFrom(encoded)
    if response.target_prompt_logprobs is not None:
        message.target_prompt_logprobs.CopyFrom(_tensor_message(response.target_prompt_logprobs))
    if response.prompt_alt_tokens is not None:
        message.prompt_alt_tokens.tokens.CopyFrom(
            _tensor_message(response.prompt_alt_tokens.tokens)
        )
        message.prompt_alt_tokens.logprobs.CopyFrom(
            _tensor_message(response.prompt_alt_tokens.logprobs)
        )
    return message.SerializeToString()


def tensor_data_from_json(value: Any) -> types.TensorData | None:
    """The JSON wire shape of a ``TensorData`` (``SampleRequest.target_prompt_logprobs``)."""
    if value is None:
        return None
    fields: Mapping[str, Any] = (
        value.model_dump() if isinstance(value, pydantic.BaseModel) else value
    )
    return types.TensorData(
        data=np.asarray(fields["data"]),
        dtype=fields["dtype"],
        shape=fields.get("shape"),
        sparse_crow_indices=fields.get("sparse_crow_indices"),
        sparse_col_indices=fields.get("sparse_col_indices"),
    )
