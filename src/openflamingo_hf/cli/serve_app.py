"""The server of `openflamingo serve`: transformers' serving classes (`transformers.cli.serving`) for OpenFlamingo.

`openflamingo_hf.cli.serve` describes what is served and how; this module holds the classes and the app, apart from
the command so that `openflamingo serve --help` and its argument errors do not import transformers' serving code and
torch. Importing it registers OpenFlamingo with the Auto classes: the model's process unpickles the loader, which
imports this module.
"""

from __future__ import annotations

import sys
from typing import Any

from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.model_manager import EngineClient, ModelLoader, ModelManager
from transformers.cli.serving.utils import Modality, canonical_model_id, parse_model_id

from .. import register_auto_classes
from .serve import DEFAULT_HOST, DEFAULT_MODEL, DEFAULT_PORT, shipped_models

register_auto_classes()

# The content parts OpenFlamingo reads (transformers' handlers drop the others without a word).
SUPPORTED_PARTS = ("text", "image_url", "video_url")


class OpenFlamingoModelLoader(ModelLoader):
    """
    transformers' `ModelLoader` for OpenFlamingo models: the model loads with `AutoModelForImageTextToText` (not from
    `transformers.<architectures[0]>`, which has no OpenFlamingo), and the shipped models go by their names. The
    model's process unpickles this loader, which imports this module and so registers OpenFlamingo there too.
    """

    @staticmethod
    def resolve(model_id: str) -> str:
        """The folder or Hub id to load for `model_id` (a shipped model's name, with or without `@revision`)."""
        repo, _, _ = parse_model_id(model_id)
        return shipped_models().get(repo, model_id)

    def load_config(self, model_id: str):
        config, generation_config = super().load_config(self.resolve(model_id))
        if config.model_type != "openflamingo":
            raise ValueError(
                f"{model_id} is a {config.model_type!r} model, not an OpenFlamingo one; serve it with "
                "`transformers serve` instead."
            )
        return config, generation_config

    def load_processor(self, model_id: str):
        return super().load_processor(self.resolve(model_id))

    def load_model_and_processor(self, model_id: str, on_progress=None):
        from transformers import AutoModelForImageTextToText

        source = self.resolve(model_id)
        if on_progress is not None:
            on_progress({"status": "loading", "model": model_id, "stage": "processor"})
        processor = self.load_processor(source)
        repo, revision, _ = parse_model_id(source)
        if on_progress is not None:
            on_progress({"status": "loading", "model": model_id, "stage": "weights"})
        model = AutoModelForImageTextToText.from_pretrained(
            repo,
            revision=revision,
            dtype=self.dtype,
            device_map=self.device,
            trust_remote_code=self.trust_remote_code,
            attn_implementation=self.attn_implementation,
        )
        return model.eval(), processor


class OpenFlamingoEngineClient(EngineClient):
    """An OpenFlamingo model as transformers' handlers use it: images and text in, text out."""

    modality = Modality.VLM


class OpenFlamingoModelManager(ModelManager):
    """transformers' `ModelManager`, whose pinned model is an `OpenFlamingoEngineClient`."""

    def preload_engine(self, force_model: str, engine_connection: tuple | None) -> None:
        model_id = canonical_model_id(force_model)
        engine = OpenFlamingoEngineClient(model_id, self.loader, self.generation_state, connection=engine_connection)
        self.engines[model_id] = engine
        if engine_connection is None:
            engine.start()


class OpenFlamingoChatCompletionHandler(ChatCompletionHandler):
    """transformers' chat-completions handler, which first checks that the messages are ones OpenFlamingo can read
    (a malformed request gets HTTP 400 saying what is wrong, instead of an error deep in the handler)."""

    async def handle_request(self, body: dict, request_id: str):
        check_messages(body.get("messages"))
        return await super().handle_request(body, request_id)


def check_messages(messages: Any) -> None:
    """Raises an HTTP 400 error naming the first problem of a request's `messages`, if any."""
    from fastapi import HTTPException

    def bad(detail: str) -> HTTPException:
        return HTTPException(status_code=400, detail=detail)

    if not isinstance(messages, list) or not messages:
        raise bad("`messages` must be a non-empty list of messages ({'role': ..., 'content': ...}).")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise bad(f"{where} must be an object with a 'role' (user, assistant or system) and a 'content'.")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise bad(f"{where}.content must be a string or a list of content parts.")
        for part_index, part in enumerate(content):
            part_where = f"{where}.content[{part_index}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in SUPPORTED_PARTS:
                raise bad(
                    f"{part_where} has type {kind!r}; OpenFlamingo reads {', '.join(SUPPORTED_PARTS)} parts "
                    "(images as image_url: an http(s) URL, a data:image/... URL or a local file path)."
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise bad(f"{part_where} is a text part without a 'text' string.")
            if kind in ("image_url", "video_url"):
                value = part.get(kind)
                url = value.get("url") if isinstance(value, dict) else None
                if not isinstance(url, str) or not url.strip():
                    raise bad(
                        f"{part_where} is an {kind} part without a URL: give {{'{kind}': {{'url': ...}}}} with an "
                        "http(s) URL, a data: URL or a local file path."
                    )


# ----------------------------------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------------------------------


def build_app(model: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto", enable_cors: bool = False):
    """
    transformers' FastAPI app serving `model` (a shipped model's name, a model folder or a Hub id), loaded in a
    process of its own before this returns. Returns `(app, model_manager)`.
    """
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    loader = OpenFlamingoModelLoader(device=device, dtype=dtype)
    generation_state = GenerationState()
    model_manager = OpenFlamingoModelManager(loader, generation_state, force_model=model)
    # A video request gets the processor's own frame count (the model's frame embeddings), not the server's default.
    processor = model_manager.get_engine(model).processor
    template_kwargs = {"num_frames": processor.num_frames} if getattr(processor, "num_frames", None) else {}
    handler_args = (model_manager, generation_state)
    app = build_server(
        model_manager,
        OpenFlamingoChatCompletionHandler(*handler_args, chat_template_kwargs=template_kwargs),
        completion_handler=CompletionHandler(*handler_args),
        response_handler=ResponseHandler(*handler_args, chat_template_kwargs=template_kwargs),
        transcription_handler=TranscriptionHandler(model_manager),
        systemone_handler=SystemOneHandler(*handler_args),
        enable_cors=enable_cors,
    )
    add_openai_error_bodies(app)
    return app, model_manager


def add_openai_error_bodies(app) -> None:
    """
    Request errors (4xx) answered with OpenAI's error body, `{"error": {"message": ..., "type": ...}}` (plus
    transformers' `{"detail": ...}`), so that OpenAI clients show the message: `openai.BadRequestError: Error code:
    400 - Sample 0, image 0: ...`. Registered with FastAPI's `add_exception_handler` on this app.
    """
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException  # FastAPI's HTTPException and the router's own (404, 405)

    def error_response(status_code: int, message: str) -> JSONResponse:
        kind = "invalid_request_error" if status_code < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}, "detail": message}
        return JSONResponse(body, status_code=status_code)

    async def value_error(_request, error: ValueError) -> JSONResponse:  # the request's fault (as transformers)
        return error_response(400, str(error))

    async def http_error(_request, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    async def invalid_body(_request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in error.errors())
        return error_response(422, f"The request body is not a valid JSON object ({problems}).")

    app.add_exception_handler(ValueError, value_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_body)


def serve(
    model: str = DEFAULT_MODEL,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    device: str = "auto",
    dtype: str = "auto",
    log_level: str = "info",
    enable_cors: bool = False,
) -> None:
    """Loads `model` and serves it until the server is stopped (Ctrl+C or SIGTERM)."""
    set_log_level(log_level)
    app, model_manager = build_app(model, device=device, dtype=dtype, enable_cors=enable_cors)
    run_server(app, model_manager, model, host=host, port=port, log_level=log_level)


def set_log_level(log_level: str) -> None:
    from transformers.cli.serving.utils import set_serve_log_level
    from transformers.utils import logging as hf_logging

    set_serve_log_level(hf_logging.log_levels[log_level])


def run_server(app, model_manager, model: str, host: str, port: int, log_level: str = "info") -> None:
    """Runs uvicorn on `app` until it is stopped, or until the model's process dies (then raises RuntimeError)."""
    import uvicorn

    async def stop_if_the_model_died() -> None:
        if model_manager.is_dead:
            server.should_exit = True

    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, callback_notify=stop_if_the_model_died, timeout_notify=5
    )
    server = uvicorn.Server(config)
    print(f"Serving {model} on http://{_url_host(host)}:{port}/v1 (OpenAI chat completions)", file=sys.stderr,
          flush=True)
    server.run()
    if model_manager.is_dead:
        raise RuntimeError("the model's process died (see the error above), so the server stopped.")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


__all__ = [
    "OpenFlamingoChatCompletionHandler",
    "OpenFlamingoEngineClient",
    "OpenFlamingoModelLoader",
    "OpenFlamingoModelManager",
    "add_openai_error_bodies",
    "build_app",
    "check_messages",
    "run_server",
    "serve",
    "set_log_level",
]
