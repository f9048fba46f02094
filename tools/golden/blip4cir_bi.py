"""Golden files for BLIP4CIR+Bi (tests/golden/blip4cir_bi/), made by the authors' own code.

Never imported by cirlab or its tests. Run once, after tools/golden/blip.py, in the same scratch venv
(see tests/golden/blip4cir_bi/README.md), with a checkout of github.com/Cuberick-Orion/Bi-Blip4CIR:

    python tools/golden/blip4cir_bi.py --bi BI_BLIP4CIR_CHECKOUT --blip-file tests/golden/blip/model_base.pth \
        --out tests/golden/blip4cir_bi

Bi-Blip4CIR's own `BLIPTextEncoder` and `BLIPImgEncoder` (src/blip_modules/) load the small BLIP
pretraining file that tools/golden/blip.py wrote (its `load_checkpoint`: text_encoder.* / text_proj.*,
visual_encoder.* with the position embedding interpolated to the encoder's size, vision_proj.*); the text
encoder is then randomised (as if fine-tuned) and one AdamW step taken with clip_fine_tune.py's two param
groups, its `Combiner` (src/combiner.py) randomised and one Adam step taken, both saved by its
`utils.save_model` (tuned_blip_best.pt = {'epoch', 'BLIPTextEncoder', 'optimizer_state_dict'},
combiner.pt = {'epoch', 'Combiner', 'optimizer_state_dict'}), read back as validate.py reads them, and
what their code computes in eval mode, fp32 on CPU: the direction-marked captions (data_utils'
`__prepend_text__`), the text features of forward and backward captions, the image features, stage I's
forward query (`element_wise_sum`), logits and reversed-query logits (clip_fine_tune.py), stage II's
query (`combine_features`), logits (`Combiner.forward`) and reversed-query logits (combiner_train.py),
and the losses with the FashionIQ weights (0.4, 0.5). Offline / small stand-ins (the only changes):
- `init_tokenizer`'s `BertTokenizer.from_pretrained('bert-base-uncased')` reads tests/golden/blip's vocab;
- `create_vit` returns BLIP's own small `VisionTransformer` (as tools/golden/blip.py), at 48 px where
  `BLIPImgEncoder` hard-codes 384 (the pretraining file is 32 px: its positions are interpolated);
- the widths both encoders hard-code for BLIP base (768 text / vision width, 256 projection) are the small
  model's: `nn.Linear(768, 256)` -> Linear(32, 16), `nn.Linear(vision_width, 256)` -> Linear(24, 16),
  `encoder_width = 768` -> 24;
- `pdb.set_trace` (called by its load_checkpoint when a key is missing) raises instead.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

IMAGE_SIZE = 48  # the "384 px" of BLIPImgEncoder
PROJECTION, HIDDEN = 32, 48
EPOCHS = {"tuned_blip_best": 3, "combiner": 7}
WEIGHTS = {"finetune": 0.4, "combiner": 0.5}  # FashionIQ's reversed-loss weights
CAPTIONS = [  # CIRR style: one caption, marked at every "and" (also inside "sandals")
    "is red and has long sleeves",
    "has sandals",
    "Is darker, and more formal",
]


def patch_offline(vocab_file: Path, golden_blip) -> None:
    import pdb

    import torch
    from blip_modules import blip_img_encoder, blip_text_encoder, med
    from blip_modules.vit import VisionTransformer
    from transformers import BertTokenizer

    vit, text_width, embed = golden_blip.VIT, golden_blip.TEXT["hidden_size"], golden_blip.EMBED_DIM

    class LocalBertTokenizer(BertTokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            assert name == "bert-base-uncased", name
            return BertTokenizer(vocab_file=str(vocab_file))

    def small_vit(kind, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
        encoder = VisionTransformer(
            img_size=IMAGE_SIZE if image_size == 384 else image_size,
            use_grad_checkpointing=use_grad_checkpointing,
            ckpt_layer=ckpt_layer,
            drop_path_rate=drop_path_rate,
            **vit,
        )
        return encoder, vit["embed_dim"]

    class SmallNN:
        """torch.nn inside the two encoder modules, with BLIP base's hard-coded widths made small."""

        @staticmethod
        def Linear(n_in, n_out):  # noqa: N802 (stands in for nn.Linear)
            return torch.nn.Linear(text_width if n_in == 768 else n_in, embed if n_out == 256 else n_out)

    class SmallEncoderWidth(med.BertConfig):
        def __setattr__(self, key, value):
            if key == "encoder_width" and value == 768:
                value = vit["embed_dim"]
            super().__setattr__(key, value)

    def refuse(*args, **kwargs):
        raise RuntimeError("Bi-Blip4CIR's load_checkpoint found a key missing (it would open pdb here)")

    med.BertTokenizer = LocalBertTokenizer
    blip_img_encoder.create_vit = small_vit
    blip_img_encoder.nn = blip_text_encoder.nn = SmallNN
    blip_text_encoder.BertConfig = SmallEncoderWidth
    pdb.set_trace = refuse


def one_step(optimizer, params, gen) -> None:
    """A training step with random gradients, so the saved optimizer state is a real one."""
    import torch

    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    optimizer.step()
    optimizer.zero_grad()


def reversed_logits(combine, reference, text_backward, target, scale):
    """clip_fine_tune.py / combiner_train.py's reversed queries: logit[i, j] = scale * <combine(T_j, t_i),
    normalize(r_i)>, built as their B x B x dim tensors Tij, ti, Ri."""
    import torch.nn.functional as F

    n = len(reference)
    tij = target.unsqueeze(1).repeat(1, n, 1).transpose(0, 1)
    ti = text_backward.unsqueeze(1).repeat(1, n, 1)
    ri = F.normalize(reference, dim=-1).unsqueeze(1).repeat(1, n, 1).unsqueeze(-1)
    pi = combine(tij, ti).unsqueeze(-2)
    return (scale * pi @ ri).squeeze()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bi", required=True, help="checkout of github.com/Cuberick-Orion/Bi-Blip4CIR")
    ap.add_argument(
        "--blip-file", default="tests/golden/blip/model_base.pth", help="from tools/golden/blip.py"
    )
    ap.add_argument("--out", default="tests/golden/blip4cir_bi")
    args = ap.parse_args()
    bi_src = Path(args.bi).resolve() / "src"
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(bi_src)]

    import blip as golden_blip  # tools/golden/blip.py: sizes, vocab, randomisation
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    blip_file = Path(args.blip_file).resolve()
    vocab_file = blip_file.parent / "tokenizer" / "vocab.txt"
    patch_offline(vocab_file, golden_blip)
    from blip_modules.blip_img_encoder import BLIPImgEncoder
    from blip_modules.blip_text_encoder import BLIPTextEncoder
    from combiner import Combiner
    from data_utils import CIRRDataset
    from utils import element_wise_sum, save_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(44)
    words = vocab_file.read_text().split()
    with tempfile.TemporaryDirectory() as tmp:
        med_config = Path(tmp) / "med_config.json"  # src/blip_modules/med_config.json, small
        med_config.write_text(
            json.dumps(golden_blip.med_config(len(words) + 2, golden_blip.VIT["embed_dim"]))
        )

        # stage I's result: the pretrained text encoder, "fine-tuned" (randomised), saved by save_model
        torch.manual_seed(2)
        tuned = BLIPTextEncoder(str(blip_file), str(med_config), use_pretrained_proj_layer=True)
        golden_blip.randomise(tuned, gen)
        optimizer = torch.optim.AdamW(  # clip_fine_tune.py's groups (text_proj at 100 x the lr)
            [
                {"params": [p for n, p in tuned.named_parameters() if "text_proj" not in n], "lr": 5e-5},
                {"params": [p for n, p in tuned.named_parameters() if "text_proj" in n], "lr": 5e-3},
            ],
            weight_decay=0.05,
        )
        one_step(optimizer, list(tuned.parameters()), gen)
        save_model("tuned_blip_best", EPOCHS["tuned_blip_best"], tuned, Path(tmp), optimizer)

        combiner = Combiner(golden_blip.EMBED_DIM, PROJECTION, HIDDEN)
        golden_blip.randomise(combiner, gen)
        optimizer = torch.optim.Adam(combiner.parameters(), lr=2e-5)
        one_step(optimizer, list(combiner.parameters()), gen)
        save_model("combiner", EPOCHS["combiner"], combiner, Path(tmp), optimizer)
        for name in EPOCHS:
            shutil.copy(Path(tmp) / "saved_models" / f"{name}.pt", out / f"{name}.pt")

        # read back as validate.py does: model_base.pth, the tuned text encoder over it, the Combiner
        text_encoder = BLIPTextEncoder(str(blip_file), str(med_config), use_pretrained_proj_layer=True).eval()
        text_encoder.load_state_dict(
            torch.load(out / "tuned_blip_best.pt", weights_only=True)["BLIPTextEncoder"]
        )
        text_encoder = text_encoder.float().eval()
    img_encoder = BLIPImgEncoder(str(blip_file)).eval()
    combiner = Combiner(golden_blip.EMBED_DIM, PROJECTION, HIDDEN)
    combiner.load_state_dict(torch.load(out / "combiner.pt", weights_only=True)["Combiner"])
    combiner.eval()

    reference = torch.randn(len(CAPTIONS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    target = torch.randn(len(CAPTIONS), 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    forward = [CIRRDataset.__prepend_text__(None, c, forward=True) for c in CAPTIONS]
    backward = [CIRRDataset.__prepend_text__(None, c, forward=False) for c in CAPTIONS]
    labels = torch.arange(len(CAPTIONS))
    ce = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        tokens = text_encoder.tokenizer(forward, padding="longest", truncation=True, max_length=77)
        text_f = text_encoder(forward, max_length=77, device="cpu")
        text_b = text_encoder(backward, max_length=77, device="cpu")
        ref_f, tgt_f = img_encoder(reference), img_encoder(target)
        # stage I (clip_fine_tune.py): targets normalised, sum fusion
        sum_query = element_wise_sum(ref_f, text_f)
        sum_logits = 100 * sum_query @ F.normalize(tgt_f, dim=-1).T
        sum_reverse = reversed_logits(element_wise_sum, ref_f, text_b, F.normalize(tgt_f, dim=-1), 100)
        # stage II (combiner_train.py): raw targets into the Combiner
        logits, query, _ = combiner(ref_f, text_f, tgt_f)
        reverse = reversed_logits(combiner.combine_features, ref_f, text_b, tgt_f, combiner.logit_scale)
        outputs = {
            "captions": CAPTIONS,
            "forward_captions": forward,
            "backward_captions": backward,
            "input_ids": torch.tensor(tokens["input_ids"]),
            "reference_pixels": reference,
            "target_pixels": target,
            "reference_features": ref_f,
            "target_features": tgt_f,
            "text_forward": text_f,
            "text_backward": text_b,
            "finetune_query": sum_query,
            "finetune_logits": sum_logits,
            "finetune_reverse_logits": sum_reverse,
            "finetune_loss": ce(sum_logits, labels) + WEIGHTS["finetune"] * ce(sum_reverse, labels),
            "combiner_query": combiner.combine_features(ref_f, text_f),
            "combiner_forward_query": query,
            "combiner_logits": logits,
            "combiner_reverse_logits": reverse,
            "combiner_loss": ce(logits, labels) + WEIGHTS["combiner"] * ce(reverse, labels),
        }
    torch.save(outputs, out / "outputs.pt")
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), key
            print(f"{key:24s} {tuple(value.shape)} |x| max {value.abs().max():.3g}")
    print(
        "wrote",
        ", ".join(f"{p.name} ({p.stat().st_size // 1024} KiB)" for p in sorted(out.iterdir()) if p.is_file()),
    )


if __name__ == "__main__":
    main()
