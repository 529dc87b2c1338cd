"""Hub export (tiny models, no network): remote-code folders load where openflamingo_hf is not importable, loading by
repo id out of a Hugging Face cache, what push_to_hub would upload, and the export's error paths."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import site
import subprocess
import sys
import textwrap
import tomllib
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, scan_cache_dir
from huggingface_hub.errors import EntryNotFoundError
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.utils.sha import git_hash
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM, pipeline

import openflamingo_hf
from openflamingo_hf import OpenFlamingoConfig, OpenFlamingoForConditionalGeneration, OpenFlamingoProcessor
from openflamingo_hf.cli.export import main
from openflamingo_hf.hub import CODE_FILES, ExportError, export_for_hub, push_export_to_hub
from openflamingo_hf.pipeline_openflamingo import OpenFlamingoPipeline
from openflamingo_hf.testing_utils import build_tiny_model_and_processor, make_image
from openflamingo_hf.tiny_models import tiny_openflamingo_config, tiny_text_config

# The directory that puts `openflamingo_hf` on sys.path (the editable install's .pth entry: <checkout>/src).
PACKAGE_ROOT = Path(openflamingo_hf.__file__).resolve().parent.parent
PROMPT = "<image>Output:a cat.<|endofchunk|><image>Output:"
SHIPPED_CODE = set(CODE_FILES) | {"pipeline_openflamingo.py"}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}
PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
PIPELINE_KWARGS = dict(generate_kwargs=dict(max_new_tokens=4, do_sample=False))

# Run in a fresh interpreter: loads each job's model and processor with the Auto classes, runs the processor and the
# model on the job's prompt and images and saves what came out. With "hide_package" the editable install's path (and
# any meta-path finder that would find the package) is removed before anything is imported, and the script checks
# that `import openflamingo_hf` really fails.
RUNNER = textwrap.dedent(
    r'''
    import importlib.util, json, os, sys
    spec = json.load(open(sys.argv[1]))
    if spec["hide_package"] == "block":
        # The package sits in site-packages next to torch and transformers (a regular install): block it by name.
        class BlockPackage:
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] == "openflamingo_hf":
                    raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
                return None
        sys.meta_path.insert(0, BlockPackage())
    elif spec["hide_package"]:
        # Editable install (a path entry in a .pth file) or PYTHONPATH: drop the folder that holds the package.
        hidden = os.path.realpath(spec["package_root"])
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != hidden]
        for finder in list(sys.meta_path):  # editable installs made with an import hook instead of a path entry
            if type(finder).__module__ not in ("_frozen_importlib", "_frozen_importlib_external"):
                try:
                    found = finder.find_spec("openflamingo_hf", None) is not None
                except Exception:
                    found = False
                if found:
                    sys.meta_path.remove(finder)
        if spec["hide_package"] != "block":
            assert importlib.util.find_spec("openflamingo_hf") is None, "openflamingo_hf is still importable"
        try:
            import openflamingo_hf
        except ModuleNotFoundError:
            pass
        else:
            raise AssertionError(f"openflamingo_hf was imported from {openflamingo_hf.__file__}")
    else:
        import openflamingo_hf  # registers the Auto classes for plain folders

    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, pipeline
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    torch.set_num_threads(1)  # the parent computes its reference with one thread too: same reduction order

    def never(*args, **kwargs):
        raise AssertionError("the processor fell back to the package's default chat template")

    for job in spec["jobs"]:
        source, kwargs = job["source"], ({"trust_remote_code": True} if job["trust_remote_code"] else {})
        if job["trust_remote_code"]:
            # A saved processor carries its chat template: the default-template path (which reads a file of the
            # package) must not run. Loading the class first lets us trip-wire its module.
            processor_class = get_class_from_dynamic_module(
                "processing_openflamingo.OpenFlamingoProcessor", source
            )
            sys.modules[processor_class.__module__].load_default_chat_template = never
        config = AutoConfig.from_pretrained(source, **kwargs)
        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs).eval()
        processor = AutoProcessor.from_pretrained(source, **kwargs)
        if job["trust_remote_code"]:
            assert type(processor) is processor_class  # the trip-wired module
        images = [Image.open(path) for path in job["images"]]
        inputs = processor(images=images, text=job["prompt"], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits
        result = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "pixel_values": inputs["pixel_values"],
            "logits": logits,
            "chat_template": processor.chat_template,
            "generation_eos": model.generation_config.eos_token_id,
            "modules": {
                "config": type(config).__module__,
                "model": type(model).__module__,
                "language_model": type(model.language_model).__module__,
                "processor": type(processor).__module__,
            },
        }
        if job.get("resave"):
            # A model loaded from remote code, saved again and reloaded (save_pretrained writes the auto_map itself).
            model.save_pretrained(job["resave"])
            processor.save_pretrained(job["resave"])
            again = AutoModelForImageTextToText.from_pretrained(job["resave"], **kwargs).eval()
            with torch.no_grad():
                result["resaved_logits"] = again(**inputs).logits
        if job.get("pipeline"):
            pipe = pipeline("image-to-text", model=source, **kwargs)
            result["pipeline_class"] = type(pipe).__module__ + "." + type(pipe).__name__
            result["pipeline"] = pipe(images[0], **spec["pipeline_kwargs"])
        torch.save(result, job["out"])
    '''
)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[str]:
    """Two images saved as PNG (lossless): the subprocess reads exactly the pixels the parent reads."""
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for seed in range(2):
        path = folder / f"image{seed}.png"
        make_image(seed).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def llama():
    return build_tiny_model_and_processor("llama", seed=0, gate=0.5)


@pytest.fixture(scope="module")
def mosaic():
    return build_tiny_model_and_processor("mosaic_gpt", seed=1, gate=0.5)


@contextmanager
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference(model, processor, image_paths) -> dict:
    """What the source model and processor give in this process."""
    images = [Image.open(path) for path in image_paths]
    inputs = processor(images=images, text=PROMPT, return_tensors="pt")
    with single_thread(), torch.no_grad():
        logits = model(**inputs).logits
    return {**inputs, "logits": logits}


def run_in_subprocess(
    tmp_path: Path, jobs: list[dict], *, hide_package: bool | str, env: dict | None = None
) -> list[dict]:
    spec_path = tmp_path / "spec.json"
    if hide_package and str(PACKAGE_ROOT) in map(str, map(os.path.realpath, site.getsitepackages())):
        hide_package = "block"  # a regular install: removing its folder from sys.path would remove torch too
    spec = {"hide_package": hide_package, "package_root": str(PACKAGE_ROOT), "jobs": jobs,
            "pipeline_kwargs": PIPELINE_KWARGS}
    spec_path.write_text(json.dumps(spec))
    # Nothing may reach the network, and the dynamic-module cache of transformers goes to the temp folder.
    home = tmp_path / "hf_home"
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(home), "HF_MODULES_CACHE": str(home / "modules"),
                **(env or {})}
    completed = subprocess.run(
        [sys.executable, "-c", RUNNER, str(spec_path)],
        cwd=tmp_path,  # not the checkout: the current folder is on sys.path of `python -c`
        env=full_env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, f"subprocess failed:\n{completed.stdout}\n{completed.stderr}"
    return [torch.load(job["out"], weights_only=False) for job in jobs]


def assert_same_outputs(result: dict, expected: dict) -> None:
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(result[key], expected[key]), key
    assert torch.equal(result["logits"], expected["logits"])


LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".onnx")


def install_in_hf_cache(folder: Path, cache_dir: Path, repo_id: str) -> str:
    """
    Lays `folder` out in `cache_dir` as `hf_hub_download` / `snapshot_download` would have after downloading it from
    `repo_id` at some commit: `models--org--name/blobs/<etag>` holding the contents (etag = sha256 for LFS files,
    the git blob sha1 otherwise, as the Hub reports them), `snapshots/<commit>/<file>` as relative symlinks to the
    blobs and `refs/main` holding the commit hash. Returns the commit hash.
    """
    repo_dir = cache_dir / repo_folder_name(repo_id=repo_id, repo_type="model")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files))
    commit = commit.hexdigest()
    for path in files:
        data = path.read_bytes()
        is_lfs = path.suffix in LFS_SUFFIXES or len(data) > 10 * 2**20
        etag = hashlib.sha256(data).hexdigest() if is_lfs else git_hash(data)
        blob = repo_dir / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        pointer = repo_dir / "snapshots" / commit / path.relative_to(folder)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, pointer.parent), pointer)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return commit


# ----------------------------------------------------------------------------------------------------------------------
# Folder contents
# ----------------------------------------------------------------------------------------------------------------------


def test_remote_code_folder_contents(llama, tmp_path):
    model, processor = llama
    folder = export_for_hub(model, processor, tmp_path / "out")
    assert {p.name for p in folder.iterdir()} == MODEL_FILES | PROCESSOR_FILES | SHIPPED_CODE
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_openflamingo.OpenFlamingoConfig",
        "AutoModel": "modeling_openflamingo.OpenFlamingoModel",
        "AutoModelForImageTextToText": "modeling_openflamingo.OpenFlamingoForConditionalGeneration",
    }
    assert config["custom_pipelines"] == {
        "image-to-text": {
            "impl": "pipeline_openflamingo.OpenFlamingoPipeline",
            "pt": ["AutoModelForImageTextToText"],
            "type": "multimodal",
        }
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_openflamingo.OpenFlamingoProcessor"}
    # The code is the installed package's, byte for byte.
    for name, module in CODE_FILES.items():
        source = Path(sys.modules[module].__file__)
        assert (folder / name).read_bytes() == source.read_bytes(), name

    # Nothing global changed: a later ordinary save is still a plain one.
    for cls in (OpenFlamingoForConditionalGeneration, OpenFlamingoConfig, OpenFlamingoProcessor):
        assert cls._auto_class is None
    assert getattr(model.config, "auto_map", None) is None
    model.save_pretrained(tmp_path / "plain_save")
    processor.save_pretrained(tmp_path / "plain_save")
    assert not list((tmp_path / "plain_save").glob("*.py"))
    assert "auto_map" not in json.loads((tmp_path / "plain_save" / "config.json").read_text())
    assert "auto_map" not in json.loads((tmp_path / "plain_save" / "processor_config.json").read_text())


def test_plain_folder_contents(llama, tmp_path):
    model, processor = llama
    folder = export_for_hub(model, processor, tmp_path / "out", remote_code=False)
    assert {p.name for p in folder.iterdir()} == MODEL_FILES | PROCESSOR_FILES
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        assert "auto_map" not in data and "custom_pipelines" not in data, name


def test_sharded_export(llama, tmp_path):
    model, processor = llama
    folder = export_for_hub(model, processor, tmp_path / "out", max_shard_size="300KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert not (folder / "model.safetensors").exists()
    assert set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values()) == set(shards)


def test_generation_config_stops_at_endofchunk_when_the_model_has_none(tmp_path):
    _, processor = build_tiny_model_and_processor("llama", gate=None)
    config = tiny_openflamingo_config("llama")
    config.text_config = tiny_text_config("llama", vocab_size=len(processor.tokenizer))
    processor.update_model_config(config)
    model = OpenFlamingoForConditionalGeneration(config).eval()
    # The model owns its generation settings (openflamingo_generation_config); the export saves what it holds.
    assert model.generation_config.eos_token_id == processor.eoc_token_id
    folder = export_for_hub(model, processor, tmp_path / "derived")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == processor.eoc_token_id
    assert generation["pad_token_id"] == processor.tokenizer.pad_token_id
    assert not generation.get("_from_model_config")  # not marked as derived, so loading keeps it as it is

    # A generation config the user chose is kept as it is.
    model.generation_config.eos_token_id = [processor.eoc_token_id, processor.tokenizer.eos_token_id]
    folder = export_for_hub(model, processor, tmp_path / "own")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [processor.eoc_token_id, processor.tokenizer.eos_token_id]


# ----------------------------------------------------------------------------------------------------------------------
# Loading without the package
# ----------------------------------------------------------------------------------------------------------------------


def test_remote_code_folder_loads_without_the_package(llama, mosaic, image_paths, tmp_path):
    jobs, expected = [], []
    for name, (model, processor) in (("llama", llama), ("mosaic_gpt", mosaic)):
        assert all(block.attn_gate.item() == 0.5 for block in model.gated_cross_attn_layers.values())
        folder = export_for_hub(model, processor, tmp_path / f"of-{name}")
        jobs.append({"source": str(folder), "trust_remote_code": True, "prompt": PROMPT, "images": image_paths,
                     "out": str(tmp_path / f"{name}.pt"), "pipeline": name == "llama",
                     "resave": str(tmp_path / f"resaved-{name}") if name == "mosaic_gpt" else None})
        expected.append(reference(model, processor, image_paths))
        # The comparison covers the image path: other images give other logits.
        assert not torch.equal(reference(model, processor, image_paths[::-1])["logits"], expected[-1]["logits"])
    results = run_in_subprocess(tmp_path, jobs, hide_package=True)

    model, processor = llama
    # (Task name of the stock pipeline: transformers 5.24 logs the `image-to-text` redirect with a malformed call.)
    pipe = pipeline("image-text-to-text", model=model, processor=processor, pipeline_class=OpenFlamingoPipeline)
    expected_caption = pipe(Image.open(image_paths[0]), **PIPELINE_KWARGS)
    for (name, (model, processor)), result, reference_outputs in zip(
        (("llama", llama), ("mosaic_gpt", mosaic)), results, expected
    ):
        # The classes came from the folder's code (transformers_modules.<folder>.<hash>), not from a package; the
        # MosaicGPT language model too, Llama from transformers itself.
        modules = result["modules"]
        assert all(modules[key].startswith("transformers_modules.") for key in ("config", "model", "processor"))
        expected_lm_module = "transformers_modules." if name == "mosaic_gpt" else "transformers.models.llama."
        assert modules["language_model"].startswith(expected_lm_module), modules
        assert_same_outputs(result, reference_outputs)
        assert result["chat_template"] == processor.chat_template
        assert result["generation_eos"] == processor.eoc_token_id
    assert torch.equal(results[1]["resaved_logits"], results[1]["logits"])
    assert results[0]["pipeline_class"].endswith("pipeline_openflamingo.OpenFlamingoPipeline")
    assert results[0]["pipeline"] == expected_caption


# ----------------------------------------------------------------------------------------------------------------------
# Loading by repo id out of a Hugging Face cache
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("remote_code", [False, True], ids=["plain", "remote_code"])
def test_load_by_repo_id_from_hf_cache(llama, image_paths, tmp_path, remote_code):
    model, processor = llama
    repo_id = f"openflamingo-test/tiny-{'remote' if remote_code else 'plain'}"
    folder = export_for_hub(model, processor, tmp_path / "export", remote_code=remote_code)
    cache = tmp_path / "hub_cache"
    commit = install_in_hf_cache(folder, cache, repo_id)

    # huggingface_hub's own cache scanner accepts the layout.
    info = scan_cache_dir(cache)
    assert not info.warnings
    (repo,) = info.repos
    assert repo.repo_id == repo_id and repo.repo_type == "model"
    (revision,) = repo.revisions
    assert revision.commit_hash == commit and revision.refs == frozenset({"main"})
    assert {f.file_name for f in revision.files} == {p.name for p in folder.iterdir()}

    job = {"source": repo_id, "trust_remote_code": remote_code, "prompt": PROMPT, "images": image_paths,
           "out": str(tmp_path / "out.pt")}
    (result,) = run_in_subprocess(tmp_path, [job], hide_package=remote_code, env={"HF_HUB_CACHE": str(cache)})
    assert_same_outputs(result, reference(model, processor, image_paths))
    if remote_code:
        # The code was taken from the cached snapshot: transformers_modules.<org>.<name>.<commit>.modeling_...
        assert result["modules"]["model"].startswith("transformers_modules.openflamingo")
        assert f".{commit}.modeling_openflamingo" in result["modules"]["model"]
    else:
        assert result["modules"]["model"].startswith("openflamingo_hf.")


# ----------------------------------------------------------------------------------------------------------------------
# push_to_hub, intercepted at the HfApi boundary
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch):
    """
    Replaces the HfApi calls that would reach the Hub and records what they were given. Uploads are recorded as
    {path_in_repo: bytes} per commit. Any HTTP request that still gets through fails the test.
    """
    calls = SimpleNamespace(repos=[], branches=[], commits=[])

    def create_repo(self, repo_id, **kwargs):
        calls.repos.append((repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, branch, **kwargs):
        calls.branches.append((repo_id, branch))

    def record_commit(repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        calls.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0", oid="0" * 40)

    def create_commit(self, repo_id, operations, **kwargs):
        return record_commit(repo_id, operations, **kwargs)

    def pipelined_upload(api, *, repo_id, add_operations, delete_operations, **kwargs):
        # upload_folder's path when hf_xet is installed; the single-commit path calls create_commit.
        assert not delete_operations
        return record_commit(repo_id, add_operations, **kwargs)

    def no_model_card(cls, repo_id_or_path, *args, **kwargs):
        # transformers looks for an existing model card on the Hub first; there is none.
        raise EntryNotFoundError(f"{repo_id_or_path} has no README.md")

    def no_network(*args, **kwargs):
        raise AssertionError("an HTTP request was sent")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    if importlib.util.find_spec("huggingface_hub._upload_pipeline") is not None:  # huggingface_hub >= 2
        monkeypatch.setattr("huggingface_hub._upload_pipeline.pipelined_upload", pipelined_upload)
    monkeypatch.setattr(ModelCard, "load", classmethod(no_model_card))
    for module_name in ("httpx2", "httpx"):  # huggingface_hub 2.x sends through httpx2, 1.x through httpx
        if importlib.util.find_spec(module_name) is not None:
            module = importlib.import_module(module_name)
            monkeypatch.setattr(module.HTTPTransport, "handle_request", no_network)
    return calls


def test_model_and_processor_push_to_hub(llama, hub_calls):
    model, processor = llama
    model.push_to_hub("org/tiny-openflamingo")
    processor.push_to_hub("org/tiny-openflamingo")
    assert [repo for repo, _ in hub_calls.repos] == ["org/tiny-openflamingo"] * 2
    model_commit, processor_commit = hub_calls.commits
    assert set(model_commit["files"]) == MODEL_FILES | {"README.md"}
    assert set(processor_commit["files"]) == PROCESSOR_FILES | {"README.md"}
    assert json.loads(model_commit["files"]["config.json"])["model_type"] == "openflamingo"
    assert json.loads(processor_commit["files"]["processor_config.json"])["processor_class"] == "OpenFlamingoProcessor"

    model.push_to_hub("org/tiny-openflamingo", max_shard_size="300KB")
    shards = {name for name in hub_calls.commits[-1]["files"] if name.endswith(".safetensors")}
    assert len(shards) > 1 and all(name.startswith("model-0") for name in shards)
    assert set(hub_calls.commits[-1]["files"]) == (MODEL_FILES - {"model.safetensors"}) | shards | {
        "model.safetensors.index.json",
        "README.md",
    }


@pytest.mark.parametrize("remote_code", [True, False], ids=["remote_code", "plain"])
def test_push_export_to_hub(llama, hub_calls, tmp_path, remote_code):
    model, processor = llama
    folder = export_for_hub(model, processor, tmp_path / "export", remote_code=remote_code)
    info = push_export_to_hub(folder, "org/tiny-openflamingo", private=True)
    assert info.commit_url.startswith("https://huggingface.co/org/tiny-openflamingo")
    assert hub_calls.repos == [("org/tiny-openflamingo", {"private": True, "token": None, "exist_ok": True})]
    (commit,) = hub_calls.commits
    expected = MODEL_FILES | PROCESSOR_FILES | (SHIPPED_CODE if remote_code else set())
    assert set(commit["files"]) == expected
    for name, content in commit["files"].items():
        assert content == (folder / name).read_bytes(), name


def test_push_export_to_hub_needs_an_exported_folder(tmp_path, hub_calls):
    with pytest.raises(ExportError, match="no config.json"):
        push_export_to_hub(tmp_path, "org/name")
    assert not hub_calls.repos


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------


def test_non_empty_output_folder(llama, tmp_path):
    model, processor = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=r"not empty \(it holds notes.txt\).*overwrite=True"):
        export_for_hub(model, processor, out)
    assert (out / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left behind

    export_for_hub(model, processor, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()


def test_backbone_the_remote_code_cannot_build(tmp_path):
    class CustomLMConfig(LlamaConfig):
        model_type = "ofhf_custom_lm"

    class CustomLM(LlamaForCausalLM):
        config_class = CustomLMConfig

    text_config = CustomLMConfig(**{k: v for k, v in tiny_text_config("llama").to_dict().items() if k != "model_type"})
    config = tiny_openflamingo_config("llama")
    config.text_config = text_config
    model = OpenFlamingoForConditionalGeneration(config, language_model=CustomLM(text_config)).eval()
    processor = OpenFlamingoProcessor(tokenizer=build_tiny_model_and_processor("llama")[1].tokenizer)
    config.media_token_id, config.eoc_token_id = processor.image_token_id, processor.eoc_token_id
    model.resize_token_embeddings(len(processor.tokenizer))

    with pytest.raises(ExportError, match="model_type 'ofhf_custom_lm'.*--no-remote-code"):
        export_for_hub(model, processor, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # The plain folder is fine: it loads wherever the custom type is registered.
    export_for_hub(model, processor, tmp_path / "out", remote_code=False)


def test_model_and_processor_must_agree(llama, tmp_path):
    model, _ = llama
    _, other = build_tiny_model_and_processor("llama")
    other.image_token_id = model.config.media_token_id + 1
    with pytest.raises(ExportError, match="media_token_id=.*update_model_config"):
        export_for_hub(model, other, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------


def test_cli(llama, tmp_path, capsys, hub_calls):
    # The entry point as pyproject.toml declares it (the installed metadata may come from another checkout).
    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["openflamingo-export"] == "openflamingo_hf.cli.export:main"

    model, processor = llama
    source = tmp_path / "converted"
    model.save_pretrained(source)
    processor.save_pretrained(source)

    assert main(["--model", str(source), "--output", str(tmp_path / "remote")]) == 0
    assert SHIPPED_CODE <= {p.name for p in (tmp_path / "remote").iterdir()}
    assert main(["--model", str(source), "--output", str(tmp_path / "plain"), "--no-remote-code"]) == 0
    assert {p.name for p in (tmp_path / "plain").iterdir()} == MODEL_FILES | PROCESSOR_FILES

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # parser.error (tests/test_cli_errors.py has every kind)
        main(["--model", str(source), "--output", str(tmp_path / "plain")])
    assert exit_info.value.code == 2
    assert "not empty" in capsys.readouterr().err

    assert main(["--model", str(source), "--output", str(tmp_path / "pushed"), "--push-to-hub", "org/name"]) == 0
    (commit,) = hub_calls.commits
    assert commit["repo_id"] == "org/name" and set(commit["files"]) == {p.name for p in (tmp_path / "pushed").iterdir()}
