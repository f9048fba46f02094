"""BLIP (HF transformers `BlipForImageTextRetrieval`) behind the Backbone interface.

As Bi-BLIP4CIR encodes (Cuberick-Orion/Bi-Blip4CIR): image = vision_proj(ViT CLS of the last
layer), text = text_proj(BERT [CLS]) in unimodal 'text' mode (no cross-attention), both raw
(un-normalised). Where the weights come from:
- `backbone=blip_base`: `hf_id`, a Hugging Face hub id (`name` or `org/name`) downloaded into HF's cache
  on first use (as open_clip fetches `openai` weights; HF_HUB_OFFLINE=1 reads the cache only), or a
  local folder (any other path: `/...`, `./...`, `~/...`) written by `save_pretrained` /
  `cirlab +task=convert_blip` (BLIP's own model_base.pth), with its tokenizer (checked: one token per
  word-embedding row);
- `backbone.checkpoint`: a `save_pretrained` folder (the whole model, instead of `hf_id`), or a file
  loaded on top of the model built from `hf_id`: BLIP4CIR+Bi's `tuned_blip_*.pt` (the text side) or a
  cirlab stage checkpoint (the whole backbone). The file's layout is recognised from its keys;
- `backbone=blip_tiny`: a small `BlipConfig` with a WordPiece vocab built offline from the
  synthetic captions, pretrained by cirlab on first use and cached by config hash (as `tiny`;
  the recipe is cirlab/pretrain.py).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import nn
from transformers import BertTokenizerFast, BlipConfig, BlipForImageTextRetrieval

from cirlab.backbones.base import Backbone, as_json_data
from cirlab.data.transforms import build_transform
from cirlab.errors import CirlabError
from cirlab.weight_map import Rule, WeightMap
from cirlab.weights import Layout, SavedFile, cirlab_stage, load_strict, read_weights, recognise, strip_prefix

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DIRECTION_WORDS = ["[", "]", "forward", "backward"]

# ---- the text side in the reference's names -------------------------------------------------------
TEXT_PARTS = ("text_encoder.", "text_proj.")
POSITION_IDS = "text_encoder.embeddings.position_ids"
WORD_EMBEDDINGS = "text_encoder.embeddings.word_embeddings.weight"


class BlipTextSide(nn.Module):
    """A BLIP's text encoder + text_proj under the names of Bi-BLIP4CIR's `BLIPTextEncoder` (BLIP's
    med.py BertModel names are HF BlipTextModel's). It shares the parameters, so a strict load into it
    fills exactly the backbone's text side."""

    def __init__(self, model: BlipForImageTextRetrieval):
        super().__init__()
        self.text_encoder = model.text_encoder
        self.text_proj = model.text_proj


def reference_positions(file_state: dict) -> torch.Tensor:
    """med.py's `position_ids` buffer (a constant arange, which HF does not save), rebuilt for the
    reference's strict load_state_dict."""
    positions = file_state["text_encoder.embeddings.position_embeddings.weight"].shape[0]
    return torch.arange(positions).unsqueeze(0)


POSITION_RULE = Rule(
    POSITION_IDS, None, make=reference_positions, why="constant position-id buffer (HF rebuilds it)"
)
TUNED_BLIP = SavedFile(
    "BLIPTextEncoder",
    WeightMap((POSITION_RULE, *(Rule(f"{part}*", f"{part}*") for part in TEXT_PARTS))),
    "BLIP4CIR+Bi text encoder file (tuned_blip_*.pt: {'epoch', 'BLIPTextEncoder': "
    "text_encoder.*, text_proj.*}), loaded into the text side",
)


def text_side_state(module_state: dict) -> dict:
    """The text side (BlipTextSide names) of a cirlab method module's state dict."""
    return {
        k: v for k, v in strip_prefix(module_state, "backbone.model.").items() if k.startswith(TEXT_PARTS)
    }


def text_side_layouts() -> list[Layout]:
    """What BLIP4CIR+Bi's stage I accepts as its own weights (`method.finetune.checkpoint`)."""
    stage = cirlab_stage("backbone.model.", "its BLIP text encoder + text_proj")
    return [
        TUNED_BLIP.layout(),
        Layout(stage.name, stage.match, lambda obj: text_side_state(obj["state_dict"])),
    ]


BACKBONE_FILE_LAYOUTS = [
    TUNED_BLIP.layout(),
    cirlab_stage("backbone.", "its backbone.* weights: the whole BLIP"),
]
FOLDER_LAYOUT = "a folder saved with save_pretrained (model + tokenizer; e.g. written by +task=convert_blip)"

# ---- where a model or tokenizer comes from: a hub id or a folder ------------------------------------
HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
TOKENIZER_PATTERNS = [
    *TOKENIZER_FILES,
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
]
BLIP_TOKENS = {"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]}


def is_hub_id(name: str) -> bool:
    """`name` or `org/name`, as the hub spells its ids; anything else (`/...`, `./...`, `~/...`, `a/b/c`) is
    a path. So a folder of the same name in the working directory never stands in for a hub id."""
    return HUB_ID.fullmatch(name) is not None


def hub_snapshot(repo_id: str, patterns: list[str], what: str, advice: str) -> Path:
    """The files of `repo_id` matching `patterns`, through HF's cache (HF_HUB_OFFLINE=1: the cache only).
    One request, no retries: offline or without network the answer comes in well under a second
    (transformers' own from_pretrained retries every file for minutes, then returns a default tokenizer)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (OSError, ValueError) as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        why = (
            "Hugging Face offline mode is on (HF_HUB_OFFLINE=1) and they are not in its cache"
            if constants.HF_HUB_OFFLINE
            else "they are not in the Hugging Face cache and could not be downloaded"
        )
        here = (
            f"; a folder {repo_id} is in the working directory: write ./{repo_id} to use it"
            if Path(repo_id).is_dir()
            else ""
        )
        raise CirlabError(f"cannot load {what} {repo_id!r}: {why}{here} ({detail})\n{advice}") from err


def load_tokenizer(folder: Path, what: str) -> BertTokenizerFast:
    """The tokenizer saved in `folder`; transformers 5 returns a 5-token default one for a folder without
    tokenizer files, so that is an error here."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        held = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise CirlabError(
            f"{what}={folder} has no tokenizer files ({' or '.join(TOKENIZER_FILES)}; it holds {held}). "
            "Save the tokenizer into it too (tokenizer.save_pretrained(DIR)); +task=convert_blip writes both."
        )
    return BertTokenizerFast.from_pretrained(folder)


def add_blip_tokens(tokenizer: BertTokenizerFast) -> None:
    """BLIP's init_tokenizer: bert-base-uncased + bos '[DEC]' + additional '[ENC]' (ids 30522, 30523)."""
    tokenizer.add_special_tokens({"bos_token": BLIP_TOKENS["bos_token"]})
    if "[ENC]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": BLIP_TOKENS["additional_special_tokens"]})


def fit_tokenizer(tokenizer: BertTokenizerFast, model: BlipForImageTextRetrieval, source: str) -> None:
    """One token per word-embedding row. HF's BLIP repos (Salesforce/blip-itm-*) ship bert-base-uncased
    without BLIP's [DEC], [ENC] (30522 tokens for 30524 rows): those two are added, as BLIP does; any other
    difference is an error (too few tokens: a wrong tokenizer; too many: ids past the embedding)."""
    rows = model.text_encoder.get_input_embeddings().weight.shape[0]
    vocab = tokenizer.get_vocab()
    if len(tokenizer) + 2 == rows and "[DEC]" not in vocab and "[ENC]" not in vocab:
        add_blip_tokens(tokenizer)
    if len(tokenizer) != rows:
        raise CirlabError(
            f"the tokenizer of {source} has {len(tokenizer)} tokens but the model's word embedding has {rows} "
            "rows: save the model's own tokenizer beside it (BLIP's is bert-base-uncased + [DEC], [ENC])"
        )


def read_vocab(vocab_file: str | Path) -> list[str]:
    """The words of a WordPiece vocab.txt, one a line (transformers 5 takes the vocab itself, not its file)."""
    try:
        words = Path(vocab_file).read_text().split("\n")
    except (OSError, UnicodeDecodeError) as err:
        raise CirlabError(
            f"backbone.model.vocab_file={vocab_file}: cannot read it ({type(err).__name__}: {err}). "
            "Give a WordPiece vocab.txt (one token a line), e.g. the one saved beside a BLIP tokenizer"
        ) from err
    if not any(words):
        raise CirlabError(
            f"backbone.model.vocab_file={vocab_file} is empty: give a WordPiece vocab.txt (one token a line)"
        )
    return words


def tokenizer_source(folder: Path, what: str) -> str:
    """`what`=folder and the tokenizer files in it, for messages."""
    files = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    return f"{what}={folder} ({', '.join(files)})"


def load_folder(
    folder: str | Path, what: str, shown: str | None = None
) -> tuple[BlipForImageTextRetrieval, BertTokenizerFast]:
    """A save_pretrained folder, its tokenizer checked against the model; `shown` names it in errors."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CirlabError(
            f"{what}={shown or folder} is not a BLIP folder saved with save_pretrained (no config.json in it)"
        )
    tokenizer = load_tokenizer(folder, what)
    model = BlipForImageTextRetrieval.from_pretrained(folder)
    fit_tokenizer(tokenizer, model, tokenizer_source(folder, what))
    return model, tokenizer


def from_hub(hf_id: str) -> tuple[BlipForImageTextRetrieval, BertTokenizerFast]:
    """A hub id (`name`, `org/name`) through HF's own cache and download (HF_HUB_OFFLINE=1: cache only),
    anything else a local folder."""
    if not is_hub_id(hf_id):
        if not Path(hf_id).expanduser().is_dir():
            raise CirlabError(
                f"backbone.hf_id={hf_id}: no such folder. Give a Hugging Face hub id or a save_pretrained "
                "folder (BLIP's model_base.pth becomes one with +task=convert_blip +src=model_base.pth "
                f"+out={hf_id})"
            )
        return load_folder(Path(hf_id).expanduser(), "backbone.hf_id")
    advice = (
        f"Download them once where there is network (`hf download {hf_id}`, or `huggingface-cli download "
        f"{hf_id}` with an older huggingface_hub) into the HF cache this machine reads (HF_HOME), then run "
        "with HF_HUB_OFFLINE=1; or give a local folder: backbone.hf_id=/path/to/dir (saved with "
        "save_pretrained, or converted from BLIP's model_base.pth with +task=convert_blip)."
    )
    folder = hub_snapshot(hf_id, ["*.json", "*.txt", "*.safetensors"], "BLIP weights", advice)
    if not any(folder.glob("*.safetensors")):  # a repo with PyTorch pickles only
        folder = hub_snapshot(hf_id, ["*.bin"], "BLIP weights", advice)
    return load_folder(folder, "backbone.hf_id", shown=f"{hf_id} (HF cache {folder})")


class BlipBackbone(Backbone):
    def __init__(
        self,
        hf_id: str | None = None,
        checkpoint: str | None = None,
        config: dict | None = None,
        vocab_file: str | None = None,
        preprocess: str = "clip",
        target_ratio: float = 1.25,
        max_length: int = 77,
        name: str = "blip",
    ):
        super().__init__()
        if checkpoint and not Path(checkpoint).exists():
            raise CirlabError(f"backbone.checkpoint={checkpoint}: no such file or folder")
        if checkpoint and Path(checkpoint).is_dir():
            self.model, self.tokenizer = load_folder(checkpoint, "backbone.checkpoint")
        elif config is not None:
            if not vocab_file:
                raise CirlabError(
                    "a BLIP built from backbone config needs a WordPiece vocab_file for its tokenizer"
                )
            words = read_vocab(vocab_file)
            self.model = BlipForImageTextRetrieval(BlipConfig(**as_json_data(config)))
            self.tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
        elif hf_id:
            self.model, self.tokenizer = from_hub(hf_id)
        else:
            raise CirlabError(
                "a BLIP backbone needs backbone.hf_id (hub id or folder) or a backbone.checkpoint folder"
            )
        self.model.eval()
        cfg = self.model.config
        self.image_size = int(cfg.vision_config.image_size)
        self.embed_dim = int(cfg.image_text_hidden_size)
        self.max_length = max_length
        self.preprocess = build_transform(
            preprocess, self.image_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, target_ratio
        )
        self.name = name
        if checkpoint and Path(checkpoint).is_file():
            self.load_weights_file(checkpoint)

    def load_weights_file(self, path: str | Path) -> str:
        """A `backbone.checkpoint` file on top of this model, recognised by its keys, loaded strictly
        (the text side for the reference's text-encoder file, all of it for a cirlab checkpoint)."""
        what = f"backbone.checkpoint={path}"
        obj = read_weights(path, "backbone.checkpoint")
        try:
            layout = recognise(obj, BACKBONE_FILE_LAYOUTS, what)
        except CirlabError as err:
            raise CirlabError(f"{err}\n  - {FOLDER_LAYOUT}") from None
        state = layout.to_state(obj)
        self._fit_vocab(state)
        load_strict(
            BlipTextSide(self.model) if layout.name == TUNED_BLIP.name else self,
            state,
            f"{what} ({layout.name})",
        )
        log.info("BLIP weights from %s (%s)", path, layout.name)
        return layout.name

    def _fit_vocab(self, state: dict) -> None:
        """A run with method.direction=learned saves extra word-embedding rows (its direction tokens, which
        the method adds to the tokenizer again, in the same order); grow the embedding to hold them. Any
        other difference is left to the strict load to report."""
        key = next((k for k in state if k.endswith(WORD_EMBEDDINGS)), None)
        own = self.model.text_encoder.get_input_embeddings().weight.shape
        if key and state[key].shape[0] > own[0] and state[key].shape[1] == own[1]:
            log.info(
                "word embeddings grown from %d to %d rows (tokens added by the run that saved them)",
                own[0],
                state[key].shape[0],
            )
            self.model.text_encoder.resize_token_embeddings(state[key].shape[0])

    # ---- encoders -------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        hidden = self.model.vision_model(pixel_values=images).last_hidden_state
        return self.model.vision_proj(hidden[:, 0])

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """text_proj([CLS]) of the BERT text encoder in unimodal mode (no cross-attention)."""
        out = self.model.text_encoder(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            return_dict=True,
        )
        return self.model.text_proj(out.last_hidden_state[:, 0])

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode_text(self.tokenize(texts))

    def encode_grounded_text(self, images: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """text_proj([CLS]) of the text encoder cross-attending to the image's ViT tokens (BLIP's
        image-grounded mode). BLIP4CIR+Bi's reference does NOT use it (it sums unimodal features);
        offered for methods that compose inside the encoder."""
        image_tokens = self.model.vision_model(pixel_values=images).last_hidden_state
        out = self.model.text_encoder(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device),
            return_dict=True,
        )
        return self.model.text_proj(out.last_hidden_state[:, 0])

    def add_tokens(self, tokens: list[str]) -> None:
        """New special tokens with their own (trainable) word-embedding rows; idempotent, so every
        stage of a method may ask for them and a resumed stage's checkpoint shapes still match."""
        missing = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_special_tokens({"additional_special_tokens": missing})
            self.model.text_encoder.resize_token_embeddings(len(self.tokenizer))

    def image_parameters(self):
        return list(self.model.vision_model.parameters()) + list(self.model.vision_proj.parameters())

    def text_parameters(self):
        return list(self.model.text_encoder.parameters()) + list(self.model.text_proj.parameters())

    def text_proj_parameters(self):
        return list(self.model.text_proj.parameters())

    def save_pretrained(self, folder: str | Path) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


# ---- blip_tiny ------------------------------------------------------------------------------------
def wordpiece_vocab(texts: list[str]) -> list[str]:
    """WordPiece vocab: BERT's specials, the direction-marker pieces, single characters (so any
    word still tokenises, as ##-pieces) and every word of `texts`."""
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    vocab = SPECIAL_TOKENS + DIRECTION_WORDS + chars + [f"##{c}" for c in chars] + words
    seen: dict[str, None] = {}
    for token in vocab:
        seen.setdefault(token, None)
    return list(seen)


def vocab_config(model_cfg: dict, vocab: list[str]) -> dict:
    """The BlipConfig (as a dict) of `model_cfg` with a text side for `vocab`: its size and special tokens."""
    config = as_json_data(model_cfg)
    config["text_config"] = {
        **config["text_config"],
        "vocab_size": len(vocab),
        "pad_token_id": 0,
        "bos_token_id": vocab.index("[CLS]"),
        "sep_token_id": vocab.index("[SEP]"),
        "eos_token_id": vocab.index("[SEP]"),
    }
    return config
