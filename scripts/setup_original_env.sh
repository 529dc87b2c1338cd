#!/usr/bin/env bash
# Creates .venv-original: the original OpenFlamingo (open-flamingo==2.0.1) in its own environment, for
# benchmarks/bench_vs_original.py. Safe to re-run: an environment that already imports everything is left alone.
#
# Why its own venv: the original's generate() fails on transformers 5 (this package's), so it runs on
# transformers==4.36.2. open-flamingo pins torch==2.0.1 and sentencepiece==0.1.98, neither of which is needed (or,
# for torch 2.0.1, installable next to Python 3.11's local CPU wheel), so it is installed with --no-deps together with
# the dependencies it really imports:
#   - torch: the local CPU wheel torch==2.13.0 when the machine has it (the same torch as .venv, so both sides of the
#     benchmark run the same kernels and torch.save files pass between them), otherwise any torch >= 2.1;
#   - torchvision (open_clip imports it): the build that matches the installed torch, --no-deps so that pip never
#     swaps torch for a CUDA build. PyPI's Linux torchvision is a CUDA build whose C++ ops cannot load beside the CPU
#     torch, and it then fails at import; benchmarks/_original_worker.py works around that when it imports the
#     original (open_clip only needs torchvision's Python transforms), so nothing installed here is patched;
#   - open_clip_torch==2.20.0, the release of open-flamingo 2.0.1's time: its ViT returns the patch tokens *before*
#     ln_post, as OpenFlamingo was trained (open_clip >= 2.23 applies ln_post to the tokens by default);
#   - einops, einops-exts (the Perceiver and gated blocks), plus open_clip's own imports (ftfy, regex, tqdm,
#     huggingface-hub); numpy < 2 because transformers 4.36 predates NumPy 2;
#   - what the original's evaluation code imports, for tests/test_eval_vs_original.py (which runs its metrics and
#     answer post-processing): pycocoevalcap==1.2 and pycocotools (coco_metric.py, CIDEr), nltk and inflection
#     (ok_vqa_utils.py, OK-VQA stemming), scikit-learn (evaluate.py, ROC-AUC; open-flamingo's `eval` extra omits it).
#     NLTK's data (tokenizer, tagger, WordNet) is not on PyPI and is not installed here; CIDEr also needs Java.
# Set PYTHON to choose the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-original
VPY=$VENV/bin/python

check() {
    # The versions, then the imports through the benchmark's worker (it applies the torchvision workaround below).
    "$VPY" - <<'EOF' 2>/dev/null && "$VPY" benchmarks/_original_worker.py --check 2>/dev/null
import importlib.metadata as m
import einops, einops_exts, transformers  # noqa: F401
import inflection, nltk, pycocoevalcap.cider.cider, pycocotools.coco, sklearn.metrics  # noqa: F401
assert transformers.__version__ == "4.36.2", transformers.__version__
assert m.version("open_flamingo") == "2.0.1"
assert m.version("open_clip_torch") == "2.20.0"
assert m.version("pycocoevalcap") == "1.2"
EOF
}

if [ -x "$VPY" ] && check; then
    echo "$VENV is ready ($("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))."
    exit 0
fi
if [ ! -x "$VPY" ]; then
    "$PY" -m venv "$VENV"
fi
PIP=("$VPY" -m pip install -q)
"$VPY" -m pip install -q --upgrade pip 2>/dev/null || true
if ! "$VPY" -c "import torch" 2>/dev/null; then
    if ! "${PIP[@]}" "torch==2.13.0" 2>/dev/null; then
        "${PIP[@]}" "torch>=2.1"
    fi
fi
TORCH=$("$VPY" -c 'import torch; print(torch.__version__.split("+")[0])')
# torch 2.x.y pairs with torchvision 0.(x+15).y; fall back to "the newest that installs" if the pair is missing.
TV=$("$VPY" -c 'import sys; a, b, c = (sys.argv[1].split(".") + ["0"])[:3]; print(f"0.{int(b) + 15}.{c}")' "$TORCH")
"${PIP[@]}" --no-deps "torchvision==$TV" 2>/dev/null || "${PIP[@]}" --no-deps "torchvision==${TV%.*}.*"
"${PIP[@]}" "transformers==4.36.2" "numpy<2" einops einops-exts ftfy regex tqdm pillow \
    "pycocoevalcap==1.2" pycocotools nltk inflection scikit-learn
"${PIP[@]}" --no-deps "open_clip_torch==2.20.0" "open-flamingo==2.0.1"
if ! check; then
    echo "setup_original_env.sh: $VENV was built but does not import open_flamingo / open_clip / transformers 4.36.2" \
        "/ the evaluation's pycocoevalcap, pycocotools, nltk, inflection, scikit-learn." >&2
    exit 1
fi
echo "$VENV is ready ($("$VPY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))."
