"""open_clip models behind the Backbone interface: a named model + pretrained tag, a local
checkpoint file, a small config given inline (the tiny backbone), or no name at all: then the
architecture is read from an OpenAI-layout `checkpoint` as OpenAI's `clip.load` reads it
(`backbone=clip_openai_file`).

OpenAI's CLIP weights were trained with QuickGELU; open_clip >= 2.29 builds its plain model names
with nn.GELU even for `pretrained='openai'` (it only warns), so cirlab asks for QuickGELU itself
whenever the weights are OpenAI's (`quick_gelu`)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from cirlab.backbones.base import Backbone
from cirlab.data.transforms import build_transform
from cirlab.errors import CirlabError
from cirlab.weight_map import Rule, WeightMap
from cirlab.weights import Layout, SavedFile, cirlab_stage, load_strict, read_weights, recognise

OPEN_CLIP_FILES = (".safetensors", ".npz", ".npy")  # local pretrained files only open_clip reads
# What a failed or offline download raises: open_clip >= 3 wraps a tag's download in RuntimeError, older
# releases and its hf-hub/tokenizer paths pass on urllib's URLError, huggingface_hub's LocalEntryNotFoundError,
# HfHubHTTPError, OfflineModeIsEnabled and transformers' OSError: all OSErrors
DOWNLOAD_ERRORS = (RuntimeError, OSError)


class OpenCLIPBackbone(Backbone):
    def __init__(
        self,
        model_name: str | None = None,
        pretrained: str | None = None,
        model_cfg: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        preprocess: str = "clip",
        target_ratio: float = 1.25,
        name: str | None = None,
        quick_gelu: bool | None = None,
        allow_torchscript: bool = False,
        openai_fp16_rounding: bool = False,
    ):
        super().__init__()
        self.name = name or model_name or "openclip"
        self.allow_torchscript = bool(allow_torchscript)
        given = None  # (layout, state dict) of a checkpoint that also gave the architecture
        local = None  # (layout, state dict) of a local pretrained file, read before the model is built
        if model_cfg is None and model_name is None:
            if not checkpoint:
                raise CirlabError(
                    f"backbone {self.name!r} reads its architecture from backbone.checkpoint, and none is "
                    "given: add backbone.checkpoint=FILE (an OpenAI-layout CLIP file, e.g. CLIP4Cir's "
                    "tuned_clip_best.pt) or pick a named model (backbone=clip_rn50x4, clip_vit_b32, ...)"
                )
            given = clip_state(checkpoint, self.name, "backbone.checkpoint", self.allow_torchscript)
            model_cfg = openai_model_cfg(given[1], f"backbone.checkpoint={checkpoint}")
            model_cfg["quick_gelu"] = True if quick_gelu is None else bool(quick_gelu)
        if model_cfg is not None:
            self.model = open_clip.model.CLIP(**model_cfg)
            self.quick_gelu = bool(model_cfg.get("quick_gelu", False))
            self.tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
            mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        else:
            if model_name not in open_clip.list_models():
                raise CirlabError(f"unknown open_clip model {model_name!r}; see open_clip.list_models()")
            self.quick_gelu = uses_quick_gelu(pretrained) if quick_gelu is None else bool(quick_gelu)
            # a local .pt file goes through cirlab's layouts (strict, JIT extras, TorchScript switch);
            # open_clip keeps what only it reads (.safetensors, big_vision .npz)
            if pretrained and Path(pretrained).is_file() and Path(pretrained).suffix not in OPEN_CLIP_FILES:
                local = clip_state(pretrained, self.name, "backbone.pretrained", self.allow_torchscript)
            try:
                self.model = open_clip.create_model(
                    model_name, pretrained=None if local else pretrained, force_quick_gelu=self.quick_gelu
                )
                self.tokenizer = open_clip.get_tokenizer(model_name)  # some download a HF tokenizer
            except DOWNLOAD_ERRORS as err:
                raise CirlabError(
                    f"could not load open_clip {model_name} with backbone.pretrained={pretrained}: "
                    f"{type(err).__name__}: {err}\n"
                    "Weights (and some models' tokenizers) download on first use (needs network; offline, "
                    "run once where there is network to fill the cache) or give a local file with "
                    "backbone.pretrained=/path/to/weights.pt (or backbone.pretrained=null for random init)."
                ) from err
            mean = getattr(self.model.visual, "image_mean", None) or OPENAI_DATASET_MEAN
            std = getattr(self.model.visual, "image_std", None) or OPENAI_DATASET_STD
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.embed_dim = int(
            self.model.text_projection.shape[-1]
            if isinstance(self.model.text_projection, torch.Tensor)
            else self.model.text_projection.out_features
        )
        self.preprocess = build_transform(preprocess, self.image_size, mean, std, target_ratio)
        if local:
            load_strict(self, local[1], f"backbone.pretrained={pretrained} ({local[0]})")
        if given:
            load_strict(self, given[1], f"backbone.checkpoint={checkpoint} ({given[0]})")
        elif checkpoint:
            load_backbone_weights(self, checkpoint)
        if openai_fp16_rounding:
            round_as_openai_fp16(self.model)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(texts))

    # ---- SEARLE, Pic2Word: a pseudo-word token injected at a placeholder (`$`, `*`) ------------------
    @property
    def token_dim(self) -> int:
        """Width of the text tower's token embedding (the space pseudo tokens live in)."""
        return int(self._text_tower().token_embedding.embedding_dim)

    @property
    def placeholder_token_id(self) -> int:
        """Token id of SEARLE's `$` (259 with CLIP's BPE)."""
        return self.token_id("$")

    def token_id(self, placeholder: str) -> int:
        """Token id of a one-token placeholder (`$` 259, `*` 265 with CLIP's BPE), found by tokenising it,
        never hard-coded."""
        if not hasattr(self, "_placeholder_ids"):
            self._placeholder_ids: dict[str, int] = {}
        ids = self._placeholder_ids
        if placeholder not in ids:
            row = self.tokenize([placeholder])[0].tolist()
            end = max(range(len(row)), key=lambda i: row[i])  # EOT: the largest id in the row
            inner = row[1:end]
            if len(inner) != 1:
                raise CirlabError(
                    f"backbone {self.name!r}: the tokenizer splits {placeholder!r} into {inner}; "
                    "a pseudo-token placeholder must be a single token"
                )
            ids[placeholder] = inner[0]
        return ids[placeholder]

    def _text_tower(self):
        model = self.model
        if not all(
            hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
        ):
            raise CirlabError(
                f"backbone {self.name!r} ({type(model).__name__}) has no CLIP text tower with a "
                "token embedding; pseudo-token encoding needs an open_clip CLIP model"
            )
        return model

    def encode_text_with_pseudo_tokens(
        self, tokens: torch.Tensor, pseudo: torch.Tensor, placeholder: str = "$", fill: str = "first"
    ) -> torch.Tensor:
        """open_clip `CLIP.encode_text` with the token embeddings at `placeholder` positions replaced.

        `pseudo` [B, D] (or [D] / [1, D], broadcast to every row) is one token per row: `fill="first"`
        puts it at the row's FIRST placeholder only, later ones keep the literal embedding (SEARLE,
        Pic2Word); `fill="all"` puts it at every placeholder of the row (LinCIR). `pseudo` [B, K, D] is
        K tokens per row, in order: the row's k-th placeholder gets `pseudo[b, k]`, placeholders past
        K keep the literal embedding and tokens past the row's placeholders are unused (FTI4CIR's
        subject + r attribute tokens, r varying per row; each row's own positions, not row 0's).
        Pooling as open_clip."""
        from open_clip.transformer import text_global_pool

        m = self._text_tower()
        tokens = tokens.to(m.token_embedding.weight.device)
        is_ph = tokens == self.token_id(placeholder)
        if not bool(is_ph.any(dim=1).all()):
            raise CirlabError(
                f"a prompt has no {placeholder!r} placeholder for the pseudo token; write prompts like "
                f"'a photo of {placeholder} that {{}}' (spaces around {placeholder})"
            )
        if fill not in ("first", "all"):
            raise ValueError(f"fill must be 'first' or 'all', not {fill!r}")
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)
        pseudo = pseudo.to(x.dtype)
        if pseudo.dim() == 1:
            pseudo = pseudo.unsqueeze(0)
        if pseudo.shape[0] == 1 and x.shape[0] > 1:
            pseudo = pseudo.expand(x.shape[0], *pseudo.shape[1:])
        occurrence = is_ph.long().cumsum(dim=1) - 1  # 0 at a row's first placeholder, 1 at its second, ...
        if pseudo.dim() == 2:
            keep = is_ph if fill == "all" else is_ph & (occurrence == 0)
            x = torch.where(keep.unsqueeze(-1), pseudo.unsqueeze(1), x)  # out of place: gradients flow
        else:
            keep = is_ph & (occurrence < pseudo.shape[1])
            picked = pseudo.gather(1, occurrence.clamp(0, pseudo.shape[1] - 1).unsqueeze(-1).expand_as(x))
            x = torch.where(keep.unsqueeze(-1), picked, x)
        attn_mask = m.attn_mask
        if attn_mask is not None and m.text_pool_type == "argmax":
            # causal attention: positions after the last EOT never reach a pooled state, so cutting the
            # padding gives the same output at a fraction of the cost (OTI runs thousands of these)
            n = int(tokens.argmax(dim=-1).max()) + 1
            x, tokens, attn_mask = x[:, :n], tokens[:, :n], attn_mask[:n, :n]
        x = x + m.positional_embedding[: x.shape[1]].to(cast_dtype)
        x = m.transformer(x, attn_mask=attn_mask)
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = (
                m.text_projection(x)
                if isinstance(m.text_projection, torch.nn.Linear)
                else x @ m.text_projection
            )
        return x

    # ---- FTI4CIR: local image features beside the global one ------------------------------------------
    @property
    def patch_dim(self) -> int:
        """Width of `encode_image_with_patches`' local features (ViT: its width; ModifiedResNet: layer4's
        channels, the attention pool's input)."""
        visual = self.model.visual
        if hasattr(visual, "transformer"):
            return int(visual.transformer.width)
        return int(visual.attnpool.k_proj.in_features)

    def encode_image_with_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(`encode_image(images)`, local features [B, T, W]) from the same forward, so the global is
        encode_image's to the bit. A ViT gives its residual stream after the LAST block, before `ln_post`
        and the projection, CLS first ([B, 1 + grid², width]: FTI4CIR's patch tokens). open_clip's
        ModifiedResNet (the tiny backbone) gives what its attention pool attends over: the layer4 map
        flattened to [B, H·W, C] with its mean prepended, before the pool's positional embedding."""
        visual = self.model.visual
        if hasattr(visual, "transformer"):
            hooked, local = visual.transformer, lambda out: out
        elif hasattr(visual, "layer4") and hasattr(visual, "attnpool"):
            hooked = visual.layer4

            def local(out):
                cells = out.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H·W, C]
                return torch.cat([cells.mean(dim=1, keepdim=True), cells], dim=1)
        else:
            raise CirlabError(
                f"backbone {self.name!r} ({type(visual).__name__}): patch features need an open_clip "
                "VisionTransformer or ModifiedResNet image tower"
            )
        seen = []
        handle = hooked.register_forward_hook(lambda mod, args, out: seen.append(out))
        try:
            pooled = self.model.encode_image(images)
        finally:
            handle.remove()
        return pooled, local(seen[-1])  # open_clip's transformer returns [B, T, W] (batch first)

    def image_parameters(self):
        return list(self.model.visual.parameters())

    def text_parameters(self):
        visual = {id(p) for p in self.model.visual.parameters()}
        return [p for p in self.model.parameters() if id(p) not in visual]


def openai_fp16_names(model: torch.nn.Module) -> list[str]:
    """Names of the tensors OpenAI's `clip.model.convert_weights` holds in fp16, by its module-type rule:
    Conv1d / Conv2d / Linear weights and biases (the attention pool's q/k/v/c_proj, attention out_proj
    included), MultiheadAttention's in_proj / q,k,v_proj weights, in_proj_bias, bias_k, bias_v, and any
    `text_projection` / `proj` tensor; never norms, embeddings, positional embeddings or logit_scale."""
    nn = torch.nn
    names: dict[str, None] = {}  # ordered, without repeats
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        attrs = []
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            attrs += ["weight", "bias"]
        if isinstance(module, nn.MultiheadAttention):
            attrs += ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"]
            attrs += ["in_proj_bias", "bias_k", "bias_v"]
        attrs += ["text_projection", "proj"]
        names.update({dot + a: None for a in attrs if isinstance(getattr(module, a, None), torch.Tensor)})
    return list(names)


def round_as_openai_fp16(model: torch.nn.Module) -> None:
    """Round those tensors to fp16 and back (backbone.openai_fp16_rounding), as the CLIP4Cir / MLCL scripts
    on a GPU see a fine-tuned file: `clip.load(..., device='cuda')` keeps OpenAI's fp16 model,
    `load_state_dict` casts the fp32 file into it, and only then `.float()`."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    with torch.no_grad():
        for name in openai_fp16_names(model):
            tensors[name].copy_(tensors[name].half())


def uses_quick_gelu(pretrained: str | None) -> bool:
    """QuickGELU unless the weights are an open_clip tag other than 'openai' (e.g. LAION's, trained with
    GELU): 'openai', a local file (OpenAI's .pt files) and no weights (these configs describe OpenAI's
    models, whose weights may come later through backbone.checkpoint) all mean OpenAI's activation."""
    return pretrained in (None, "openai") or Path(str(pretrained)).is_file()


# OpenAI's JIT archives carry these three non-tensor attributes in their state dict
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
# OpenAI `clip` / open_clip CLIP names (visual.*, transformer.*, token_embedding.weight, ...) are open_clip's
# own: the backbone holds them under `model.`
CLIP_MAP = WeightMap(
    (*(Rule(k, None, why="OpenAI JIT attribute") for k in _OPENAI_EXTRAS), Rule("*", "model.*"))
)
TUNED_CLIP = SavedFile(
    "CLIP", CLIP_MAP, "CLIP4Cir fine-tuned CLIP {'epoch': int, 'CLIP': state_dict} (OpenAI clip names)"
)


def _is_clip_state(obj) -> bool:
    return (
        isinstance(obj, dict)
        and any(k.startswith("visual.") for k in obj)
        and all(isinstance(v, torch.Tensor) for k, v in obj.items() if k not in _OPENAI_EXTRAS)
    )


def _unwrap_ddp(obj) -> dict:
    """An open_clip training checkpoint's state dict, less DDP's `module.` prefix where it has one."""
    return {k.removeprefix("module."): v for k, v in (obj.get("state_dict") or {}).items()}


def clip_layouts(backbone_name: str) -> list[Layout]:
    """What `backbone.checkpoint` accepts for an open_clip backbone."""

    def cirlab_file(obj):
        if obj["backbone"] != backbone_name:
            raise CirlabError(
                f"the file holds weights of backbone {obj['backbone']!r}, but the config builds "
                f"{backbone_name!r}. Pick the matching backbone=... or another checkpoint."
            )
        return obj["state_dict"]

    return [
        Layout(
            "cirlab backbone file {'backbone': name, 'state_dict': ...}",
            lambda o: isinstance(o, dict) and "backbone" in o and isinstance(o.get("state_dict"), dict),
            cirlab_file,
        ),
        cirlab_stage("backbone.", "its backbone.* weights"),
        TUNED_CLIP.layout(),
        Layout(
            "open_clip training checkpoint {'epoch', 'state_dict': {(module.)visual.*, ...}}",
            lambda o: isinstance(o, dict) and _is_clip_state(_unwrap_ddp(o)),
            lambda o: CLIP_MAP.to_model(_unwrap_ddp(o)),
        ),
        Layout(
            "OpenAI / open_clip CLIP state dict (visual.*, transformer.*, token_embedding.weight, ...)",
            _is_clip_state,
            CLIP_MAP.to_model,
        ),
    ]


def is_torchscript(path: str | Path) -> bool:
    """A TorchScript archive (what OpenAI's clip.load caches: ViT-B-32.pt, RN50x4.pt): a zip with the
    module's code and a constants.pkl, which torch.save's files never hold."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.rsplit("/", 1)[-1] == "constants.pkl" for n in archive.namelist())


def read_clip_file(path: str | Path, what: str, allow_torchscript: bool = False) -> Any:
    """The file's object: torch.load(weights_only=True), or a TorchScript archive's state dict (with
    the JIT extras) where backbone.allow_torchscript lets its code run."""
    if not is_torchscript(path):
        return read_weights(path, what)
    if not allow_torchscript:
        raise CirlabError(
            f"{what}={path} is a TorchScript archive (as OpenAI's clip.load caches ViT-B-32.pt, RN50x4.pt): "
            "loading one runs the code inside it. If you trust the file, add backbone.allow_torchscript=true "
            "(only its weights are kept), or convert it once where you trust it: "
            "torch.save(torch.jit.load(FILE, map_location='cpu').state_dict(), 'plain.pt')"
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # torch raises several types for a broken archive
        raise CirlabError(f"{what}={path}: not a readable TorchScript archive ({err})") from err
    return {k: v.detach() for k, v in module.state_dict().items()}


def clip_state(path: str | Path, name: str, what: str, allow_torchscript: bool = False) -> tuple[str, dict]:
    """(layout name, state dict in the backbone's own names) of a CLIP weights file."""
    obj = read_clip_file(path, what, allow_torchscript)
    layout = recognise(obj, clip_layouts(name), f"{what}={path}")
    return layout.name, layout.to_state(obj)


def load_backbone_weights(backbone: Backbone, path: str | Path) -> None:
    """backbone.checkpoint: cirlab's files or a CLIP state dict in OpenAI's / CLIP4Cir's / open_clip's layout."""
    allow = getattr(backbone, "allow_torchscript", False)
    layout, state = clip_state(path, backbone.name, "backbone.checkpoint", allow)
    load_strict(backbone, state, f"backbone.checkpoint={path} ({layout})")


def openai_model_cfg(state: dict, what: str) -> dict:
    """open_clip CLIP kwargs of a state dict in the backbone's names (`model.visual.*`, ...), read as
    OpenAI's clip.model.build_model reads a file: a ViT where there is visual.proj, else a ModifiedResNet
    (image size = 32 x the attention pool's grid); 64-wide attention heads everywhere."""
    sd = {k.removeprefix("model."): v for k, v in state.items()}

    def count(prefix: str) -> int:  # distinct block indices right after `prefix`
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    def grid(key: str) -> int:  # side of the square grid of a positional embedding with a CLS row
        n = sd[key].shape[0]
        side = round((n - 1) ** 0.5)
        if side * side + 1 != n:
            raise CirlabError(f"{what}: {key} has {n} rows, not a square grid + 1")
        return side

    try:
        if "visual.proj" in sd:
            conv = sd["visual.conv1.weight"]
            vision = dict(
                layers=count("visual.transformer.resblocks."),
                width=conv.shape[0],
                patch_size=conv.shape[-1],
                image_size=conv.shape[-1] * grid("visual.positional_embedding"),
            )
        else:
            vision = dict(
                layers=[count(f"visual.layer{i}.") for i in (1, 2, 3, 4)],
                width=sd["visual.layer1.0.conv1.weight"].shape[0],
                image_size=32 * grid("visual.attnpool.positional_embedding"),
            )
        width = sd["ln_final.weight"].shape[0]
        text = dict(
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            width=width,
            heads=width // 64,
            layers=count("transformer.resblocks."),
        )
        embed_dim = sd["text_projection"].shape[1]
    except KeyError as err:
        raise CirlabError(
            f"{what}: no {err.args[0]!r}, so the architecture cannot be read from the file as OpenAI's "
            "clip.load does; pick the backbone by name instead (backbone=clip_rn50x4, clip_vit_b32, ...)"
        ) from err
    vision_heads = vision["width"] * (1 if "patch_size" in vision else 32) // 64  # as open_clip builds it
    if min(text["heads"], vision_heads) < 1:
        raise CirlabError(
            f"{what}: widths below 64 have no 64-wide attention head, so OpenAI's clip.load could not "
            "build this file either; pick the backbone by name or give its open_clip model_cfg"
        )
    return dict(embed_dim=int(embed_dim), vision_cfg=vision, text_cfg=text)
