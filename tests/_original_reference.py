"""The original OpenFlamingo's numbers for tests/test_vs_original.py (not a test module: pytest does not collect it).

Run by that test with `.venv-original/bin/python` (open-flamingo 2.0.1 on transformers 4.36.2, made by
`scripts/setup_original_env.sh`): `python tests/_original_reference.py request.json`. For each language-model
family of the request it builds the original model with the original's own `create_model_and_transforms` (through
`benchmarks/_original_worker.py`'s `Worker.build`: random backbones, gates opened to 0.5, the state dict saved for
the converter), then records, on the request's inputs:

- `logits`: one forward of `Flamingo` on a batch of interleaved prompts;
- `tokens`: greedy `Flamingo.generate`, new tokens only;
- `losses`: two steps of the original's own `train_one_epoch` (one LAION and one MMC4 batch each), each step's
  per-stream losses: the first step's show the loss, the second's the update the first step made.

Everything is written with `torch.save` to the request's `out` path.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from _original_worker import Worker  # noqa: E402  (beside the benchmark)


def main(request_path: str) -> int:
    import torch

    request = json.loads(Path(request_path).read_text())
    torch.set_num_threads(request.get("threads", 1))
    results = {}
    for name, shape in request["families"].items():
        worker = Worker()
        meta = worker.build({"shape": shape, "workdir": str(Path(request["workdir"]) / name), "seed": 0})
        worker.load_inputs({"path": request["inputs"]})
        ids, pixels = worker.inputs["gen_ids"], worker.inputs["gen_pixels"]
        with torch.no_grad():
            logits = worker.model(vision_x=pixels, lang_x=ids, attention_mask=torch.ones_like(ids)).logits
        tokens = worker.generate({"input": "gen", "batch": ids.shape[0], "return_tokens": True,
                                  "generate_kwargs": request["generate_kwargs"]})["tokens"]
        worker.train_setup({"bf16": False})
        losses = [worker.train_step({})["losses"] for _ in range(request["train_steps"])]
        results[name] = {"meta": meta, "logits": logits, "tokens": tokens, "losses": losses}
    torch.save(results, request["out"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
