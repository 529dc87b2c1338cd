"""`openflamingo serve`: transformers' OpenAI-compatible server with the shipped model, on 127.0.0.1, queried by the
real `openai` client. Answers equal `caption()`, streamed or not; bad requests get 4xx with a message and the server
goes on serving."""

import base64
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from openflamingo_hf.cli import main as cli_main  # noqa: E402
from openflamingo_hf.cli.serve import DEFAULT_HOST, build_parser  # noqa: E402
from openflamingo_hf.embedded import caption, make_examples  # noqa: E402

MODEL = "openflamingo-embedded"
STARTUP_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`openflamingo serve` in a subprocess on a free port (default host), stopped at the end of the module."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "openflamingo_hf.cli", "serve", "--port", str(port), "--device", "cpu"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not _healthy(base):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not come up (exit code {process.poll()}):\n{log_path.read_text()}")
            time.sleep(1)
        yield {"base": base, "port": port, "log": log_path}
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server['base']}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def examples():
    return make_examples(3, seed=1_000_017)


def _data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _image_message(url: str, text: str | None = None) -> list[dict]:
    content = [{"type": "image_url", "image_url": {"url": url}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def _ask(client, messages, **kwargs) -> str:
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, **kwargs)
    return response.choices[0].message.content


def test_listens_on_localhost_by_default(server):
    assert DEFAULT_HOST == "127.0.0.1"
    assert build_parser().parse_args([]).host == "127.0.0.1"
    assert f"Uvicorn running on http://127.0.0.1:{server['port']}" in server["log"].read_text()


def test_image_request_answers_as_caption(client, examples, tmp_path):
    expected = caption([e.image for e in examples])
    # A chat with one image and no text is the zero-shot caption prompt `<image>`, as caption() uses.
    assert _ask(client, _image_message(_data_url(examples[0].image))) == expected[0]
    path = tmp_path / "query.png"
    examples[1].image.save(path)
    assert _ask(client, _image_message(str(path))) == expected[1]
    assert _ask(client, _image_message(path.as_uri())) == expected[1]
    assert expected[0] == examples[0].caption  # the shipped model gets these held-out captions right


def test_image_and_question_answers_as_answer(client, examples):
    """An image then the text `Question:... Short answer:` is answer()'s prompt."""
    from openflamingo_hf.embedded import answer
    from openflamingo_hf.embedded.world import vqa_text

    example = examples[0]
    expected = answer([example.image], [example.question])[0]
    assert _ask(client, _image_message(_data_url(example.image), vqa_text(example.question))) == expected
    assert expected == example.answer


def test_streaming_gives_the_same_answer_in_pieces(client, examples):
    stream = client.chat.completions.create(
        model=MODEL, messages=_image_message(_data_url(examples[2].image)), max_tokens=16, temperature=0, stream=True
    )
    pieces = [chunk.choices[0].delta.content for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == caption([examples[2].image])[0]


def test_few_shot_chat_answers_as_the_processor_prompt(client, examples):
    """Alternating user/assistant turns are the few-shot prompt `<image>caption<|endofchunk|><image>`."""
    from openflamingo_hf.embedded import load_embedded_model

    model, processor = load_embedded_model()
    demo, query = examples[0], examples[1]
    messages = _image_message(_data_url(demo.image)) + [{"role": "assistant", "content": demo.caption}] + (
        _image_message(_data_url(query.image))
    )
    inputs = processor(images=[[demo.image, query.image]], text=[processor.few_shot_prompt([demo.caption], "")],
                       return_tensors="pt")
    expected = processor.post_process_generation(
        model.generate(**inputs, max_new_tokens=16, do_sample=False), inputs["input_ids"]
    )[0].strip()
    assert _ask(client, messages) == expected


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(client, examples, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    bad_requests = [
        (dict(model="no-such-model", messages=_image_message(_data_url(examples[0].image))), "no-such-model"),
        (dict(model=MODEL, messages=_image_message(str(corrupt))), "not a readable image file"),
        (dict(model=MODEL, messages=_image_message("data:image/png;base64,bm90IGFuIGltYWdl")), "image"),
        (dict(model=MODEL, messages=_image_message(str(tmp_path / "missing.png"))), "no image file"),
        # An <image> marker needs its image.
        (dict(model=MODEL, messages=[{"role": "user", "content": "<image>Output:"}]), "marker"),
        (dict(model=MODEL, messages=_image_message("")), "without a URL"),
        (dict(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]), "input_audio"),
        (dict(model=MODEL, messages=[]), "non-empty list"),
    ]
    for request, words in bad_requests:
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(max_tokens=8, **request)
        assert 400 <= caught.value.status_code < 500, request
        assert words in str(caught.value), (request, str(caught.value))
    # Still serving, with the same answers.
    assert _ask(client, _image_message(_data_url(examples[0].image))) == caption([examples[0].image])[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/folder"], "no such folder"),
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--device", "gpu"], "not a device"),
        (["--dtype", "float99"], "not a torch dtype"),
    ],
)
def test_usage_errors_are_one_line_with_exit_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["serve", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("openflamingo serve: error: ") and "\n" not in err and message in err


def test_a_taken_port_is_a_usage_error_before_the_model_loads(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(SystemExit) as exited:
            cli_main.main(["serve", "--port", str(taken.getsockname()[1])])
    assert exited.value.code == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_a_model_that_is_not_openflamingo_is_refused(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["serve", "--model", str(tmp_path)])
    assert exited.value.code == 2
    assert "not an OpenFlamingo one" in capsys.readouterr().err
