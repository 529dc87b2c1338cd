"""`openflamingo serve`: an OpenAI-compatible chat-completions endpoint for an OpenFlamingo model.

    openflamingo serve                                      # the shipped model, on http://127.0.0.1:8000/v1
    openflamingo serve --model ./OpenFlamingo-3B-hf --port 8080 --device cuda

It is transformers' own server (`transformers serve`: FastAPI + uvicorn, `transformers.cli.serving`) with one model
pinned, built from that package's public classes. `transformers serve` itself cannot serve OpenFlamingo: it loads a
model by looking its `config.architectures[0]` up on the `transformers` module, and picks a model's modality (text,
image, ...) from transformers' built-in tables, where neither registered nor remote-code classes appear. So this
module subclasses the classes that do that (no transformers class is patched):

- `OpenFlamingoModelLoader(ModelLoader)` loads the model with `AutoModelForImageTextToText` (where `openflamingo_hf`
  registers it) and knows the shipped models by name (`openflamingo-embedded`, `openflamingo-embedded-video`);
- `OpenFlamingoEngineClient(EngineClient)` reports the model as an image-text-to-text model (`Modality.VLM`), so that
  transformers' handlers pass the requests' images on; `OpenFlamingoModelManager(ModelManager)` creates it.

Requests are handled by transformers' handlers: the messages go through the processor's chat template (an image part
becomes `<image>`, text is written as it is, assistant turns end with `<|endofchunk|>`), `generate` runs in a model
process of its own, and the answer is cut at `<|endofchunk|>` (the model's stop token). A chat with one image and no
text is the zero-shot caption prompt `<image>`. Images come as `image_url` parts: http(s) URLs, `data:image/...`
URLs, local file paths or `file://` URLs (read by `OpenFlamingoProcessor`). A bad request (an unreadable image, an
`<image>` marker without its image, an unknown model, malformed messages) is answered with HTTP 4xx and a message,
and the server goes on serving.

The server is bound to 127.0.0.1 unless `--host` says otherwise: it has no authentication.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.model_manager import EngineClient, ModelLoader, ModelManager
from transformers.cli.serving.utils import Modality, canonical_model_id, parse_model_id

from .. import register_auto_classes
from .parsing import OneLineArgumentParser, UsageError, check_model_source

# At import, so that the model's process, which imports this module, has the Auto classes too.
register_auto_classes()

PROG = "openflamingo serve"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MODEL = "openflamingo-embedded"  # see shipped_models()
# The content parts OpenFlamingo reads (transformers' handlers drop the others without a word).
SUPPORTED_PARTS = ("text", "image_url", "video_url")


def shipped_models() -> dict[str, str]:
    """The shipped models, by the name a request gives in `model`: name -> folder."""
    from ..embedded import EMBEDDED_MODEL_DIR, EMBEDDED_VIDEO_MODEL_DIR

    return {"openflamingo-embedded": EMBEDDED_MODEL_DIR, "openflamingo-embedded-video": EMBEDDED_VIDEO_MODEL_DIR}


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


# ----------------------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------------------

DESCRIPTION = """\
Serve an OpenFlamingo model with an OpenAI-compatible API (transformers' own server: FastAPI + uvicorn):

  POST /v1/chat/completions   chat completions with images, streaming or not
  POST /v1/completions        plain text completions
  GET  /v1/models             the model served
  GET  /health                health check

Images are image_url parts: http(s) URLs, data:image/... URLs, or paths of local files. A chat with one image and no
text asks for its caption (the zero-shot prompt <image>); few-shot prompts are alternating user/assistant turns.
Requests name the model as served: "openflamingo-embedded" by default, else the --model argument as given.

  openflamingo serve
  openflamingo serve --model ./OpenFlamingo-3B-hf --device cuda --port 8080

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
  client.chat.completions.create(model="openflamingo-embedded", max_tokens=16, messages=[{"role": "user",
      "content": [{"type": "image_url", "image_url": {"url": "shapes.png"}}]}]).choices[0].message.content

The server listens on 127.0.0.1 (this machine only) unless --host says otherwise; it has no authentication.
Needs the serve extra: pip install 'openflamingo-hf[serve]'.
"""


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=PROG,
        description=DESCRIPTION,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=118),
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="NAME_PATH_OR_ID",
        help="The model to serve: openflamingo-embedded (default: the small model shipped with the package), "
        "openflamingo-embedded-video (its video variant), an OpenFlamingo model folder, or a Hub repo id. Requests "
        "name it in `model` as given here.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"Address to listen on (default: {DEFAULT_HOST}).")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"Port (default: {DEFAULT_PORT}).")
    parser.add_argument(
        "--device", default="auto", help="Where the model runs: auto (default), cpu, cuda or cuda:N."
    )
    parser.add_argument(
        "--dtype", default="auto", help="Model dtype, e.g. bfloat16 (default: auto, the dtype of the weights)."
    )
    parser.add_argument(
        "--log_level", "--log-level", default="info", choices=["debug", "info", "warning", "error"],
        help="Log level of the server's messages (default: info).",
    )
    parser.add_argument("--enable_cors", "--enable-cors", action="store_true", help="Allow requests from any origin.")
    return parser


def check_arguments(args: argparse.Namespace) -> None:
    """Everything cheap that can be wrong, before the model loads. Raises `UsageError`."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        raise UsageError(
            "serving needs FastAPI, uvicorn, pydantic and openai, which are not installed: "
            "pip install 'openflamingo-hf[serve]'."
        )
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {args.port}.")
    _check_address_is_free(args.host, args.port)
    if args.device != "auto":
        import torch

        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise UsageError(f"--device {args.device}: not a device; use auto, cpu, cuda or cuda:N.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here; use --device cpu.")
    if args.dtype != "auto":
        import torch

        if not isinstance(getattr(torch, args.dtype, None), torch.dtype):
            raise UsageError(f"--dtype {args.dtype}: not a torch dtype; use auto, float32, bfloat16 or float16.")
    source = shipped_models().get(args.model, args.model)
    if source != args.model and not os.path.isfile(os.path.join(source, "config.json")):
        raise UsageError(f"the shipped model {args.model} is missing from {source}; pass --model.")
    check_model_source("--model", source)
    if os.path.isdir(source):
        import json

        with open(os.path.join(source, "config.json"), encoding="utf-8") as file:
            model_type = json.load(file).get("model_type")
        if model_type != "openflamingo":
            raise UsageError(
                f"--model {args.model} is a {model_type!r} model, not an OpenFlamingo one; serve it with "
                "`transformers serve` instead."
            )


def _check_address_is_free(host: str, port: int) -> None:
    """Binds `host:port` (and lets it go) as uvicorn will, so that a taken port fails before the model loads."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UsageError(f"--host {host}: not an address of this machine ({error.strerror}).") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as error:
            raise UsageError(
                f"cannot listen on {host}:{port} ({error.strerror}): choose another --port, or stop what uses it."
            ) from None


def main(argv: list[str] | None = None) -> int:
    """
    Entry point of `openflamingo serve`: serves until stopped (exit status 0). A usage problem, or a model that does
    not load, is one `openflamingo serve: error: ...` line and exit status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
    except UsageError as error:
        parser.error(str(error))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"{PROG}: warning: listening on {args.host}: anyone who can reach it can use the model (there is no "
              "authentication).", file=sys.stderr, flush=True)
    set_log_level(args.log_level)
    try:
        app, model_manager = build_app(args.model, device=args.device, dtype=args.dtype, enable_cors=args.enable_cors)
    except (RuntimeError, ValueError, OSError) as error:  # raised in the model's process or reading its files
        parser.error(f"--model {args.model} could not be loaded: {error}")
    try:
        run_server(app, model_manager, args.model, host=args.host, port=args.port, log_level=args.log_level)
    except RuntimeError as error:
        print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "OpenFlamingoChatCompletionHandler",
    "OpenFlamingoEngineClient",
    "OpenFlamingoModelLoader",
    "OpenFlamingoModelManager",
    "add_openai_error_bodies",
    "build_app",
    "build_parser",
    "check_messages",
    "main",
    "serve",
]
