"""The Starlette application: Tinker's ``/api/v1`` endpoints on the local backend.

Each handler reads its request (JSON into the SDK's own request types, protobuf for
``forward_backward``), submits the work to the local backend in arrival order (the local backend
runs one model's requests first in, first out, which is Tinker's ordering guarantee for a
training client) and answers either at once or with a future id that ``retrieve_future`` resolves.
Rejections answer 4xx with ``{"detail": ...}`` before any work is done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tinker import types

from sdft.redact import redact
from sdft.serve import checkpoints as ckpt
from sdft.serve import codec
from sdft.serve.auth import ApiKey, AuthMiddleware
from sdft.serve.errors import ServeError, message_of, status_of
from sdft.serve.futures import FutureStore, Payload, UnknownFutureError
from sdft.serve.sessions import ServerState, then

logger = logging.getLogger("sdft.serve")

DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024

Handler = Callable[[Request], Awaitable[Response]]


@dataclass
class ServeConfig:
    """Everything ``create_app`` needs (the CLI fills it from its options)."""

    models: list[str]
    api_key: ApiKey
    checkpoint_root: Path
    device: str = "auto"
    dtype: str = "float32"
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    latency_ms: float = 0.0
    poll_s: float = 20.0
    session_timeout_s: float = 300.0
    max_samplers_per_session: int = 16
    served: dict[str, dict[str, Any]] = field(default_factory=dict)


def describe_models(names: list[str]) -> dict[str, dict[str, Any]]:
    """Resolve every served model through ``sdft.models`` (fails fast on an unknown one)."""
    from sdft.models import load_config, max_context_length, resolve_model

    served: dict[str, dict[str, Any]] = {}
    for name in names:
        resolved = resolve_model(name)
        served[name] = {
            "path": str(resolved.path),
            "max_context_length": int(max_context_length(load_config(name))),
        }
    return served


def client_config() -> types.ClientConfigResponse:
    """Conservative flags: every optional SDK feature the server does not implement is off."""
    return types.ClientConfigResponse(
        pjwt_auth_enabled=False,
        credential_default_source="api_key",
        parallel_fwdbwd_chunks=False,
        proto_compress_fwdbwd=False,
        use_pyqwest_transport=False,
        sample_use_retrieve_futures=False,
        custom_loss_server_side=False,
        sample_join_sampling_session=False,
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": redact(message)}, status_code=status)


def _future(request_id: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"request_id": request_id, **extra})


def _json_payload(value: Any) -> Payload:
    return Payload(json=codec.to_json(value))


def _fwdbwd_payload(value: Any) -> Payload:
    return Payload(proto=codec.encode_forward_backward_output(value))


def _sample_payload(value: Any) -> Payload:
    return Payload(proto=codec.encode_sample_response(value))


def _submitted(api_future: Any, where: str) -> concurrent.futures.Future[Any]:
    """The local backend's future; a request it rejected at submission answers 4xx at once."""
    future: concurrent.futures.Future[Any] = api_future.future()
    if future.done() and not future.cancelled() and future.exception() is not None:
        error = future.exception()
        assert error is not None
        raise ServeError(status_of(error), f"{where}: {message_of(error)}")
    return future


async def _awaited(api_future: Any, where: str) -> Any:
    try:
        return await asyncio.wrap_future(api_future.future())
    except ServeError:
        raise
    except Exception as exc:
        raise ServeError(status_of(exc), f"{where}: {message_of(exc)}") from None


class Server:
    """The endpoint handlers over one :class:`ServerState` and :class:`FutureStore`."""

    def __init__(self, config: ServeConfig, service: Any) -> None:
        self.config = config
        self.service = service
        self.state = ServerState(
            service,
            served_models=config.served,
            checkpoint_root=config.checkpoint_root,
            max_samplers_per_session=config.max_samplers_per_session,
            session_timeout_s=config.session_timeout_s,
        )
        self.futures = FutureStore(poll_s=config.poll_s)

    @property
    def root(self) -> Path:
        return self.config.checkpoint_root

    async def body(self, request: Request, where: str) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ServeError(413, f"{where}: body of {declared} bytes exceeds the limit of {limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ServeError(413, f"{where}: body exceeds the server's limit of {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def json(self, request: Request, model: type[codec.Model], where: str) -> codec.Model:
        return codec.parse_json(model, await self.body(request, where), where)

    # --- service ------------------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def client_config(self, request: Request) -> Response:
        await self.body(request, "client/config")
        return JSONResponse(codec.to_json(client_config()))

    async def dynamic_config(self, request: Request) -> Response:
        await self.body(request, "client/dynamic_config")
        flags = types.ClientDynamicConfigResponse(sample_cancel_enabled=True)
        return JSONResponse(codec.to_json(flags))

    async def capabilities(self, request: Request) -> Response:
        models = [
            types.SupportedModel(
                model_name=name,
                max_context_length=info["max_context_length"],
                trainable=True,
                sampleable=True,
            )
            for name, info in self.config.served.items()
        ]
        return JSONResponse(
            codec.to_json(types.GetServerCapabilitiesResponse(supported_models=models))
        )

    async def create_session(self, request: Request) -> Response:
        await self.json(request, types.CreateSessionRequest, "create_session")
        session_id = self.state.create_session()
        return JSONResponse(codec.to_json(types.CreateSessionResponse(session_id=session_id)))

    async def heartbeat(self, request: Request) -> Response:
        req = await self.json(request, types.SessionHeartbeatRequest, "session_heartbeat")
        self.state.session(req.session_id, "session_heartbeat")
        return JSONResponse(codec.to_json(types.SessionHeartbeatResponse()))

    async def finish_session(self, request: Request) -> Response:
        await self.body(request, "sessions/finish")
        session_id = request.path_params["session_id"]
        self.state.session(session_id, "sessions/finish")
        self.state.finish_session(session_id)
        self.futures.drop_owner(session_id)
        return JSONResponse(None)

    async def telemetry(self, request: Request) -> Response:
        await self.body(request, "telemetry")
        return JSONResponse({"status": "accepted"})

    # --- training models ----------------------------------------------------------------------

    async def create_model(self, request: Request) -> Response:
        where = "create_model"
        req = await self.json(request, types.CreateModelRequest, where)
        self.state.session(req.session_id, where)
        base_model = self.state.check_served(req.base_model, where)
        lora = req.lora_config
        if lora is None:
            raise ServeError(400, f"{where}: lora_config is required (this server trains LoRA)")
        _check_optimizer(req.optimizer_config, where)
        alias = f"{req.session_id}:train:{req.model_seq_id}"
        created = _submitted(
            self.service.create_lora_training_client(
                base_model,
                rank=lora.rank,
                seed=lora.seed,
                train_mlp=lora.train_mlp,
                train_attn=lora.train_attn,
                train_unembed=lora.train_unembed,
                user_metadata=_str_metadata(req.user_metadata),
            ),
            where,
        )

        def register(client: Any) -> types.CreateModelResponse:
            model = self.state.add_model(req.session_id, client, base_model, alias)
            return types.CreateModelResponse(model_id=model.model_id)

        request_id = self.futures.add(then(created, register), _json_payload, req.session_id)
        return _future(request_id)

    async def get_info(self, request: Request) -> Response:
        req = await self.json(request, types.GetInfoRequest, "get_info")
        model = self.state.model(req.model_id, "get_info")
        info = model.client.get_info()
        tokenizer_id = self.config.served.get(model.base_model, {}).get("path")
        data = info.model_data.model_copy(update={"tokenizer_id": tokenizer_id})
        info = info.model_copy(update={"model_id": req.model_id, "model_data": data})
        return JSONResponse(codec.to_json(info))

    async def forward_backward(self, request: Request) -> Response:
        where = "forward_backward"
        raw = await self.body(request, where)
        if "protobuf" not in request.headers.get("content-type", ""):
            raise ServeError(
                415, f"{where}: send the request as {codec.PROTOBUF} (as tinker>=0.38 does)"
            )
        raw = codec.decompress(
            raw,
            request.headers.get("content-encoding"),
            limit=self.config.max_body_bytes,
            where=where,
        )
        message, datums, loss_config = codec.decode_forward_backward(raw, where)
        if message.forward_only:
            where = "forward"
        model = self.state.model(message.model_id, where)
        call = model.client.forward if message.forward_only else model.client.forward_backward
        future = _submitted(call(datums, message.loss_fn, loss_config), where)
        request_id = self.futures.add(future, _fwdbwd_payload, model.session_id)
        return _future(request_id, model_id=message.model_id)

    async def optim_step(self, request: Request) -> Response:
        where = "optim_step"
        req = await self.json(request, types.OptimStepRequest, where)
        model = self.state.model(req.model_id, where)
        future = _submitted(model.client.optim_step(req.optim_params), where)
        request_id = self.futures.add(future, _json_payload, model.session_id)
        return _future(request_id, model_id=req.model_id)

    async def create_custom_loss(self, request: Request) -> Response:
        await self.body(request, "create_custom_loss")
        raise ServeError(
            400,
            "create_custom_loss: server-side custom losses are not supported (client/config "
            "custom_loss_server_side is off, so forward_backward_custom runs the loss in the "
            "client)",
        )

    # --- checkpoints --------------------------------------------------------------------------

    async def save_weights(self, request: Request) -> Response:
        where = "save_weights"
        req = await self.json(request, types.SaveWeightsRequest, where)
        model = self.state.model(req.model_id, where)
        name = ckpt.check_name(req.path, where)
        future = _submitted(
            model.client.save_state(
                name,
                ttl_seconds=req.ttl_seconds,
                overwrite=req.overwrite,
                user_metadata=req.user_metadata,
            ),
            where,
        )
        saved = then(
            future, lambda r: types.SaveWeightsResponse(path=ckpt.from_local(r.path).tinker)
        )
        return _future(self.futures.add(saved, _json_payload, model.session_id))

    async def save_weights_for_sampler(self, request: Request) -> Response:
        where = "save_weights_for_sampler"
        req = await self.json(request, types.SaveWeightsForSamplerRequest, where)
        model = self.state.model(req.model_id, where)
        internal = types.SaveWeightsForSamplerResponseInternal
        if req.path is not None:
            name = ckpt.check_name(req.path, where)
            future = _submitted(
                model.client.save_weights_for_sampler(
                    name, ttl_seconds=req.ttl_seconds, user_metadata=req.user_metadata
                ),
                where,
            )
            saved = then(future, lambda r: internal(path=ckpt.from_local(r.path).tinker))
            return _future(self.futures.add(saved, _json_payload, model.session_id))
        if req.sampling_session_seq_id is None:
            raise ServeError(400, f"{where}: give a path (name) or a sampling_session_seq_id")
        sampler_id = f"{model.session_id}:sample:{req.sampling_session_seq_id}"
        future = _submitted(model.client.save_weights_and_get_sampling_client(kind=req.kind), where)

        def register(sampler: Any) -> Any:
            self.state.add_sampler(model.session_id, sampler_id, sampler)
            return internal(sampling_session_id=sampler_id)

        return _future(self.futures.add(then(future, register), _json_payload, model.session_id))

    async def load_weights(self, request: Request) -> Response:
        where = "load_weights"
        req = await self.json(request, types.LoadWeightsRequest, where)
        path = ckpt.parse_tinker_path(req.path, where)
        if req.model_id is not None:
            model = self.state.model(req.model_id, where)
            load = (
                model.client.load_state_with_optimizer if req.optimizer else model.client.load_state
            )
            future = _submitted(load(path.local), where)
            loaded = then(
                future, lambda _: types.LoadWeightsResponse(path=path.tinker, model_id=req.model_id)
            )
            return _future(self.futures.add(loaded, _json_payload, model.session_id))
        session_id, seq = req.session_id, req.model_seq_id
        if session_id is None or seq is None:
            raise ServeError(400, f"{where}: give model_id, or session_id and model_seq_id")
        self.state.session(session_id, where)
        meta = ckpt.read_meta(self.root, path, where)
        base_model = self.state.check_served(req.base_model or str(meta["base_model"]), where)
        if req.optimizer:
            created = self.service.create_training_client_from_state_with_optimizer(
                path.local,
                base_model=req.base_model,
                user_metadata=_str_metadata(req.user_metadata),
            )
        else:
            if req.optimizer_config is not None:
                _check_optimizer(req.optimizer_config, where)
            created = self.service.create_training_client_from_state(
                path.local,
                base_model=req.base_model,
                user_metadata=_str_metadata(req.user_metadata),
            )
        alias = f"{session_id}:train:{seq}"

        def register(client: Any) -> types.LoadWeightsResponse:
            self.state.add_model(session_id, client, base_model, alias)
            return types.LoadWeightsResponse(path=path.tinker, model_id=alias)

        future = then(_submitted(created, where), register)
        return _future(self.futures.add(future, _json_payload, session_id), model_id=alias)

    async def weights_info(self, request: Request) -> Response:
        where = "weights_info"
        raw = codec.parse_json(_TinkerPathRequest, await self.body(request, where), where)
        path = ckpt.parse_tinker_path(raw.tinker_path, where)
        return JSONResponse(codec.to_json(ckpt.weights_info(self.root, path, where)))

    async def list_checkpoints(self, request: Request) -> Response:
        where = "training_runs/checkpoints"
        run_id = request.path_params["run_id"]
        with contextlib.suppress(ServeError):
            run_id = self.state.model(run_id, where).model_id
        return JSONResponse(codec.to_json(ckpt.list_checkpoints(self.root, run_id, where)))

    # --- sampling -----------------------------------------------------------------------------

    async def create_sampling_session(self, request: Request) -> Response:
        where = "create_sampling_session"
        req = await self.json(request, types.CreateSamplingSessionRequest, where)
        self.state.session(req.session_id, where)
        if req.model_path is not None:
            path = ckpt.parse_tinker_path(req.model_path, where)
            meta = ckpt.read_meta(self.root, path, where)
            self.state.check_served(str(meta["base_model"]), where)
            created = self.service.create_sampling_client(
                model_path=path.local, base_model=req.base_model
            )
        else:
            base_model = self.state.check_served(req.base_model, where)
            created = self.service.create_sampling_client(base_model=base_model)
        sampler = await _awaited(created, where)
        sampler_id = f"{req.session_id}:sample:{req.sampling_session_seq_id}"
        self.state.add_sampler(req.session_id, sampler_id, sampler)
        return JSONResponse(
            codec.to_json(types.CreateSamplingSessionResponse(sampling_session_id=sampler_id))
        )

    async def get_sampler(self, request: Request) -> Response:
        where = "samplers"
        sampler_id = request.path_params["sampler_id"]
        sampler = self.state.sampler(sampler_id, where)
        model_path = getattr(sampler, "model_path", None)
        if model_path is not None and str(model_path).startswith(ckpt.LOCAL):
            model_path = ckpt.from_local(str(model_path)).tinker
        response = types.GetSamplerResponse(
            sampler_id=sampler_id, base_model=sampler.get_base_model(), model_path=model_path
        )
        return JSONResponse(codec.to_json(response))

    async def join_sampling_session(self, request: Request) -> Response:
        where = "join_sampling_session"
        req = await self.json(request, types.JoinSamplingSessionRequest, where)
        counter = self.state.join(req.sampling_session_id, where)
        return JSONResponse(
            codec.to_json(types.JoinSamplingSessionResponse(client_counter=counter))
        )

    async def asample(self, request: Request) -> Response:
        where = "asample"
        req = await self.json(request, types.SampleRequest, where)
        if req.sampling_session_id is None:
            raise ServeError(400, f"{where}: sampling_session_id is required")
        sampler = self.state.sampler(req.sampling_session_id, where)
        future = _submitted(
            sampler.sample(
                req.prompt,
                req.num_samples,
                req.sampling_params,
                include_prompt_logprobs=bool(req.prompt_logprobs),
                topk_prompt_logprobs=req.topk_prompt_logprobs,
                topk_sample_logprobs=req.topk_sample_logprobs,
                target_prompt_logprobs=codec.tensor_data_from_json(req.target_prompt_logprobs),
                prompt_alt_tokens_k=req.prompt_alt_tokens_k,
                prompt_logprobs_last_n=req.prompt_logprobs_last_n,
            ),
            where,
        )
        owner = req.sampling_session_id.split(":", 1)[0]
        request_id = self.futures.add(future, _sample_payload, owner)
        sequence_ids = [f"{request_id}:{i}" for i in range(req.num_samples)]
        return _future(request_id, sample_sequence_ids=sequence_ids)

    # --- futures ------------------------------------------------------------------------------

    async def retrieve_future(self, request: Request) -> Response:
        where = "retrieve_future"
        req = await self.json(request, types.FutureRetrieveRequest, where)
        try:
            payload = await self.futures.retrieve(req.request_id)
        except UnknownFutureError:
            raise ServeError(
                404,
                f"{where}: unknown request id {req.request_id!r} (already retrieved, "
                "expired, or issued before a server restart)",
            ) from None
        if payload.proto is not None:
            return Response(payload.proto, media_type=codec.PROTOBUF)
        return JSONResponse(payload.json)

    async def cancel_future(self, request: Request) -> Response:
        where = "cancel_future"
        req = await self.json(request, _CancelRequest, where)
        try:
            self.futures.cancel(req.request_id)
        except UnknownFutureError:
            raise ServeError(404, f"{where}: unknown request id {req.request_id!r}") from None
        return JSONResponse(None)

    async def not_implemented(self, request: Request) -> Response:
        return _error(
            404,
            f"sdft serve does not implement {request.method} {request.url.path} "
            "(see docs/serve.md for what it serves)",
        )


class _TinkerPathRequest(codec.pydantic.BaseModel):
    tinker_path: str


class _CancelRequest(codec.pydantic.BaseModel):
    request_id: str


def _check_optimizer(optimizer: Any, where: str) -> None:
    kind = getattr(optimizer, "type", "adamw")
    if kind != "adamw":
        raise ServeError(
            400, f"{where}: optimizer {kind!r} is not supported (this server trains with AdamW)"
        )


def _str_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    return None if metadata is None else {str(k): str(v) for k, v in metadata.items()}


def _guarded(handler: Handler) -> Handler:
    """Turn every failure of a handler into the status and message the SDK shows its user."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ServeError as exc:
            return _error(exc.status, exc.message)
        except ClientDisconnect:
            return _error(400, "the client disconnected before the request was complete")
        except Exception as exc:
            status = status_of(exc)
            where = request.url.path.removeprefix("/api/v1/")
            if status < 500:  # a rejection the backend raised directly
                return _error(status, f"{where}: {message_of(exc)}")
            logger.exception("%s %s failed", request.method, request.url.path)
            return _error(
                500, f"{where}: internal server error: {type(exc).__name__}: {message_of(exc)}"
            )

    return run


def create_app(config: ServeConfig, service: Any | None = None) -> Starlette:
    """The ASGI app. ``service``: a ``LocalServiceClient`` (built from ``config`` when None)."""
    if not config.served:
        config.served = describe_models(config.models)
    if service is None:
        from sdft.backends.local import LocalServiceClient

        service = LocalServiceClient(
            checkpoint_root=config.checkpoint_root, device=config.device, dtype=config.dtype
        )
    server = Server(config, service)
    s = server
    post = ["POST"]
    routes = [
        Route("/api/v1/healthz", _guarded(s.healthz), methods=["GET"]),
        Route("/api/v1/client/config", _guarded(s.client_config), methods=post),
        Route("/api/v1/client/dynamic_config", _guarded(s.dynamic_config), methods=post),
        Route("/api/v1/get_server_capabilities", _guarded(s.capabilities), methods=["GET"]),
        Route("/api/v1/create_session", _guarded(s.create_session), methods=post),
        Route("/api/v1/session_heartbeat", _guarded(s.heartbeat), methods=post),
        Route("/api/v1/sessions/{session_id}/finish", _guarded(s.finish_session), methods=post),
        Route("/api/v1/telemetry", _guarded(s.telemetry), methods=post),
        Route("/api/v1/create_model", _guarded(s.create_model), methods=post),
        Route("/api/v1/get_info", _guarded(s.get_info), methods=post),
        Route("/api/v1/forward_backward", _guarded(s.forward_backward), methods=post),
        Route("/api/v1/forward", _guarded(s.forward_backward), methods=post),
        Route("/api/v1/optim_step", _guarded(s.optim_step), methods=post),
        Route("/api/v1/create_custom_loss", _guarded(s.create_custom_loss), methods=post),
        Route("/api/v1/save_weights", _guarded(s.save_weights), methods=post),
        Route(
            "/api/v1/save_weights_for_sampler", _guarded(s.save_weights_for_sampler), methods=post
        ),
        Route("/api/v1/load_weights", _guarded(s.load_weights), methods=post),
        Route("/api/v1/weights_info", _guarded(s.weights_info), methods=post),
        Route(
            "/api/v1/training_runs/{run_id}/checkpoints",
            _guarded(s.list_checkpoints),
            methods=["GET"],
        ),
        Route("/api/v1/create_sampling_session", _guarded(s.create_sampling_session), methods=post),
        Route("/api/v1/samplers/{sampler_id}", _guarded(s.get_sampler), methods=["GET"]),
        Route("/api/v1/join_sampling_session", _guarded(s.join_sampling_session), methods=post),
        Route("/api/v1/asample", _guarded(s.asample), methods=post),
        Route("/api/v1/retrieve_future", _guarded(s.retrieve_future), methods=post),
        Route("/api/v1/cancel_future", _guarded(s.cancel_future), methods=post),
        Route(
            "/{path:path}",
            _guarded(s.not_implemented),
            methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        ),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async def reap() -> None:
            while True:
                await asyncio.sleep(min(10.0, server.state.session_timeout_s / 2))
                for session_id in server.state.expire_sessions():
                    server.futures.drop_owner(session_id)
                    logger.warning("session %s expired (no heartbeat)", session_id)

        task = asyncio.create_task(reap())
        try:
            yield
        finally:
            task.cancel()
            service.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(
        AuthMiddleware, api_key=config.api_key.value, latency_s=config.latency_ms / 1000.0
    )
    return app
