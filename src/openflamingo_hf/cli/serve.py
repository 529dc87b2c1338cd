"""`openflamingo serve`: an OpenAI-compatible chat-completions endpoint for an OpenFlamingo model.

    openflamingo serve                                      # the shipped model, on http://127.0.0.1:8000/v1
    openflamingo serve --model ./OpenFlamingo-3B-hf --port 8080 --device cuda

It is transformers' own server (`transformers serve`: FastAPI + uvicorn, `transformers.cli.serving`) with one model
pinned, built from that package's public classes. `transformers serve` itself cannot serve OpenFlamingo: it loads a
model by looking its `config.architectures[0]` up on the `transformers` module, and picks a model's modality (text,
image, ...) from transformers' built-in tables, where neither registered nor remote-code classes appear. So
`openflamingo_hf.cli.serve_app` subclasses the classes that do that (no transformers class is patched):

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

from .parsing import OneLineArgumentParser, UsageError, check_model_source

PROG = "openflamingo serve"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_MODEL = "openflamingo-embedded"  # see shipped_models()


def shipped_models() -> dict[str, str]:
    """The shipped models, by the name a request gives in `model`: name -> folder."""
    from ..embedded import EMBEDDED_MODEL_DIR, EMBEDDED_VIDEO_MODEL_DIR

    return {"openflamingo-embedded": EMBEDDED_MODEL_DIR, "openflamingo-embedded-video": EMBEDDED_VIDEO_MODEL_DIR}


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
    parser = OneLineArgumentParser(prog=PROG, description=DESCRIPTION)
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
    try:
        from .serve_app import build_app, run_server, set_log_level
    except ImportError as error:  # transformers' serving code is missing (too old a transformers)
        parser.error(f"transformers' serving code cannot be imported ({error}); install transformers >= 5.25 and the "
                     "serve extra: pip install 'openflamingo-hf[serve]'.")
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


__all__ = ["DEFAULT_HOST", "DEFAULT_MODEL", "DEFAULT_PORT", "build_parser", "check_arguments", "main",
           "shipped_models"]
