"""What a user can fix ends in one CirlabError naming the file or key and the fix, never a traceback: failed
or offline open_clip downloads, a checkpoint that does not fit, errors Hydra's instantiate wraps (for
`cirlab.load` and `cirlab-query` too), a busy demo port, a missing BLIP vocab file, an image over Pillow's
decompression-bomb limit. Nothing here downloads, trains or waits on a network."""

from __future__ import annotations

import json
import shutil
import socket
import urllib.error
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from PIL import Image

from cirlab.errors import CirlabError, user_cause

# ---- open_clip downloads -----------------------------------------------------------------------------
# what a failed or offline download raises (measured with HF_ENDPOINT / a URL on a closed port): open_clip 2.x
# passes these on from create_model, open_clip 3.x from get_tokenizer's HF tokenizers and hf-hub models
OFFLINE = {
    "urllib": urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
    "hf cache miss": LocalEntryNotFoundError("cannot find the requested files in the local cache"),
    "hf offline": OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode is enabled"),
    "open_clip hf": FileNotFoundError("Failed to download file (open_clip_pytorch_model.bin) for timm/x"),
    "transformers": OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
}


def raiser(err: BaseException):
    def fail(*args, **kwargs):
        raise err

    return fail


def download_message(message: str) -> None:
    assert "could not load open_clip RN50 with backbone.pretrained=openai" in message, message
    assert "needs network" in message and "backbone.pretrained=/path/to/weights.pt" in message, message


@pytest.mark.parametrize("where", ["create_model", "get_tokenizer"])
@pytest.mark.parametrize("error", list(OFFLINE))
def test_failed_open_clip_download_names_the_key_and_the_fix(monkeypatch, where, error):
    from cirlab.backbones.openclip import OpenCLIPBackbone

    monkeypatch.setattr(open_clip, "create_model", lambda *a, **kw: object())  # no model is built
    monkeypatch.setattr(open_clip, where, raiser(OFFLINE[error]))
    with pytest.raises(CirlabError) as exc:
        OpenCLIPBackbone(model_name="RN50", pretrained="openai")
    download_message(str(exc.value))
    assert type(OFFLINE[error]).__name__ in str(exc.value)


def test_open_clip_3_wrapped_download_failure(monkeypatch):
    """open_clip >= 3 turns a tag's failed download into a RuntimeError: the same message."""
    from cirlab.backbones.openclip import OpenCLIPBackbone

    monkeypatch.setattr("open_clip.factory.download_pretrained", raiser(OFFLINE["urllib"]))
    with pytest.raises(CirlabError) as exc:
        OpenCLIPBackbone(model_name="RN50", pretrained="openai")
    download_message(str(exc.value))


# ---- cirlab.load and cirlab-query ------------------------------------------------------------------------
@pytest.fixture
def run_copy(shared_run, tmp_path) -> Path:
    """A copy of the zero-shot baseline several test files share (built once per session)."""
    copy = tmp_path / "run"
    run = shared_run("+method=zeroshot", "method.fusion=sum")
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("*.npy", "predictions*", "visual*"))
    return copy


def set_backbone(run: Path, node: dict) -> None:
    """backbone.model of the run's config.yaml and of its results.json."""
    cfg_path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path)
    OmegaConf.update(cfg, "backbone.model", node, merge=False)
    OmegaConf.save(cfg, cfg_path)
    results = json.loads((run / "results.json").read_text())
    results["config"]["backbone"]["model"] = node
    (run / "results.json").write_text(json.dumps(results))


def test_load_unwraps_a_cirlab_error_raised_inside_instantiate(run_copy, monkeypatch):
    """A run whose backbone cannot download its weights: `cirlab.load` raises the backbone's CirlabError,
    not Hydra's InstantiationException around it."""
    import cirlab

    set_backbone(
        run_copy,
        {
            "_target_": "cirlab.backbones.openclip.OpenCLIPBackbone",
            "model_name": "RN50",
            "pretrained": "openai",
        },
    )
    monkeypatch.setattr(open_clip, "create_model", raiser(OFFLINE["hf cache miss"]))
    with pytest.raises(CirlabError) as exc:
        cirlab.load(run_copy)
    download_message(str(exc.value))


def test_load_of_a_checkpoint_that_does_not_fit_names_the_file_and_the_keys(run_copy):
    import cirlab

    ckpt = run_copy / "stages" / "eval" / "checkpoints" / "other.ckpt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": {"combiner.weight": torch.zeros(2, 2)}}, ckpt)
    with pytest.raises(CirlabError) as exc:
        cirlab.load(ckpt)
    message = str(exc.value)
    assert f"checkpoint {ckpt} does not fit ZeroShot" in message, message
    assert (
        "1 not used by the model: combiner.weight" in message and "missing in the file: backbone." in message
    )


def wrapped(message: str) -> InstantiationException:
    """A CirlabError inside two of Hydra's wrappers (a target that instantiates another)."""
    try:
        try:
            try:
                raise CirlabError(message)
            except CirlabError as err:
                raise InstantiationException("Error in call to target 'inner'") from err
        except InstantiationException as err:
            raise InstantiationException("Error in call to target 'outer'") from err
    except InstantiationException as err:
        return err


def test_cirlab_query_unwraps_instantiation_errors(monkeypatch, tmp_path, capsys):
    from cirlab import api

    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    argv = ["--run", str(tmp_path), "--gallery", str(tmp_path), "--text", "red"]
    monkeypatch.setattr(api, "load", raiser(wrapped("backbone.checkpoint=x.pt: no such file")))
    with pytest.raises(SystemExit) as exc:
        api.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "cirlab-query error: backbone.checkpoint=x.pt: no such file" in err
    assert "Traceback" not in err

    bug = RuntimeError("an internal bug")
    monkeypatch.setattr(api, "load", raiser(bug))  # a bug is not a user's error: its traceback
    with pytest.raises(RuntimeError):
        api.main(argv)


def test_user_cause():
    assert str(user_cause(wrapped("fix me"))) == "fix me"
    assert user_cause(CirlabError("x")) is not None and user_cause(RuntimeError("x")) is None
    try:
        raise InstantiationException("Error in call to target 'x'") from KeyError("bug")
    except InstantiationException as err:
        assert user_cause(err) is None


# ---- the demo's port ---------------------------------------------------------------------------------
def test_demo_on_a_busy_port_exits_2_naming_the_port(monkeypatch, tmp_path, capsys):
    try:
        import gradio as gr
    except ImportError:
        pytest.skip("the demo needs gradio: pip install 'cirlab[demo]'")
    from cirlab.demo import app as demo

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}\n")
    made = {}

    def build_app(backend, run_, shown, k):
        made["shown"] = shown
        with gr.Blocks() as app:
            gr.Markdown("busy")
        return app, None

    monkeypatch.setattr(demo, "load_backend", lambda *a, **kw: None)
    monkeypatch.setattr(demo, "build_app", build_app)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            demo.main([str(run), "--port", str(port)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    assert f"cirlab-demo error: cannot serve on 127.0.0.1:{port}: port {port} is taken" in err, err
    assert "--port N" in err
    assert not made["shown"].folder.exists()  # the copies are removed on this exit too


def test_demo_launch_passes_on_an_oserror_that_is_not_the_port(tmp_path):
    """Only an address Gradio cannot serve on becomes the --port message; another OSError stays a bug's."""
    from cirlab.demo import app as demo

    class Broken:
        def launch(self, **options):
            raise OSError("[Errno 2] No such file or directory: 'x.log'")

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    shown = demo.ShownImages()
    try:
        with pytest.raises(OSError, match="x.log"):
            demo.launch(Broken(), None, shown, "127.0.0.1", port)
    finally:
        shown.close()


# ---- BLIP's vocab file ---------------------------------------------------------------------------------
def test_missing_or_empty_blip_vocab_file_names_it(tmp_path):
    from cirlab.backbones.blip import BlipBackbone

    missing = tmp_path / "vocab.txt"
    with pytest.raises(CirlabError) as exc:
        BlipBackbone(config={}, vocab_file=str(missing))  # refused before any model is built
    assert f"backbone.model.vocab_file={missing}: cannot read it (FileNotFoundError" in str(exc.value)
    assert "WordPiece vocab.txt" in str(exc.value)
    missing.write_text("")
    with pytest.raises(CirlabError, match="is empty"):
        BlipBackbone(config={}, vocab_file=str(missing))


# ---- Pillow's decompression-bomb guard -----------------------------------------------------------------
def test_image_over_the_pixel_limit_names_the_file_and_how_to_allow_it(tmp_path, monkeypatch):
    from cirlab.data import images
    from cirlab.demo.gallery import folder_gallery

    big, small = tmp_path / "big.png", tmp_path / "small.png"
    Image.new("RGB", (8, 8)).save(big)  # 64 pixels
    Image.new("RGB", (2, 2)).save(small)
    monkeypatch.delenv(images.PIXEL_LIMIT_ENV, raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # refused above 2 x 16: Pillow's rule, a small limit
    images.apply_pixel_limit()  # unset: Pillow's limit stays (the reference's, its default)
    assert Image.MAX_IMAGE_PIXELS == 16
    with pytest.raises(CirlabError) as exc:
        images.load_image(big)
    message = str(exc.value)
    assert f"image too large to decode safely: {big}" in message and "CIRLAB_MAX_IMAGE_PIXELS" in message
    assert "PIL.Image.MAX_IMAGE_PIXELS (16 pixels)" in message
    # the demo's gallery lists it as unreadable and keeps the rest
    gallery = folder_gallery(tmp_path)
    assert gallery.paths == [small] and gallery.unreadable[0][0] == big
    assert "CIRLAB_MAX_IMAGE_PIXELS" in gallery.unreadable[0][1]

    monkeypatch.setenv(images.PIXEL_LIMIT_ENV, "100")
    images.apply_pixel_limit()
    assert images.load_image(big).size == (8, 8)
    monkeypatch.setenv(images.PIXEL_LIMIT_ENV, "none")
    images.apply_pixel_limit()
    assert Image.MAX_IMAGE_PIXELS is None
    monkeypatch.setenv(images.PIXEL_LIMIT_ENV, "lots")
    with pytest.raises(CirlabError, match="CIRLAB_MAX_IMAGE_PIXELS=lots: give a number of pixels or none"):
        images.apply_pixel_limit()
