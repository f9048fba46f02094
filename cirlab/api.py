"""Python API over a finished run: `cirlab.load(run_dir_or_ckpt)` -> a `Retriever`.

    import cirlab
    r = cirlab.load("outputs/runs/2026-..._clip4cir-synthetic-tiny")
    r.index(sorted(Path("gallery").glob("*.png")))
    r.search("reference.png", "has a red circle on the left", k=10)  # [(path, score), ...]

The run's `.hydra/config.yaml` rebuilds the backbone and the final stage's module (Hydra
instantiate); weights come from the best checkpoints listed in `stages/<stage>/done.json` (the
backbone from the latest stage that trained, the module from the final stage). Gallery embeddings
are cached on disk with the feature cache (keyed by backbone weights, preprocessing and file list).
Console: `cirlab-query --run RUN --gallery DIR --image IMG --text "..." -k 10`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.errors import CirlabError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def _run_and_stage(path: Path) -> tuple[Path, str | None, Path | None]:
    """(run folder, stage name or None = final, checkpoint or None) from a run folder or a .ckpt."""
    if path.is_file() and path.suffix == ".ckpt":
        # <run>/stages/<stage>/checkpoints/<name>.ckpt
        if path.parent.name != "checkpoints" or path.parents[2].name != "stages":
            raise CirlabError(
                f"{path} is not inside <run>/stages/<stage>/checkpoints/: give the run folder instead"
            )
        return path.parents[3], path.parents[1].name, path
    if path.is_dir():
        return path, None, None
    raise CirlabError(f"{path} is neither a run folder nor a checkpoint file")


def _checkpoint_of(run_dir: Path, stage: str) -> Path | None:
    from cirlab.io import read_json

    done = run_dir / "stages" / stage / "done.json"
    if not done.is_file():
        return None
    best = read_json(done).get("best_checkpoint")
    if not best:
        return None
    best = Path(best)
    if not best.is_file():  # the run folder was moved: same layout under the new location
        moved = run_dir / "stages" / stage / "checkpoints" / best.name
        if not moved.is_file():
            raise CirlabError(f"stage {stage}: checkpoint {best} listed in {done} is missing")
        best = moved
    return best


class Retriever:
    """A trained CIR model with an indexed gallery."""

    def __init__(self, module, cfg, run_dir: Path | None = None, stage: str | None = None):
        self.module, self.cfg, self.run_dir, self.stage = module, cfg, run_dir, stage
        self.module.eval()
        self.backbone = module.backbone
        self.paths: list[Path] = []
        self.gallery: torch.Tensor | None = None  # [N, D] normalised gallery embeddings

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @torch.no_grad()
    def raw_features(self, paths: Sequence[Path], encoder=None) -> torch.Tensor:
        """Raw image features of `paths` by `encoder` (default: the backbone), through the run's feature
        cache when it has one."""
        from cirlab.data.features import FeatureCache, encode_images

        encoder = encoder or self.backbone
        paths = [Path(p).resolve() for p in paths]
        cache_dir = self.cfg.paths.get("cache_dir") if self.cfg is not None else None
        if cache_dir:
            feats = FeatureCache(cache_dir, batch_size=self.cfg.eval.batch_size).get(
                encoder, [str(p) for p in paths], paths
            )
            return torch.stack([feats[str(p)] for p in paths])
        return encode_images(encoder, paths)

    @torch.no_grad()
    def index(self, gallery_paths: Sequence[str | Path]) -> Retriever:
        """Embed the gallery images (cached on disk by backbone weights + file list)."""
        paths = [Path(p) for p in gallery_paths]
        if not paths:
            raise CirlabError("index() needs at least one gallery image")
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise CirlabError(f"{len(missing)} gallery images do not exist, e.g. {missing[0]}")
        raw = self.raw_features(paths)
        self.gallery = F.normalize(self.module.gallery_embedding(raw.to(self.device)).float(), dim=-1).cpu()
        self.paths = paths
        return self

    @torch.no_grad()
    def search(
        self, reference_image: str | Path, text: str, k: int = 10, exclude_reference: bool = True
    ) -> list[tuple[Path, float]]:
        """Top-k (gallery path, cosine score) for reference image + modification text. The reference
        itself is left out of the ranking if it is in the gallery (as the benchmarks do), unless
        exclude_reference=False."""
        if self.gallery is None:
            raise CirlabError("call index(gallery_paths) before search()")
        from cirlab.data.features import encode_images

        ref_path = Path(reference_image)
        if not ref_path.is_file():
            raise CirlabError(f"reference image {ref_path} does not exist")
        ref = encode_images(self.backbone, [ref_path]).to(self.device)
        view = self.module.text_views.get("text")  # e.g. BLIP4CIR+Bi's forward marker, as at evaluation
        query = F.normalize(
            self.module.query_embedding(ref, [view(text) if view else text]).float(), dim=-1
        ).cpu()[0]
        scores = self.gallery @ query
        if exclude_reference:
            ref_resolved = ref_path.resolve()
            for i, p in enumerate(self.paths):
                if p.resolve() == ref_resolved:
                    scores[i] = float("-inf")
        k = min(k, int(torch.isfinite(scores).sum()))
        top = torch.topk(scores, k)
        return [(self.paths[i], float(s)) for s, i in zip(top.values.tolist(), top.indices.tolist())]


def _pin_paths(cfg, run_dir: Path) -> None:
    """Use the folders the run used (its resolved paths, relative ones taken from the run's working
    directory), not whatever the environment and current directory would give now: otherwise a
    load from elsewhere would miss the backbone / feature caches."""
    import json

    import yaml

    results = run_dir / "results.json"
    paths = None
    if results.is_file():
        paths = json.loads(results.read_text()).get("config", {}).get("paths")
    if paths is None:
        from omegaconf import OmegaConf

        paths = OmegaConf.to_container(cfg.paths, resolve=True)
    hydra_yaml = run_dir / ".hydra" / "hydra.yaml"
    cwd = None
    if hydra_yaml.is_file():
        cwd = ((yaml.safe_load(hydra_yaml.read_text()) or {}).get("hydra", {}).get("runtime", {}) or {}).get(
            "cwd"
        )
    for key, value in paths.items():
        if isinstance(value, str) and cwd and not Path(value).is_absolute():
            value = str(Path(cwd) / value)
        cfg.paths[key] = value


def load(run_dir_or_ckpt: str | Path, overrides: Sequence[str] = (), device: str | None = None) -> Retriever:
    """Rebuild a run's final-stage model (or the stage of a given checkpoint) with its trained weights.
    `overrides` are OmegaConf dotlist overrides of the run's config, e.g. ["paths.cache_dir=/x"]."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from cirlab.pipeline import SafeCheckpointIO, load_module_weights

    run_dir, stage, ckpt = _run_and_stage(Path(run_dir_or_ckpt))
    cfg_path = run_dir / ".hydra" / "config.yaml"
    if not cfg_path.is_file():
        raise CirlabError(f"{cfg_path} not found: {run_dir} is not a cirlab run folder")
    cfg = OmegaConf.load(cfg_path)
    _pin_paths(cfg, run_dir)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    if "method" not in cfg:
        raise CirlabError(f"{run_dir} is not a training run (no method in its config)")
    stages = list(cfg.method.stages)
    stage = stage or stages[-1]
    if stage not in stages:
        raise CirlabError(f"stage {stage!r} is not one of the run's stages {stages}")

    backbone = instantiate(cfg.backbone.model)
    # earlier stages may have fine-tuned the backbone: take it from the latest trained stage up to `stage`
    for name in stages[: stages.index(stage)]:
        best = _checkpoint_of(run_dir, name)
        if best is not None:
            state = SafeCheckpointIO().load_checkpoint(best)["state_dict"]
            backbone.load_state_dict(
                {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
            )
    module = instantiate(
        cfg.method[stage].module,
        backbone=backbone,
        search=cfg.retrieval.search,
        search_options=OmegaConf.to_container(cfg.retrieval.options),
    )
    best = ckpt or _checkpoint_of(run_dir, stage)
    if best is not None:
        load_module_weights(module, best)
    elif cfg.method[stage].max_epochs > 0:
        raise CirlabError(
            f"stage {stage} of {run_dir} has no finished checkpoint (done.json); "
            "finish or resume the run first"
        )
    if device:
        module.to(device)
    return Retriever(module, cfg, run_dir, stage)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="cirlab-query", description="Composed image search with a trained run."
    )
    parser.add_argument("--run", required=True, help="run folder (or a stage checkpoint .ckpt)")
    parser.add_argument("--gallery", required=True, help="folder of gallery images (searched recursively)")
    parser.add_argument("--image", required=True, help="reference image")
    parser.add_argument("--text", required=True, help="modification text")
    parser.add_argument("-k", type=int, default=10, help="how many results (default 10)")
    parser.add_argument("--device", default=None, help="e.g. cuda; default cpu")
    args = parser.parse_args(argv)
    try:
        gallery = Path(args.gallery)
        if not gallery.is_dir():
            raise CirlabError(f"--gallery {gallery} is not a folder")
        paths = sorted(p for p in gallery.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not paths:
            raise CirlabError(f"no images ({', '.join(IMAGE_EXTS)}) under {gallery}")
        retriever = load(args.run, device=args.device).index(paths)
        for rank, (path, score) in enumerate(retriever.search(args.image, args.text, args.k), 1):
            print(f"{rank:3d}  {score:.4f}  {path}")
    except CirlabError as err:
        print(f"cirlab-query error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
