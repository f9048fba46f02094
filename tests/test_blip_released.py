"""BLIP weights in their authors' layouts: the hub download path, BLIP's model_base.pth converted to a
save_pretrained folder, BLIP4CIR+Bi's tuned_blip_*.pt ({'BLIPTextEncoder': ...}) and combiner files in
and out, the eval_released experiments, and bad inputs. Small random BLIPs only: no network, no weights.

The reference layouts are written here by hand from the authors' code (salesforce/BLIP vit.py, med.py,
blip_pretrain.py; Cuberick-Orion/Bi-Blip4CIR utils.save_model, combiner.py), not from cirlab's converters."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import BLIP_VOCAB, CACHE, SMALL_BLIP

from cirlab.backbones.blip import BlipBackbone
from cirlab.backbones.blip_convert import convert_blip_checkpoint
from cirlab.errors import CirlabError
from cirlab.methods.blip4cir import Blip4CirCombiner, Blip4CirFinetune
from cirlab.weights import load_weights

TEXTS = ["is red and longer", "has sandals", " [FORWARD] is red"]
BLIP_TOKENS = ["[DEC]", "[ENC]"]  # BLIP's init_tokenizer adds them after BERT's vocab


def small(tmp_path, seed=0, vocab=tuple(BLIP_VOCAB), text=None) -> BlipBackbone:
    config = {
        **SMALL_BLIP,
        "text_config": {**SMALL_BLIP["text_config"], "vocab_size": len(vocab), **(text or {})},
    }
    path = tmp_path / f"vocab-{len(vocab)}.txt"
    path.write_text("\n".join(vocab))
    torch.manual_seed(seed)
    return BlipBackbone(config=config, vocab_file=str(path), max_length=32, name="blip_small")


def features(backbone: BlipBackbone, texts=TEXTS) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(123)
    x = torch.randn(2, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad():
        return backbone.eval().encode_image(x), backbone.encode_texts(list(texts))


# ---- the authors' layouts, by hand -----------------------------------------------------------------
def blip_names(state: dict, layers: int) -> dict:
    """An HF BLIP state dict under salesforce/BLIP's names (vit.py VisionTransformer; text_encoder.* is
    med.py's BertModel, whose names HF kept, as it kept vision_proj, text_proj, itm_head)."""
    table = {
        "vision_model.embeddings.class_embedding": "visual_encoder.cls_token",
        "vision_model.embeddings.position_embedding": "visual_encoder.pos_embed",
        "vision_model.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
        "vision_model.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
        "vision_model.post_layernorm.weight": "visual_encoder.norm.weight",
        "vision_model.post_layernorm.bias": "visual_encoder.norm.bias",
    }
    for i in range(layers):
        for hf, blip in [
            ("layer_norm1", "norm1"),
            ("layer_norm2", "norm2"),
            ("self_attn.qkv", "attn.qkv"),
            ("self_attn.projection", "attn.proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ]:
            for p in ("weight", "bias"):
                table[f"vision_model.encoder.layers.{i}.{hf}.{p}"] = f"visual_encoder.blocks.{i}.{blip}.{p}"
    assert all(k in table for k in state if k.startswith("vision_model.")), "mapping incomplete"
    return {table.get(k, k): v for k, v in state.items()}


def write_model_base(backbone: BlipBackbone, path) -> dict:
    """A file laid out as BLIP_Pretrain saves model_base.pth: {'model': state_dict, 'config', 'epoch'} with the
    momentum encoders, the decoder, the ITC queues, the temperature and med.py's position_ids buffers."""
    model = blip_names(backbone.model.state_dict(), SMALL_BLIP["vision_config"]["num_hidden_layers"])
    positions = torch.arange(SMALL_BLIP["text_config"]["max_position_embeddings"]).unsqueeze(0)
    model["text_encoder.embeddings.position_ids"] = positions
    extra = {
        "image_queue": torch.randn(16, 8),
        "text_queue": torch.randn(16, 8),
        "queue_ptr": torch.zeros(1, dtype=torch.long),
        "temp": torch.tensor(0.07),
        "text_decoder.cls.predictions.bias": torch.zeros(len(BLIP_VOCAB) + 2),
    }
    for key, value in model.items():
        if key.startswith(("visual_encoder.", "text_encoder.")):
            extra[key.replace("_encoder.", "_encoder_m.", 1)] = value + 1
        if key.startswith(("vision_proj.", "text_proj.")):
            extra[key.replace("_proj.", "_proj_m.", 1)] = value + 1
        if key.startswith("text_encoder."):
            extra["text_decoder.bert." + key[len("text_encoder.") :]] = value.clone()
    model.update(extra)
    torch.save(
        {"model": model, "config": {"image_size": 224, "vit": "base", "queue_size": 57600}, "epoch": 19}, path
    )
    return model


def reference_text_state(backbone: BlipBackbone) -> dict:
    """Bi-BLIP4CIR's BLIPTextEncoder.state_dict(): text_encoder (med.py BertModel, with its position_ids
    buffer) and text_proj."""
    state = {f"text_encoder.{k}": v for k, v in backbone.model.text_encoder.state_dict().items()}
    state["text_encoder.embeddings.position_ids"] = torch.arange(
        backbone.model.config.text_config.max_position_embeddings
    ).unsqueeze(0)
    state.update({f"text_proj.{k}": v for k, v in backbone.model.text_proj.state_dict().items()})
    return state


def write_tuned_blip(backbone: BlipBackbone, path, epoch: int = 3) -> None:
    """As Bi-BLIP4CIR's utils.save_model writes tuned_blip_*.pt."""
    torch.save(
        {
            "epoch": epoch,
            "BLIPTextEncoder": reference_text_state(backbone),
            "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 5e-5, "params": [0, 1]}]},
        },
        path,
    )


def converter_inputs(tmp_path):
    """A random small BLIP whose vocab ends in [DEC]/[ENC], its model_base-layout file and a BERT tokenizer
    folder without them (as bert-base-uncased)."""
    from transformers import BertTokenizerFast

    source = small(tmp_path, vocab=tuple(BLIP_VOCAB + BLIP_TOKENS))
    file = tmp_path / "model_base.pth"
    written = write_model_base(source, file)
    tokenizer = tmp_path / "bert"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(BLIP_VOCAB)}, do_lower_case=True).save_pretrained(
        tokenizer
    )
    return source, file, written, str(tokenizer)


def architecture(**vision) -> dict:
    return {
        **SMALL_BLIP,
        "vision_config": {**SMALL_BLIP["vision_config"], **vision},
        "text_config": {**SMALL_BLIP["text_config"], "vocab_size": len(BLIP_VOCAB) + 2},
    }


# ---- 1. blip_base fetches through HF's cache; offline, the error says what to do --------------------
def test_hub_model_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(CirlabError) as err:
        BlipBackbone(hf_id="cirlab-tests/no-such-blip")
    message = str(err.value)
    for advice in (
        "HF_HUB_OFFLINE=1",
        "hf download cirlab-tests/no-such-blip",
        "backbone.hf_id=",
        "convert_blip",
    ):
        assert advice in message, advice
    with pytest.raises(CirlabError, match="no such folder"):
        BlipBackbone(hf_id="/nonexistent/blip")


def test_cli_without_the_hub_model_exits_2(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    code, out, err = cli("+method=zeroshot", "backbone=blip_base", "backbone.hf_id=cirlab-tests/no-such-blip")
    assert code == 2 and "hf download" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


# ---- 1b. tokenizers: a folder's own, checked; hub ids stay hub ids; the converter answers at once -----
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)


def test_folder_without_tokenizer_files_is_an_error(cli, tmp_path):
    """transformers 5 would give such a folder a 5-token default tokenizer: every caption the same."""
    small(tmp_path).model.save_pretrained(tmp_path / "blip")  # config.json + model.safetensors only
    for seam in ("hf_id", "checkpoint"):
        with pytest.raises(CirlabError, match="no tokenizer files") as err:
            BlipBackbone(**{seam: str(tmp_path / "blip")})
        assert "tokenizer.json or vocab.txt; it holds config.json, model.safetensors" in str(err.value)
    code, _, err = cli("+method=zeroshot", "backbone=blip_base", f"backbone.hf_id={tmp_path / 'blip'}")
    assert code == 2 and "no tokenizer files" in err and "Traceback" not in err


def test_tokenizer_of_another_size_is_an_error(tmp_path):
    from transformers import BertTokenizerFast

    small(tmp_path).save_pretrained(tmp_path / "blip")
    fewer = BertTokenizerFast(vocab={w: i for i, w in enumerate(BLIP_VOCAB[:-3])}, do_lower_case=True)
    fewer.save_pretrained(tmp_path / "blip")  # replaces the folder's own
    with pytest.raises(CirlabError) as err:
        BlipBackbone(hf_id=str(tmp_path / "blip"))
    n = len(BLIP_VOCAB)
    assert f"(tokenizer.json) has {n - 3} tokens but the model's word embedding has {n} rows" in str(
        err.value
    )


def test_tokenizer_without_blip_tokens_gets_them(tmp_path):
    """HF's Salesforce/blip-itm-* hold bert-base-uncased (30522 tokens) for 30524 rows: BLIP's [DEC], [ENC]
    are added, as BLIP's init_tokenizer does, so a learned direction token gets a row of its own."""
    from transformers import BertTokenizerFast

    n = len(BLIP_VOCAB)
    small(tmp_path, vocab=tuple(BLIP_VOCAB + BLIP_TOKENS)).model.save_pretrained(tmp_path / "blip")
    BertTokenizerFast(vocab={w: i for i, w in enumerate(BLIP_VOCAB)}).save_pretrained(tmp_path / "blip")
    loaded = BlipBackbone(hf_id=str(tmp_path / "blip"))
    assert (
        loaded.tokenizer.convert_tokens_to_ids(BLIP_TOKENS) == [n, n + 1]
        and loaded.tokenizer.bos_token == "[DEC]"
    )
    loaded.add_tokens(["[fwd]"])
    assert loaded.tokenizer.convert_tokens_to_ids("[fwd]") == n + 2
    assert loaded.model.text_encoder.get_input_embeddings().weight.shape[0] == n + 3


@pytest.mark.parametrize("network", ["offline", "unreachable"])
def test_convert_without_the_tokenizer_answers_at_once(network, cli, tmp_path, monkeypatch):
    """Not transformers' minutes of retries per file: one request to the hub, and the +tokenizer=DIR advice."""
    if network == "offline":
        offline(monkeypatch)
    else:  # online, but nothing answers (a closed local port) and an empty cache
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
        monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
        monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    _, file, _, _ = converter_inputs(tmp_path)
    start = time.monotonic()
    with pytest.raises(CirlabError) as err:
        convert_blip_checkpoint(file, tmp_path / "out", architecture())
    assert time.monotonic() - start < 5
    why = "HF_HUB_OFFLINE=1" if network == "offline" else "could not be downloaded"
    assert (
        "'bert-base-uncased'" in str(err.value)
        and why in str(err.value)
        and "+tokenizer=DIR" in str(err.value)
    )
    code, _, err = cli("+task=convert_blip", f"+src={file}", f"+out={tmp_path / 'out'}")
    assert (
        code == 2 and "+tokenizer=DIR" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    )


def test_a_folder_here_never_stands_in_for_a_hub_id(tmp_path, monkeypatch):
    """`bert-base-uncased` and `org/name` are hub ids whatever the working directory holds; ./name is the folder."""
    import shutil

    offline(monkeypatch)
    _, file, _, tokenizer = converter_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tokenizer, "bert-base-uncased")
    with pytest.raises(CirlabError, match="write ./bert-base-uncased to use it"):
        convert_blip_checkpoint(file, tmp_path / "out", architecture(), tokenizer="bert-base-uncased")
    convert_blip_checkpoint(file, tmp_path / "out", architecture(), tokenizer="./bert-base-uncased")
    shutil.copytree(tmp_path / "out", tmp_path / "org" / "blip")
    with pytest.raises(CirlabError, match="HF_HUB_OFFLINE=1.*write ./org/blip to use it"):
        BlipBackbone(hf_id="org/blip")
    assert BlipBackbone(hf_id="./org/blip").tokenizer.bos_token == "[DEC]"


def test_converted_folder_follows_the_umask(tmp_path):
    """Not mkdtemp's 0700 nor the 0600 transformers gives model.safetensors."""
    import os
    import stat

    _, file, _, tokenizer = converter_inputs(tmp_path)
    old = os.umask(0o027)
    try:
        convert_blip_checkpoint(file, tmp_path / "out", architecture(), tokenizer=tokenizer)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert modes == dict.fromkeys(
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"], 0o640
    )


# ---- 3. model_base.pth -> save_pretrained folder ----------------------------------------------------
# The features of a converted file against BLIP's own: tests/test_golden_blip.py (files written by BLIP's code,
# every tensor random, so a swapped key changes them; a hand-written file with HF's default init would not).
def test_pretraining_position_embedding_is_resized_as_blip_does(tmp_path):
    """model_base.pth is pretrained at 224 px and used at 384: BLIP's vit.interpolate_pos_embed (bicubic
    on the patch grid, CLS row kept)."""
    source, file, _, tokenizer = converter_inputs(tmp_path)
    convert_blip_checkpoint(file, tmp_path / "blip32", architecture(image_size=32), tokenizer=tokenizer)
    converted = BlipBackbone(hf_id=str(tmp_path / "blip32"), max_length=32)
    pos = source.model.vision_model.embeddings.position_embedding.detach()  # [1, 1 + 2x2, 16]
    grid = pos[:, 1:].reshape(-1, 2, 2, 16).permute(0, 3, 1, 2)
    grid = (
        F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False)
        .permute(0, 2, 3, 1)
        .flatten(1, 2)
    )
    expected = torch.cat([pos[:, :1], grid], dim=1)
    assert torch.equal(converted.model.vision_model.embeddings.position_embedding.detach(), expected)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m: m.pop("itm_head.weight"), "missing in the file"),
        (
            lambda m: m.update({"text_encoder.pooler.dense.weight": torch.zeros(16, 16)}),
            "not used by the model",
        ),
        (lambda m: m.update({"vision_proj.weight": torch.zeros(8, 16)}), "another shape"),
    ],
)
def test_converter_is_strict(tmp_path, change, match):
    _, file, written, tokenizer = converter_inputs(tmp_path)
    obj = torch.load(file, weights_only=True)
    change(obj["model"])
    torch.save(obj, file)
    with pytest.raises(CirlabError, match=match):
        convert_blip_checkpoint(file, tmp_path / "out", architecture(), tokenizer=tokenizer)
    assert not (tmp_path / "out").exists()


def test_converter_refuses_other_files_and_tokenizers(tmp_path):
    _, file, _, tokenizer = converter_inputs(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CirlabError, match="under 'model'"):
        convert_blip_checkpoint(tmp_path / "other.pt", tmp_path / "out", architecture(), tokenizer=tokenizer)
    wrong = {
        **architecture(),
        "text_config": {**SMALL_BLIP["text_config"], "vocab_size": len(BLIP_VOCAB) + 2},
    }
    torch.save({"model": {}}, tmp_path / "empty.pth")
    with pytest.raises(CirlabError, match="missing in the file"):
        convert_blip_checkpoint(tmp_path / "empty.pth", tmp_path / "out", wrong, tokenizer=tokenizer)
    from transformers import BertTokenizerFast

    fewer = tmp_path / "fewer"
    BertTokenizerFast(vocab={w: i for i, w in enumerate(BLIP_VOCAB[:-1])}).save_pretrained(fewer)
    with pytest.raises(CirlabError, match=r"with \[DEC\]/\[ENC\], but the checkpoint's word embedding has"):
        convert_blip_checkpoint(file, tmp_path / "out", architecture(), tokenizer=str(fewer))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CirlabError, match="empty has no tokenizer files"):
        convert_blip_checkpoint(file, tmp_path / "out", architecture(), tokenizer=str(tmp_path / "empty"))
    with pytest.raises(CirlabError, match="no such folder"):
        convert_blip_checkpoint(file, tmp_path / "out", architecture(), tokenizer=str(tmp_path / "nowhere"))
    (tmp_path / "out").mkdir()
    with pytest.raises(CirlabError, match="already exists"):
        convert_blip_checkpoint(file, tmp_path / "out", architecture(), tokenizer=tokenizer)


def test_sizes_are_read_from_the_file_as_for_blip_large():
    """model_large.pth: ViT-L/16 (1024 wide, 24 blocks, 16 heads of 64) with BERT-base cross-attending to it."""
    import yaml

    from cirlab.backbones.blip_convert import infer_architecture

    meta = {
        "visual_encoder.cls_token": (1, 1, 1024),
        "visual_encoder.patch_embed.proj.weight": (1024, 3, 16, 16),
        "visual_encoder.blocks.0.mlp.fc1.weight": (4096, 1024),
        "visual_encoder.blocks.23.norm1.weight": (1024,),
        "text_encoder.embeddings.word_embeddings.weight": (30524, 768),
        "text_encoder.embeddings.position_embeddings.weight": (512, 768),
        "text_encoder.encoder.layer.0.intermediate.dense.weight": (3072, 768),
        "text_encoder.encoder.layer.0.crossattention.self.key.weight": (768, 1024),
        "text_encoder.encoder.layer.11.output.dense.weight": (768, 3072),
        "vision_proj.weight": (256, 1024),
    }
    state = {k: torch.empty(shape, device="meta") for k, shape in meta.items()}
    base = yaml.safe_load(open("conf/backbone/blip_base.yaml"))["architecture"]
    arch = infer_architecture(state, base)
    vision, text = arch["vision_config"], arch["text_config"]
    assert (vision["hidden_size"], vision["num_hidden_layers"], vision["num_attention_heads"]) == (
        1024,
        24,
        16,
    )
    assert (vision["intermediate_size"], vision["patch_size"], vision["image_size"]) == (4096, 16, 384)
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)
    assert (text["encoder_hidden_size"], text["vocab_size"], arch["image_text_hidden_size"]) == (
        1024,
        30524,
        256,
    )


def test_convert_task_errors_exit_2(cli, tmp_path):
    _, file, _, tokenizer = converter_inputs(tmp_path)
    code, _, err = cli("+task=convert_blip", f"+src={file}")
    assert code == 2 and "+out=DIR" in err
    for backbone in (
        [],
        ["backbone=blip_base"],
    ):  # blip_base's architecture either way: its 64-wide heads do not divide the file's width 16
        code, _, err = cli(
            "+task=convert_blip",
            *backbone,
            f"+src={file}",
            f"+out={tmp_path / 'out'}",
            f"+tokenizer={tokenizer}",
        )
        assert (
            code == 2
            and "attention heads" in err
            and "num_attention_heads=N" in err
            and "Traceback" not in err
        )
        assert not (tmp_path / "out").exists()


# ---- 2. backbone.checkpoint: BLIP4CIR+Bi's text encoder file, cirlab checkpoints --------------------
def test_tuned_blip_file_fills_the_text_side_only(tmp_path):
    tuned = small(tmp_path, seed=1)
    write_tuned_blip(tuned, tmp_path / "tuned_blip_best.pt")
    base_image, _ = features(small(tmp_path, seed=0))
    loaded = small(tmp_path, seed=0)
    assert loaded.load_weights_file(tmp_path / "tuned_blip_best.pt").startswith("BLIP4CIR+Bi text encoder")
    image, text = features(loaded)
    assert torch.equal(text, features(tuned)[1])  # the file's text encoder + text_proj
    assert torch.equal(image, base_image)  # the image side stays the base model's


def test_cirlab_stage_checkpoint_loads_the_whole_backbone(tmp_path):
    trained = small(tmp_path, seed=1)
    module = Blip4CirFinetune(trained)
    torch.save({"epoch": 2, "state_dict": module.state_dict()}, tmp_path / "best.ckpt")
    loaded = small(tmp_path, seed=0)
    loaded.load_weights_file(tmp_path / "best.ckpt")
    for ours, theirs in zip(features(loaded), features(trained)):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "obj,shown",
    [
        ({"Phi": {"layers.0.weight": torch.zeros(2, 2)}}, "'Phi'"),
        ({"epoch": 1, "CLIP": {"visual.proj": torch.zeros(2, 2)}}, "'CLIP'"),
        (torch.zeros(3), "a Tensor"),
    ],
)
def test_other_files_name_the_accepted_layouts(tmp_path, obj, shown):
    torch.save(obj, tmp_path / "x.pt")
    with pytest.raises(CirlabError) as err:
        small(tmp_path).load_weights_file(tmp_path / "x.pt")
    message = str(err.value)
    assert shown in message and "BLIPTextEncoder" in message and "cirlab stage checkpoint" in message
    assert "save_pretrained" in message


def test_size_mismatch_and_missing_file_are_clear_errors(tmp_path):
    bigger = small(tmp_path, text={"hidden_size": 32, "intermediate_size": 64})
    write_tuned_blip(bigger, tmp_path / "tuned_big.pt")
    with pytest.raises(CirlabError, match="another shape"):
        small(tmp_path).load_weights_file(tmp_path / "tuned_big.pt")
    with pytest.raises(CirlabError, match="no such file or folder"):
        BlipBackbone(hf_id="cirlab-tests/unused", checkpoint=str(tmp_path / "missing.pt"))


@pytest.mark.parametrize(
    "file,shown",
    [
        ("phi.pt", "BLIPTextEncoder"),
        ("missing.pt", "no such file or folder"),
        ("tuned_big.pt", "another shape"),
    ],
)
def test_cli_bad_backbone_checkpoint_exits_2_without_results(cli, tmp_path, file, shown):
    small(tmp_path).save_pretrained(tmp_path / "blip")
    torch.save({"Phi": {"w": torch.zeros(2)}}, tmp_path / "phi.pt")
    write_tuned_blip(
        small(tmp_path, text={"hidden_size": 32, "intermediate_size": 64}), tmp_path / "tuned_big.pt"
    )
    code, _, err = cli(
        "+method=blip4cir_bi",
        "backbone=blip_base",
        f"backbone.hf_id={tmp_path / 'blip'}",
        f"backbone.checkpoint={tmp_path / file}",
    )
    assert code == 2 and "cirlab error" in err and shown in err and "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


# ---- 4. export in the reference layout ---------------------------------------------------------------
def test_export_writes_the_reference_text_encoder_file(tmp_path):
    trained = small(tmp_path, seed=1)
    files = Blip4CirFinetune.reference_files(Blip4CirFinetune(trained).state_dict(), 4)
    assert list(files) == ["tuned_blip.pt"]
    obj = files["tuned_blip.pt"]
    assert obj["epoch"] == 4
    expected = reference_text_state(trained)
    assert set(obj["BLIPTextEncoder"]) == set(expected)  # the keys BLIPTextEncoder.load_state_dict wants
    assert all(torch.equal(obj["BLIPTextEncoder"][k], v) for k, v in expected.items())


def test_export_with_learned_direction_tokens_round_trips(tmp_path):
    trained = small(tmp_path, seed=1)
    module = Blip4CirFinetune(trained, direction="learned")
    with torch.no_grad():
        trained.model.text_encoder.get_input_embeddings().weight[-2:] += 1.0  # "trained" direction rows
    torch.save(
        Blip4CirFinetune.reference_files(module.state_dict(), 1)["tuned_blip.pt"], tmp_path / "tuned.pt"
    )
    fresh = small(tmp_path, seed=0)
    fresh.load_weights_file(tmp_path / "tuned.pt")  # grows the embedding to the file's rows
    Blip4CirFinetune(fresh, direction="learned")  # the method names the rows again, in the same order
    texts = ["[fwd] is red", "[bwd] has sandals"]
    assert torch.equal(features(fresh, texts)[1], features(trained, texts)[1])


def test_method_finetune_checkpoint_accepts_the_reference_file(tmp_path):
    tuned = small(tmp_path, seed=1)
    write_tuned_blip(tuned, tmp_path / "tuned_blip_best.pt")
    module = Blip4CirFinetune(small(tmp_path, seed=0))
    layout = load_weights(
        module.stage_weights(),
        tmp_path / "tuned_blip_best.pt",
        module.checkpoint_layouts(),
        "method.finetune.checkpoint",
    )
    assert layout.startswith("BLIP4CIR+Bi text encoder")
    assert torch.equal(features(module.backbone)[1], features(tuned)[1])


def test_combiner_file_uses_the_reference_parameter_names(tmp_path):
    """Bi-BLIP4CIR's combiner.py: text/image_projection_layer, combiner_layer, output_layer, dynamic_scalar.{0,3}."""
    d, p, h = 16, 8, 12
    shapes = {
        "text_projection_layer": (p, d),
        "image_projection_layer": (p, d),
        "combiner_layer": (h, 2 * p),
        "output_layer": (d, h),
        "dynamic_scalar.0": (h, 2 * p),
        "dynamic_scalar.3": (1, h),
    }
    state = {}
    for name, (rows, cols) in shapes.items():
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.randn(rows, cols), torch.randn(rows)
    torch.save({"epoch": 7, "Combiner": state, "optimizer_state_dict": {}}, tmp_path / "combiner.pt")
    module = Blip4CirCombiner(small(tmp_path), projection_dim=p, hidden_dim=h)
    load_weights(
        module.stage_weights(),
        tmp_path / "combiner.pt",
        module.checkpoint_layouts(),
        "method.combiner.checkpoint",
    )
    assert all(torch.equal(module.combiner.state_dict()[k], v) for k, v in state.items())


# ---- 5. the eval_released experiments -------------------------------------------------------------------
@pytest.mark.parametrize(
    "dataset,text_file,combiner_file",
    [("fashioniq", "tuned_blip_best.pt", "combiner.pt"), ("cirr", "tuned_blip_mean.pt", "combiner_mean.pt")],
)
def test_eval_released_experiments_compose_and_build(
    dataset, text_file, combiner_file, small_blip, monkeypatch, tmp_path
):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.test_experiments import compose_experiment

    monkeypatch.setenv("CIRLAB_DATA", str(tmp_path / "data"))
    cfg = compose_experiment(f"eval_released_blip4cir_bi_{dataset}")
    r = OmegaConf.to_container(cfg, resolve=True)
    released = tmp_path / "data" / "released"
    assert (r["dataset"]["name"], r["dataset"]["preprocess"]) == (dataset, "targetpad")
    assert r["trainer"]["precision"] == "32-true"  # as the reference's validate.py
    assert r["backbone"]["name"] == "blip_base" and r["backbone"]["hf_id"] == str(
        released / "blip_model_base"
    )
    assert r["backbone"]["checkpoint"] == str(released / "blip4cir_bi" / dataset / text_file)
    m = r["method"]
    assert (m["direction"], m["stages"], m["combiner"]["max_epochs"]) == ("text", ["combiner"], 0)
    assert m["combiner"]["checkpoint"] == str(released / "blip4cir_bi" / dataset / combiner_file)
    assert (m["combiner"]["module"]["projection_dim"], m["combiner"]["module"]["hidden_dim"]) == (2560, 5120)
    module = instantiate(
        cfg.method.combiner.module,
        backbone=small_blip,
        search=cfg.retrieval.search,
        search_options=OmegaConf.to_container(cfg.retrieval.options),
    )
    assert isinstance(module, Blip4CirCombiner)
    assert module.combiner.text_projection_layer.weight.shape == (2560, small_blip.embed_dim)


# ---- 4. CLI round trip: train, export, evaluate the exported files --------------------------------------
@pytest.mark.slow
def test_export_and_reload_reproduce_the_test_metrics(cli, tmp_path):
    from cirlab.pretrain import caption_vocab

    small(tmp_path, vocab=tuple(caption_vocab(str(CACHE)))).save_pretrained(tmp_path / "blip")
    base = [
        "+method=blip4cir_bi",
        "backbone=blip_base",
        f"backbone.hf_id={tmp_path / 'blip'}",
        "eval.visualize=false",
    ]
    code, _, err = cli(
        *base,
        "method.finetune.max_epochs=1",
        "method.combiner.max_epochs=1",
        "+trainer.limit_train_batches=3",
        run_dir=tmp_path / "r1",
    )  # a few steps: any weights do
    assert code == 0, err
    code, out, err = cli("+task=export", f"+run={tmp_path / 'r1'}")
    assert code == 0, err
    exported = tmp_path / "r1" / "reference"
    assert {p.name for p in exported.iterdir()} == {"tuned_blip.pt", "combiner.pt"}
    code, _, err = cli(
        *base,
        f"backbone.checkpoint={exported / 'tuned_blip.pt'}",
        "method.finetune.max_epochs=0",
        "method.combiner.max_epochs=0",
        f"method.combiner.checkpoint={exported / 'combiner.pt'}",
        run_dir=tmp_path / "r2",
    )
    assert code == 0, err
    first, second = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("r1", "r2"))
    assert second["stages"] == first["stages"]
    assert second["metrics"] == first["metrics"] and first["metrics"]["test/recall_at_50"] > 0
    assert second["selection"] == {"finetune": "no training", "combiner": "given checkpoint (no training)"}


def test_blip_tiny_takes_a_tuned_blip_file_over_its_pretrained_weights(tmp_path, monkeypatch, synthetic_root):
    import yaml

    from cirlab import pretrain

    monkeypatch.setattr(
        pretrain, "load_or_pretrain", lambda backbone, *args: backbone
    )  # no 4-min pretraining here
    model = yaml.safe_load(open("conf/backbone/blip_tiny.yaml"))["model"]

    def build(seed, checkpoint=None):
        return pretrain.pretrained_blip_tiny(
            str(CACHE), model["model_cfg"], {**model["pretrain"], "seed": seed}, checkpoint=checkpoint
        )

    tuned = build(1)
    write_tuned_blip(tuned, tmp_path / "tuned_blip_best.pt")
    loaded = build(0, checkpoint=str(tmp_path / "tuned_blip_best.pt"))
    image, text = features(loaded)
    assert torch.equal(text, features(tuned)[1]) and torch.equal(image, features(build(0))[0])
    with pytest.raises(CirlabError, match="no such file or folder"):
        build(0, checkpoint=str(tmp_path / "missing.pt"))


def test_sincos_position_codes_by_hand():
    from cirlab.pretrain import sincos_2d, sincos_positions

    # grid 2, dim 4: one frequency (w = 1); columns sin y, cos y, sin x, cos x; patches row-major
    s, c = math.sin(1), math.cos(1)
    expected = torch.tensor([[0, 1, 0, 1], [0, 1, s, c], [s, c, 0, 1], [s, c, s, c]])
    assert torch.allclose(sincos_2d(2, 4), expected.float())
    # dim 8: frequencies 1 and 1e-2, sin(y w0), sin(y w1), cos(y w0), ...
    assert torch.allclose(
        sincos_2d(2, 8)[2], torch.tensor([s, math.sin(0.01), c, math.cos(0.01), 0, 0, 1, 1])
    )
    with pytest.raises(CirlabError, match="divisible by 4"):
        sincos_positions(torch.zeros(1, 5, 6), 1.0)


def test_blip_tiny_pretrains_on_a_pinned_thread_count(monkeypatch, tmp_path):
    """The thread count decides the float sums, so the weights: blip_tiny pins it while it pretrains."""
    import yaml

    from cirlab import pretrain

    pinned = {
        n: yaml.safe_load(open(f"conf/backbone/{n}.yaml"))["model"]["pretrain"]["threads"]
        for n in ("blip_tiny", "tiny")
    }
    assert pinned == {"blip_tiny": 1, "tiny": 2}  # tiny: the 2-thread build the README was measured on
    seen = []
    monkeypatch.setattr(
        pretrain, "pretrain_on_captions", lambda *a: seen.append(torch.get_num_threads()) or {}
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # as on a 2-core machine (the test workers run on 1)
    try:
        for threads in (1, None):
            pretrain.load_or_pretrain(
                small(tmp_path), str(tmp_path), {"t": threads}, {"threads": threads}, "b"
            )
        assert seen == [1, 2] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_blip_tiny_starts_from_sincos_positions(monkeypatch, synthetic_root):
    import yaml

    from cirlab import pretrain

    monkeypatch.setattr(pretrain, "load_or_pretrain", lambda backbone, *args: backbone)  # untrained
    model = yaml.safe_load(open("conf/backbone/blip_tiny.yaml"))["model"]
    assert (model["pretrain"]["position_init"], model["pretrain"]["position_scale"]) == ("sincos", 2.0)
    built = pretrain.pretrained_blip_tiny(str(CACHE), model["model_cfg"], model["pretrain"])
    positions = built.model.vision_model.embeddings.position_embedding[0]
    assert torch.equal(positions[1:], 2 * pretrain.sincos_2d(4, 64)) and not positions[0].any()  # 4x4 patches
    random_init = pretrain.pretrained_blip_tiny(
        str(CACHE), model["model_cfg"], {**model["pretrain"], "position_init": "random"}
    )
    assert not torch.equal(random_init.model.vision_model.embeddings.position_embedding[0, 1:], positions[1:])


@pytest.mark.parametrize("dataset", ["fashioniq", "cirr"])
def test_eval_released_runs_on_the_official_layout(dataset, cli, tmp_path):
    """The experiment end to end with small stand-ins for model_base, tuned_blip and combiner files."""
    from fixtures.make_images import materialize

    root = materialize(dataset, tmp_path / dataset)
    small(tmp_path).save_pretrained(tmp_path / "blip_model_base")
    write_tuned_blip(small(tmp_path, seed=1), tmp_path / "tuned_blip.pt")
    combiner = Blip4CirCombiner(small(tmp_path), projection_dim=8, hidden_dim=12).combiner
    torch.save({"epoch": 0, "Combiner": combiner.state_dict()}, tmp_path / "combiner.pt")
    run = tmp_path / "run"
    code, out, err = cli(
        f"+experiment=eval_released_blip4cir_bi_{dataset}",
        f"dataset.root={root}",
        "trainer=cpu",
        f"backbone.hf_id={tmp_path / 'blip_model_base'}",
        f"backbone.checkpoint={tmp_path / 'tuned_blip.pt'}",
        f"method.combiner.checkpoint={tmp_path / 'combiner.pt'}",
        "method.combiner.module.projection_dim=8",
        "method.combiner.module.hidden_dim=12",
        "eval.visualize=false",
        run_dir=run,
    )
    assert code == 0, err
    res = json.loads((run / "results.json").read_text())
    assert res["selection"] == {"combiner": "given checkpoint (no training)"}
    assert res["config"]["trainer"]["accelerator"] == "cpu" and res["metrics"]
