"""`ImageTextToTextPipeline` that also takes images alone (zero-shot captioning).

transformers 5 folded the `image-to-text` task into `image-text-to-text`, whose pipeline requires text with every
image. OpenFlamingo's zero-shot caption prompt is just `<image>`, so an image-only call has an obvious meaning: this
subclass gives each image an empty text, which `OpenFlamingoProcessor` turns into `<image>` (its "images without
markers" rule). Everything else — few-shot prompts, chat messages, batches, `generate_kwargs` — is the stock
pipeline.

Use it directly, `pipeline("image-to-text", model=model, processor=processor, pipeline_class=OpenFlamingoPipeline)`,
or through a Hub folder exported with `openflamingo_hf.export_for_hub`, whose `config.json` names this class for the
`image-to-text` task (`pipeline("image-to-text", model=repo_id, trust_remote_code=True)`).

This file imports nothing from the `openflamingo_hf` package: it is also shipped alone in remote-code Hub folders.
"""

from __future__ import annotations

from transformers import ImageTextToTextPipeline
from transformers.image_utils import valid_images


class OpenFlamingoPipeline(ImageTextToTextPipeline):
    """Image-text-to-text generation; `pipe(image)` / `pipe([image, ...])` caption each image zero-shot."""

    def __call__(self, images=None, text=None, **kwargs):
        if text is None and images is not None and valid_images(images):
            if isinstance(images, (list, tuple)):
                # A list of images is a batch of one-image samples, each captioned on its own.
                images, text = [[image] for image in images], [""] * len(images)
            else:
                text = ""
        return super().__call__(images=images, text=text, **kwargs)


__all__ = ["OpenFlamingoPipeline"]
