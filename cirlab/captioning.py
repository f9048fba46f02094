"""`+task=caption`: FTI4CIR's training file from an image folder, written by a BLIP captioner.

FTI4CIR trains on images with one caption each, split into a subject and an attribute part; the
authors captioned ImageNet's test images with BLIP (their blip_caption.py) and shipped the result as
`blip_pairs.json`. This task writes the same file for any image folder: BLIP's decoder with the
reference's generation settings (beam search, 3 beams, 10-25 tokens, prompt "a picture of " removed from
the output), the caption split at its first noun by the method's rule, one entry per kept image:
`[{"img_id": <file stem>, "subject": ..., "attribute": ...}, ...]`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from cirlab.errors import CirlabError

PROMPT = "a picture of "  # BLIP's captioning prompt; its decoder strips it from what it returns
GENERATION = {"num_beams": 3, "max_length": 25, "min_length": 10}  # blip_caption.py's generate()


def load_captioner(name: str):
    """A BLIP captioning model (HF `BlipForConditionalGeneration`) and its tokenizer: a hub id (e.g.
    `Salesforce/blip-image-captioning-base`, through the HF cache) or a save_pretrained folder."""
    from transformers import BlipForConditionalGeneration

    from cirlab.backbones.blip import hub_snapshot, is_hub_id, load_tokenizer

    if is_hub_id(name):
        advice = (
            f"Download it once where there is network (`hf download {name}`) into the HF cache this "
            "machine reads (HF_HOME), or give a save_pretrained folder: +captioner=/path/to/dir"
        )
        folder = hub_snapshot(name, ["*.json", "*.txt", "*.safetensors"], "the BLIP captioner", advice)
    else:
        folder = Path(name).expanduser()
        if not (folder / "config.json").is_file():
            raise CirlabError(
                f"+captioner={name} is not a BLIP captioning model folder saved with save_pretrained "
                "(no config.json in it); give such a folder or a hub id"
            )
    return BlipForConditionalGeneration.from_pretrained(folder).eval(), load_tokenizer(folder, "+captioner")


@torch.no_grad()
def caption_batch(model, tokenizer, pixels: torch.Tensor, prompt: str = PROMPT) -> list[str]:
    """One caption per image: beam search from the prompt, the prompt removed from each output. As
    BLIP's generate: the prompt is tokenised with [CLS] ... [SEP]; HF's swaps [CLS] for [DEC] and drops
    the [SEP], as BLIP's own code does."""
    ids = tokenizer([prompt] * len(pixels), return_tensors="pt").input_ids
    out = model.generate(pixel_values=pixels, input_ids=ids, **GENERATION)
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    start = prompt.strip()
    return [t.strip()[len(start) :].strip() if t.strip().startswith(start) else t.strip() for t in texts]


def caption_folder(cfg: DictConfig) -> None:
    """`cirlab +task=caption +images=DIR +out=FILE [+captioner=HUB_ID|DIR] [+tagger=spacy|synthetic]`:
    caption every image under DIR, split each caption, write FTI4CIR's JSON."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from cirlab.data.image_files import list_images
    from cirlab.data.images import load_image
    from cirlab.data.pos_tags import make_tagger
    from cirlab.data.transforms import build_transform
    from cirlab.io import write_json
    from cirlab.methods.fti4cir import split_caption

    if not cfg.get("images") or not cfg.get("out"):
        raise CirlabError(
            "name the image folder and the file to write: cirlab +task=caption +images=DIR +out=pairs.json "
            "[+captioner=Salesforce/blip-image-captioning-base] [+tagger=spacy]"
        )
    paths = list_images(cfg.images)
    if not paths:
        raise CirlabError(f"+images={cfg.images} holds no image files")
    tagger = make_tagger(cfg.get("tagger") or "spacy")
    model, tokenizer = load_captioner(cfg.get("captioner") or "Salesforce/blip-image-captioning-base")
    size = model.config.vision_config.image_size
    # blip_caption.py: targetpad 1.25 at the captioner's image size, CLIP's mean/std
    transform = build_transform("targetpad", size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    batch = 32
    pairs, dropped = [], 0
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        pixels = torch.stack([transform(load_image(p)) for p in chunk])
        for path, caption in zip(chunk, caption_batch(model, tokenizer, pixels), strict=True):
            subject, attribute = split_caption(caption, tagger)
            if subject == attribute:  # too short to split: the reference leaves the image out
                dropped += 1
                continue
            pairs.append({"img_id": path.stem, "subject": subject, "attribute": attribute})
        print(f"captioned {min(i + batch, len(paths))}/{len(paths)} images", flush=True)
    write_json(cfg.out, pairs, indent=1)
    print(f"wrote {cfg.out}: {len(pairs)} images ({dropped} captions could not be split and were left out)")
