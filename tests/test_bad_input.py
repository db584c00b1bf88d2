"""A corpus of bad inputs: each gets an error of a specific type whose message names the file or argument
at fault and says how to fix it (never a stack trace from deep inside torch, PIL or jsonargparse).

Every case builds its bad input in ``tmp_path`` (most from a copy of the tiny procedural dataset) and lists
regular expressions that must all occur in the message. Cases whose error is a command-line error
(``SystemExit(2)``) are checked on what ``genvs`` prints to stderr.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import TINY_TOY, TINY_XUNET, tiny_args
from genvs.callbacks import CheckpointError
from genvs.cli import main
from genvs.core.config import spec
from genvs.core.views import Views, ViewsError
from genvs.data import CO3DScenes, EvalProtocol, MultiViewDataset, RealEstate10KScenes, SRNDataModule, SRNScenes
from genvs.data.images import load_square_image, scan_image_folder
from genvs.data.single import ImageOrbitDataModule
from genvs.data.srn import DatasetError, MissingDataError
from genvs.eval.metrics import MissingWeightsError, build_inception, build_lpips
from genvs.methods.threedim import ThreeDiM, XUNet

CONFIGS = Path(__file__).parents[1] / "configs"


# ----------------------------------------------------------------------------------------- inputs
@pytest.fixture(scope="module")
def ckpt_3dim(tmp_path_factory) -> Path:
    """A checkpoint of a tiny (untrained) 3DiM, written by Lightning as `genvs fit` writes them."""
    model = ThreeDiM(network=spec(XUNet, **TINY_XUNET))
    trainer = L.Trainer(max_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    path = tmp_path_factory.mktemp("ckpt") / "threedim.ckpt"
    trainer.save_checkpoint(path)
    return path


@dataclass
class Env:
    tmp: Path
    toy: Path
    ckpt: Path
    monkeypatch: pytest.MonkeyPatch

    def srn(self) -> tuple[Path, Path]:
        """A copy of the toy train split: (dataset root, its first object folder)."""
        root = self.tmp / "srn"
        if not root.exists():
            shutil.copytree(self.toy / "train", root / "train")
        return root, sorted((root / "train").iterdir())[0]


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# ------------------------------------------------------------------------------------ SRN layout
def missing_dataset_folder(e: Env):
    SRNScenes(e.tmp / "no_such_dataset", "train")


def missing_dataset_folder_datamodule(e: Env):
    SRNDataModule(root=str(e.tmp / "no_such_dataset"), num_workers=0).setup("fit")


def missing_split_folder(e: Env):
    root, _ = e.srn()
    SRNScenes(root, "test")


def too_few_views(e: Env):
    root, _ = e.srn()
    MultiViewDataset(SRNScenes(root, "train"), n_context=4, n_target=3)


def too_few_views_datamodule(e: Env):
    root, _ = e.srn()
    SRNDataModule(root=str(root), n_context=5, n_target=5, num_workers=0).dataset("fit")


def protocol_view_out_of_range(e: Env):
    root, _ = e.srn()
    MultiViewDataset(SRNScenes(root, "train"), protocol=EvalProtocol(input_views=[64]))


def truncated_png(e: Env):
    root, obj = e.srn()
    truncate(obj / "rgb/000002.png")
    SRNScenes(root, "train").load(0, [2])


def truncated_png_in_loader_worker(e: Env):
    root, obj = e.srn()
    for f in (root / "train").glob("*/rgb/*.png"):
        truncate(f)
    dm = SRNDataModule(root=str(root), num_workers=1, batch_size=2, image_size=None)
    dm.dataset("fit")  # the training split only (the copy has no val split)
    next(iter(dm.train_dataloader()))


def not_an_image(e: Env):
    root, obj = e.srn()
    (obj / "rgb/000002.png").write_text("this is not a PNG")
    SRNScenes(root, "train").load(0, [2])


def missing_image(e: Env):
    root, obj = e.srn()
    scenes = SRNScenes(root, "train")
    (obj / "rgb/000002.png").unlink()
    scenes.load(0, [2])


def wrong_size_image(e: Env):
    root, obj = e.srn()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(obj / "rgb/000003.png")
    SRNScenes(root, "train").load(0, [3, 0, 1])  # the odd one first: it must still be the one named


def depth_map_as_colour_image(e: Env):
    root, obj = e.srn()
    Image.fromarray(np.full((32, 32), 3000, dtype=np.uint16)).save(obj / "rgb/000001.png")  # mode I;16
    SRNScenes(root, "train").load(0, [1])


def pose_with_8_numbers(e: Env):
    root, obj = e.srn()
    (obj / "pose/000001.txt").write_text("1 0 0 0\n0 1 0 0\n")
    SRNScenes(root, "train").load(0, [1])


def pose_with_text(e: Env):
    root, obj = e.srn()
    (obj / "pose/000001.txt").write_text("rotation: identity\ntranslation: 0 0 1\n")
    SRNScenes(root, "train").load(0, [1])


def pose_with_nan(e: Env):
    root, obj = e.srn()
    (obj / "pose/000001.txt").write_text("1 0 0 nan\n0 1 0 0\n0 0 1 0\n0 0 0 1\n")
    SRNScenes(root, "train").load(0, [1])


def pose_not_rigid(e: Env):
    root, obj = e.srn()
    (obj / "pose/000001.txt").write_text("2 0 0 0\n0 2 0 0\n0 0 2 0\n0 0 0 1\n")
    SRNScenes(root, "train").load(0, [1])


def missing_pose_file(e: Env):
    root, obj = e.srn()
    (obj / "pose/000004.txt").unlink()
    SRNScenes(root, "train")


def malformed_intrinsics(e: Env):
    root, obj = e.srn()
    (obj / "intrinsics.txt").write_text("focal=35mm\n")
    SRNScenes(root, "train").load(0, [0])


def nonpositive_intrinsics(e: Env):
    root, obj = e.srn()
    (obj / "intrinsics.txt").write_text("0. 16. 16. 0.\n0. 0. 0.\n1.\n32 32\n")
    SRNScenes(root, "train").load(0, [0])


def missing_intrinsics(e: Env):
    root, obj = e.srn()
    (obj / "intrinsics.txt").unlink()
    SRNScenes(root, "train").load(0, [0])


def scenes_of_different_sizes_in_one_batch(e: Env):
    root, obj = e.srn()
    for f in (obj / "rgb").glob("*.png"):
        Image.open(f).resize((16, 16)).save(f)
    shutil.rmtree(obj / "depth")
    ds = MultiViewDataset(SRNScenes(root, "train"), protocol=EvalProtocol(input_views=[0], num_targets=1))
    Views.collate([ds[0], ds[1]])


# --------------------------------------------------------------------------------- other readers
def co3d_missing_root(e: Env):
    CO3DScenes(e.tmp / "co3d", "hydrant")


def co3d_corrupt_annotations(e: Env):
    (e.tmp / "co3d/hydrant").mkdir(parents=True)
    (e.tmp / "co3d/hydrant/frame_annotations.jgz").write_bytes(b"\x1f\x8b truncated gzip")
    CO3DScenes(e.tmp / "co3d", "hydrant", subset=None)


def _co3d_frame(i: int, T: list[float]) -> dict:
    return {
        "sequence_name": "seq", "frame_number": i,
        "image": {"path": f"hydrant/seq/images/frame{i:06d}.jpg", "size": [24, 32]},
        "viewpoint": {"R": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "T": T, "focal_length": [1.5, 1.5],
                      "principal_point": [0.0, 0.0], "intrinsics_format": "ndc_isotropic"},
    }


def co3d_nan_camera(e: Env):
    (e.tmp / "co3d/hydrant").mkdir(parents=True)
    frames = [_co3d_frame(0, [0, 0, 3]), _co3d_frame(1, [0, float("nan"), 3])]
    with gzip.open(e.tmp / "co3d/hydrant/frame_annotations.jgz", "wt") as f:
        json.dump(frames, f)
    CO3DScenes(e.tmp / "co3d", "hydrant", subset=None)


def co3d_malformed_set_list(e: Env):
    (e.tmp / "co3d/hydrant/set_lists").mkdir(parents=True)
    with gzip.open(e.tmp / "co3d/hydrant/frame_annotations.jgz", "wt") as f:
        json.dump([_co3d_frame(0, [0, 0, 3])], f)
    (e.tmp / "co3d/hydrant/set_lists/set_lists_fewview_dev.json").write_text('{"train": [["seq", 0, ')
    CO3DScenes(e.tmp / "co3d", "hydrant", subset="fewview_dev")


def _re10k(e: Env, rows: list[str]) -> RealEstate10KScenes:
    (e.tmp / "re10k/poses/train").mkdir(parents=True)
    (e.tmp / "re10k/frames/train/seq").mkdir(parents=True)
    (e.tmp / "re10k/poses/train/seq.txt").write_text("https://www.youtube.com/watch?v=x\n" + "\n".join(rows) + "\n")
    return RealEstate10KScenes(e.tmp / "re10k/poses", e.tmp / "re10k/frames", "train")


ROW = "1000 0.5 0.9 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0"


def re10k_missing_root(e: Env):
    RealEstate10KScenes(e.tmp / "re10k/poses", e.tmp / "re10k/frames", "train")


def re10k_short_row(e: Env):
    _re10k(e, [ROW, "2000 0.5 0.9 0.5 0.5 0 0 1 0 0"]).cameras(0)


def re10k_nan_row(e: Env):
    _re10k(e, [ROW, ROW.replace("1000 0.5 0.9", "2000 nan 0.9")]).cameras(0)


def image_folder_missing(e: Env):
    scan_image_folder(e.tmp / "imagenet/train")


def image_folder_corrupt_image(e: Env):
    path = e.tmp / "img.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(path)
    truncate(path, 0.3)
    load_square_image(path, 16)


def your_image_missing(e: Env):
    ImageOrbitDataModule(images=[str(e.tmp / "my_car.png")]).setup("predict")


# -------------------------------------------------------------------------------- command line
def cli(e: Env, *extra: str, config: dict | None = None, base: bool = True):
    args = ["fit", *(tiny_args(e.toy, e.tmp / "run") if base else [])]
    if config is not None:
        (e.tmp / "bad.yaml").write_text(yaml.safe_dump(config))
        args += ["--config", str(e.tmp / "bad.yaml")]
    main([*args, *extra, "--trainer.max_steps", "0"])  # nothing trains, should a case ever parse


CLI_CASES = {
    "unknown_method_cli": lambda e: cli(e, "--model", "nerfdiff", base=False),
    "unknown_method_yaml": lambda e: cli(e, config={"model": {"class_path": "nerfdiff"}}, base=False),
    "unknown_key_cli": lambda e: cli(e, "--model.init_args.ema_decai", "0.5"),
    "unknown_key_yaml": lambda e: cli(e, config={"model": {"init_args": {"ema_decai": 0.5}}}),
    "unknown_nested_key_yaml": lambda e: cli(e, config={"model": {"init_args": {"sampler": {"init_args": {"num_stepz": 3}}}}}),
    "unknown_trainer_key_cli": lambda e: cli(e, "--trainer.max_stepz", "3"),
    "unknown_trainer_key_yaml": lambda e: cli(e, config={"trainer": {"max_stepz": 3}}),
    "unknown_top_level_key_yaml": lambda e: cli(e, config={"modle": {"ema_decay": 0.5}}),
    "wrong_type_cli": lambda e: cli(e, "--model.init_args.ema_decay", "high"),
    "wrong_type_yaml": lambda e: cli(e, config={"model": {"init_args": {"optim": {"lr": "fast"}}}}),
    "wrong_choice_cli": lambda e: cli(e, "--model.init_args.nonfinite_loss", "ignore"),
    "missing_config_file": lambda e: cli(e, "--config", str(e.tmp / "no_such.yaml"), base=False),
}


# --------------------------------------------------------------------------------- checkpoints
def other_method_checkpoint_cli(config: str):
    def run(e: Env):
        main(["test", "--config", str(CONFIGS / config), "--ckpt_path", str(e.ckpt),
              "--trainer.default_root_dir", str(e.tmp / "run")])

    return run


def other_method_checkpoint_python(e: Env):
    from genvs.methods.dfm import DFM

    DFM.load_from_checkpoint(e.ckpt)


def truncated_checkpoint(e: Env):
    path = e.tmp / "last.ckpt"
    shutil.copy(e.ckpt, path)
    truncate(path)
    return path


def truncated_checkpoint_python(e: Env):
    ThreeDiM.load_from_checkpoint(truncated_checkpoint(e))


def not_a_checkpoint(e: Env):
    (e.tmp / "notes.ckpt").write_text("not a checkpoint")
    ThreeDiM.load_from_checkpoint(e.tmp / "notes.ckpt")


def missing_checkpoint(e: Env):
    ThreeDiM.load_from_checkpoint(e.tmp / "nope.ckpt")  # (the CLI's --ckpt_path: tests/test_resume.py)


class RunsCode:
    """Unpickling this runs ``os.mkdir(marker)``: a stand-in for a checkpoint that would execute code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def code_checkpoint(e: Env) -> Path:
    state = torch.load(e.ckpt, weights_only=True)
    state["callbacks"] = {"evil": RunsCode(e.tmp / "code_ran")}
    path = e.tmp / "evil.ckpt"
    torch.save(state, path)
    return path


def code_checkpoint_python(e: Env):
    ThreeDiM.load_from_checkpoint(code_checkpoint(e))


def code_checkpoint_cli(e: Env):
    main(["test", *tiny_args(e.toy, e.tmp / "run"), "--ckpt_path", str(code_checkpoint(e))])


# ---------------------------------------------------------------------------- pretrained weights
def _empty_torch_home(e: Env):
    e.monkeypatch.setenv("TORCH_HOME", str(e.tmp / "empty_torch_home"))


def lpips_weights_missing(e: Env):
    _empty_torch_home(e)
    build_lpips("alex")


def inception_weights_missing(e: Env):
    _empty_torch_home(e)
    build_inception(2048)


def inception_weights_configured_missing(e: Env):
    build_inception(2048, weights=e.tmp / "inception.pth")


def stable_diffusion_missing_python(e: Env):
    from genvs.methods.mvdiffusion import MVDiffusion

    MVDiffusion(sd_path=str(e.tmp / "stable-diffusion-2-base"))


def stable_diffusion_missing_cli(e: Env):
    main(["fit", "--config", str(CONFIGS / "mvdiffusion_toy.yaml"), "--model.init_args.sd_path",
          str(e.tmp / "stable-diffusion-2-base"), "--model.init_args.build_tiny_sd_if_missing", "false",
          "--trainer.default_root_dir", str(e.tmp / "run")])


def depth_estimator_missing(e: Env):
    from genvs.methods.warping.depth import load_depth_estimator

    load_depth_estimator(e.tmp / "dpt-beit-large-512")


# ---------------------------------------------------------------------------------------- table
CASES: list[tuple[str, Callable[[Env], object], type[BaseException], tuple[str, ...]]] = [
    # SRN layout (also the procedural dataset's)
    ("missing_dataset_folder", missing_dataset_folder, MissingDataError, (r"no_such_dataset not found", r"srn_cars\.zip", r"genvs data toy")),
    ("missing_dataset_folder_datamodule", missing_dataset_folder_datamodule, MissingDataError, (r"no_such_dataset not found", r"genvs data toy")),
    ("missing_split_folder", missing_split_folder, MissingDataError, (r"srn: no 'test' split folder", r"found \['train'\]", r"add the 'test' split")),
    ("too_few_views", too_few_views, DatasetError, (r"toy_train_00000: 6 views", r"n_context=4 \+ n_target=3", r"lower them")),
    ("too_few_views_datamodule", too_few_views_datamodule, DatasetError, (r"toy_train_00000: 6 views", r"n_context=5 \+ n_target=5", r"lower them")),
    ("protocol_view_out_of_range", protocol_view_out_of_range, DatasetError, (r"toy_train_00000: the evaluation protocol conditions on view\(s\) \[64\]", r"input_views to indices below 6")),
    ("truncated_png", truncated_png, DatasetError, (r"000002\.png: corrupt or unreadable image", r"re-extract or delete")),
    ("truncated_png_in_loader_worker", truncated_png_in_loader_worker, DatasetError, (r"\.png: corrupt or unreadable image", r"re-extract or delete")),
    ("not_an_image", not_an_image, DatasetError, (r"000002\.png: corrupt or unreadable image", r"re-extract or delete")),
    ("missing_image", missing_image, MissingDataError, (r"000002\.png: missing image", r"remove this view")),
    ("wrong_size_image", wrong_size_image, DatasetError, (r"000003\.png is 16x16", r"others are 32x32", r"resize them")),
    ("depth_map_as_colour_image", depth_map_as_colour_image, DatasetError, (r"000001\.png: a 'I;16' image", r"depth map", r"8-bit RGB")),
    ("pose_with_8_numbers", pose_with_8_numbers, DatasetError, (r"000001\.txt: malformed pose", r"found 8", r"16 numbers")),
    ("pose_with_text", pose_with_text, DatasetError, (r"000001\.txt: malformed pose", r"16 numbers")),
    ("pose_with_nan", pose_with_nan, DatasetError, (r"000001\.txt: pose contains NaN or inf", r"re-export this camera or remove the view")),
    ("pose_not_rigid", pose_not_rigid, DatasetError, (r"000001\.txt: not a rigid", r"without scale or shear")),
    ("missing_pose_file", missing_pose_file, DatasetError, (r"toy_train_00000: 6 images in rgb/ but 5 pose files", r"same number")),
    ("malformed_intrinsics", malformed_intrinsics, DatasetError, (r"intrinsics\.txt: malformed intrinsics", r"'131\.25 64\. 64\. 0\.'")),
    ("nonpositive_intrinsics", nonpositive_intrinsics, DatasetError, (r"intrinsics\.txt: intrinsics must be finite and positive", r"'f cx cy 0\.' in pixels")),
    ("missing_intrinsics", missing_intrinsics, MissingDataError, (r"intrinsics\.txt: missing intrinsics file", r"needs intrinsics\.txt")),
    ("scenes_of_different_sizes_in_one_batch", scenes_of_different_sizes_in_one_batch, ViewsError, (r"toy_train_00000: 2 views of 16x16", r"toy_train_00001: 2 views of 32x32", r"data\.init_args\.image_size")),
    # CO3D, RealEstate10K, image folders, your own image
    ("co3d_missing_root", co3d_missing_root, MissingDataError, (r"co3d/hydrant not found", r"download_dataset\.py")),
    ("co3d_corrupt_annotations", co3d_corrupt_annotations, DatasetError, (r"frame_annotations\.jgz is not gzipped JSON", r"download this category again")),
    ("co3d_nan_camera", co3d_nan_camera, DatasetError, (r"frame_annotations\.jgz: frame 1 of sequence seq", r"non-finite camera", r"re-download")),
    ("co3d_malformed_set_list", co3d_malformed_set_list, DatasetError, (r"set_lists_fewview_dev\.json is not valid JSON", r"download it again")),
    ("re10k_missing_root", re10k_missing_root, MissingDataError, (r"camera files for split 'train' not found", r"poses/train/<sequence>\.txt", r"realestate10k/download")),
    ("re10k_short_row", re10k_short_row, DatasetError, (r"seq\.txt:3: expected 19 numbers", r"got 10")),
    ("re10k_nan_row", re10k_nan_row, DatasetError, (r"seq\.txt:3: camera row contains NaN or inf", r"delete that row")),
    ("image_folder_missing", image_folder_missing, MissingDataError, (r"image folder .*imagenet/train not found", r"image-net\.org", r"data\.init_args\.root")),
    ("image_folder_corrupt_image", image_folder_corrupt_image, DatasetError, (r"img\.png: corrupt or unreadable image", r"delete or replace it")),
    ("your_image_missing", your_image_missing, DatasetError, (r"my_car\.png: input image not found", r"data\.images")),
    # configuration and command line: jsonargparse's messages name the key (checked here), genvs adds the rest
    ("unknown_method_cli", CLI_CASES["unknown_method_cli"], SystemExit, (r"unknown method 'nerfdiff'", r"Known methods: .*threedim")),
    ("unknown_method_yaml", CLI_CASES["unknown_method_yaml"], SystemExit, (r"unknown method 'nerfdiff'", r"Known methods: .*dfm")),
    ("unknown_key_cli", CLI_CASES["unknown_key_cli"], SystemExit, (r"ThreeDiM", r"Option 'ema_decai' is not accepted", r"--help")),
    ("unknown_key_yaml", CLI_CASES["unknown_key_yaml"], SystemExit, (r"ThreeDiM", r"Option 'ema_decai' is not accepted", r"--help")),
    ("unknown_nested_key_yaml", CLI_CASES["unknown_nested_key_yaml"], SystemExit, (r"Parser key \"sampler\"", r"Option 'num_stepz' is not accepted")),
    ("unknown_trainer_key_cli", CLI_CASES["unknown_trainer_key_cli"], SystemExit, (r"unrecognized arguments: --trainer\.max_stepz", r"--help")),
    ("unknown_trainer_key_yaml", CLI_CASES["unknown_trainer_key_yaml"], SystemExit, (r"does not accept option '(trainer\.)?max_stepz'", r"--help")),
    ("unknown_top_level_key_yaml", CLI_CASES["unknown_top_level_key_yaml"], SystemExit, (r"does not accept option 'modle\.ema_decay'",)),
    ("wrong_type_cli", CLI_CASES["wrong_type_cli"], SystemExit, (r"Parser key \"ema_decay\"", r"Expected a <class 'float'>\. Got value: high")),
    ("wrong_type_yaml", CLI_CASES["wrong_type_yaml"], SystemExit, (r"Parser key \"optim\.lr\"", r"Got value: fast")),
    ("wrong_choice_cli", CLI_CASES["wrong_choice_cli"], SystemExit, (r"Parser key \"nonfinite_loss\"", r"Literal\['error', 'skip'\]\. Got value: ignore")),
    ("missing_config_file", CLI_CASES["missing_config_file"], SystemExit, (r"File does not exist: .*no_such\.yaml",)),
    # checkpoints
    ("other_method_checkpoint_cli_dfm", other_method_checkpoint_cli("dfm_toy.yaml"), CheckpointError, (r"threedim\.ckpt was written by genvs\.methods\.threedim\.model\.ThreeDiM", r"not genvs\.methods\.dfm\.model\.DFM", r"--model threedim")),
    ("other_method_checkpoint_cli_warping", other_method_checkpoint_cli("warping_toy.yaml"), CheckpointError, (r"threedim\.ckpt was written by .*ThreeDiM", r"not genvs\.methods\.warping\.model\.WarpingRGBD", r"--model threedim")),
    ("other_method_checkpoint_python", other_method_checkpoint_python, CheckpointError, (r"threedim\.ckpt was written by .*ThreeDiM, not .*DFM", r"ThreeDiM\.load_from_checkpoint")),
    ("truncated_checkpoint_python", truncated_checkpoint_python, CheckpointError, (r"last\.ckpt \(\d+ bytes\) is truncated or corrupt", r"earlier checkpoint")),
    ("not_a_checkpoint", not_a_checkpoint, CheckpointError, (r"notes\.ckpt \(\d+ bytes\) is truncated or corrupt",)),
    ("missing_checkpoint", missing_checkpoint, CheckpointError, (r"nope\.ckpt does not exist", r"--ckpt_path last")),
    ("code_checkpoint_python", code_checkpoint_python, CheckpointError, (r"refusing to load .*evil\.ckpt", r"would run code", r"GLOBAL posix\.mkdir", r"trust its source")),
    ("code_checkpoint_cli", code_checkpoint_cli, CheckpointError, (r"refusing to load .*evil\.ckpt", r"would run code", r"trust its source")),
    # pretrained weights (never downloaded)
    ("lpips_weights_missing", lpips_weights_missing, MissingWeightsError, (r"alexnet-owt-7be5be79\.pth", r"empty_torch_home", r"curl -L")),
    ("inception_weights_missing", inception_weights_missing, MissingWeightsError, (r"weights-inception-2015-12-05-6726825d\.pth", r"empty_torch_home", r"curl -L", r"remove 'fid'")),
    ("inception_weights_configured_missing", inception_weights_configured_missing, MissingWeightsError, (r"inception_weights: .*inception\.pth` is not a file", r"curl -L")),
    ("stable_diffusion_missing_python", stable_diffusion_missing_python, FileNotFoundError, (r"stable-diffusion-2-base' \(model\.sd_path\) does not exist", r"huggingface-cli download")),
    ("stable_diffusion_missing_cli", stable_diffusion_missing_cli, FileNotFoundError, (r"stable-diffusion-2-base' \(model\.sd_path\) does not exist", r"huggingface-cli download")),
    ("depth_estimator_missing", depth_estimator_missing, FileNotFoundError, (r"no depth model at .*dpt-beit-large-512", r"huggingface-cli download Intel/dpt-beit-large-512")),
]


@pytest.mark.parametrize("trigger, error, patterns", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_error(trigger, error, patterns, toy_root, ckpt_3dim, tmp_path, monkeypatch, capsys):
    env = Env(tmp_path, toy_root, ckpt_3dim, monkeypatch)
    with pytest.raises(error) as info:
        trigger(env)
    if error is SystemExit:
        assert info.value.code == 2
        message = capsys.readouterr().err
        assert "Traceback" not in message
    else:
        message = str(info.value)
        assert type(info.value).__module__.startswith("genvs"), f"{type(info.value)} is not a genvs error"
    for pattern in patterns:
        assert re.search(pattern, message, re.S), f"{pattern!r} not in:\n{message}"
    assert not (tmp_path / "code_ran").exists()  # nothing in a refused checkpoint ever ran


def test_colour_modes_that_are_not_errors(tmp_path, toy_root):
    """Grayscale, palette and RGBA images are valid colour views (converted), not bad input."""
    root = tmp_path / "srn"
    shutil.copytree(toy_root / "train", root / "train")
    obj = sorted((root / "train").iterdir())[0]
    Image.new("L", (32, 32), 51).save(obj / "rgb/000001.png")
    Image.new("RGBA", (32, 32), (0, 0, 0, 0)).save(obj / "rgb/000002.png")  # transparent: white background
    d = SRNScenes(root, "train").load(0, [1, 2])
    assert torch.allclose(d["images"][0], torch.full((3, 32, 32), 51 / 127.5 - 1))
    assert torch.all(d["images"][1] == 1.0)



def test_genvs_command_prints_user_errors_without_a_traceback(tmp_path, ckpt_3dim, capsys, monkeypatch):
    """As the `genvs` command (friendly errors), bad input is one line naming the file and the fix, exit status 1.
    GENVS_TRACEBACK=1 gives the traceback back."""
    args = ["test", "--config", str(CONFIGS / "dfm_toy.yaml"), "--ckpt_path", str(ckpt_3dim)]
    with pytest.raises(SystemExit) as info:
        main(args, friendly_errors=True)
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert re.match(r"genvs: error: checkpoint .*threedim\.ckpt was written by .*ThreeDiM, not .*DFM: .*--model threedim", err)
    assert "Traceback" not in err
    monkeypatch.setenv("GENVS_TRACEBACK", "1")
    with pytest.raises(CheckpointError):
        main(args, friendly_errors=True)


def test_user_message_unwraps_dataloader_worker_errors():
    """A DataLoader worker re-raises the worker's error with its traceback in the message; the command prints
    only the error's own message (the type is kept: the truncated_png_in_loader_worker case)."""
    from torch._utils import ExceptionWrapper

    from genvs.cli import _user_message

    try:
        raise DatasetError("/data/obj/rgb/000002.png: corrupt or unreadable image (truncated); re-extract or delete this view")
    except DatasetError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DatasetError) as info:
        wrapped.reraise()
    assert "Original Traceback" in str(info.value)
    assert _user_message(info.value) == (
        "/data/obj/rgb/000002.png: corrupt or unreadable image (truncated); re-extract or delete this view"
    )
