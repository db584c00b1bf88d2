"""The toy Stable Diffusion pretraining (genvs.methods.mvdiffusion.toy_sd): tokenizer, both training stages,
the written diffusers folder, and MVDiffusion on top of it."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch

pytest.importorskip("transformers")

from genvs.data.toy import RoomConfig, generate_toy_rooms, random_room, ring_poses, room_prompts  # noqa: E402
from genvs.core.cameras import intrinsics_from_fov  # noqa: E402
from genvs.methods.mvdiffusion.sd import PromptEncoder, _write_tiny_tokenizer, load_stable_diffusion  # noqa: E402
from genvs.methods.mvdiffusion.toy_sd import TOY_SD_FILE, ToySDConfig, pretrain_toy_sd  # noqa: E402

ROOMS = RoomConfig(resolution=32, num_rooms={"train": 2, "val": 1, "test": 1}, supersample=1)


@pytest.fixture(scope="module")
def rooms_root(tmp_path_factory):
    return generate_toy_rooms(tmp_path_factory.mktemp("rooms") / "rooms", ROOMS, progress=False)


def tiny_config(kind: str, **kw) -> ToySDConfig:
    args = dict(kind=kind, vae_steps=40, vae_batch_size=8, unet_steps=40, unet_batch_size=8, log_every=10,
                vae_channels=(8, 8, 16, 16), unet_lr=1e-3, precision="32-true")  # fmt: skip
    return ToySDConfig(**(args | kw))


def test_word_tokenizer_gives_one_token_per_word(tmp_path):
    """The rooms' prompts (up to ~130 characters) fit CLIP's 77 tokens: every word is one token."""
    import transformers

    g = torch.Generator().manual_seed(3)
    prompts = []
    for _ in range(6):
        room = random_room(g, 3, 4)
        poses = ring_poses(8, -45.0, position=tuple(float(x) for x in room.camera))
        prompts += room_prompts(room, intrinsics_from_fov(90.0, 32), poses)
    words = sorted({w for p in prompts for w in re.findall(r"[a-z]+", p)})
    _write_tiny_tokenizer(tmp_path, words)
    tok = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    for p in prompts:
        pieces = re.findall(r"[a-z]+|,", p)
        ids = tok(p).input_ids
        assert len(ids) == len(pieces) + 2  # start, one per word or comma, end
        assert tok.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in pieces]
    assert max(len(p) for p in prompts) > 77  # a character-level tokenizer would cut them
    # a word the vocabulary lacks still tokenizes, in pieces
    pieces = tok.convert_ids_to_tokens(tok("zebra").input_ids[1:-1])
    assert len(pieces) > 1 and "".join(pieces) == "zebra</w>"


@pytest.mark.parametrize("kind", ["base", "inpainting", "depth"])
def test_pretraining_writes_a_loadable_sd_that_learned(kind, rooms_root, tmp_path):
    out = pretrain_toy_sd(tmp_path / "sd", rooms_root, ROOMS, tiny_config(kind), device="cpu", progress=False)
    meta = json.loads((out / TOY_SD_FILE).read_text())
    assert not (tmp_path / "sd.genvs-tmp").exists()
    ae, dn = meta["autoencoder"], meta["denoiser"]
    assert meta["train_views"] == 16 and len(ae["train_loss"]) == 4 and len(dn["train_loss"]) == 4
    assert ae["train_loss"][-1] < 0.7 * ae["train_loss"][0], ae["train_loss"]
    assert dn["train_loss"][-1] < 0.8 * dn["train_loss"][0], dn["train_loss"]

    sd = load_stable_diffusion(out, text_encoder=True, expect_in_channels={"base": 4, "inpainting": 9, "depth": 5}[kind])
    assert sd.kind == kind
    # the scaling factor gives the training latents (posterior samples, as LDM) unit variance
    images = torch.cat([_room_images(rooms_root, i) for i in range(2)])
    with torch.no_grad():
        z = sd.vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0)) * sd.vae.config.scaling_factor
    assert 0.9 < float(z.std()) < 1.1
    assert ae["scaling_factor"] == pytest.approx(sd.vae.config.scaling_factor, rel=1e-4)
    # the saved text encoder is the trained one: prompts differ in embedding, and "" is the CFG prompt
    emb = sd.text_encoder(["a room with a red wall", "a room with a blue wall", ""])
    assert emb.shape == (3, 77, 32) and not torch.allclose(emb[0], emb[1])


def test_pretraining_continues_from_a_folder(rooms_root, tmp_path):
    """``init_from`` keeps the autoencoder and tokenizer and trains the denoiser on from its weights."""
    from safetensors.torch import load_file

    first = pretrain_toy_sd(tmp_path / "sd", rooms_root, ROOMS, tiny_config("base"), device="cpu", progress=False)
    before = {k: load_file(str(first / k / "diffusion_pytorch_model.safetensors")) for k in ("vae", "unet")}
    vocab = (first / "tokenizer" / "vocab.json").read_text()
    again = pretrain_toy_sd(first, rooms_root, ROOMS, tiny_config("base", unet_steps=10), device="cpu",
                            progress=False, init_from=first)  # fmt: skip
    after = {k: load_file(str(again / k / "diffusion_pytorch_model.safetensors")) for k in ("vae", "unet")}
    assert all(torch.equal(before["vae"][k], after["vae"][k]) for k in before["vae"])
    assert not all(torch.equal(before["unet"][k], after["unet"][k]) for k in before["unet"])
    assert (again / "tokenizer" / "vocab.json").read_text() == vocab
    meta = json.loads((again / TOY_SD_FILE).read_text())
    assert meta["autoencoder"]["from"] == str(first) and meta["denoiser"]["steps"] == 10
    assert meta["denoiser"]["continues"]["steps"] == 40
    # the continued denoiser starts where the first one ended, not from scratch
    assert meta["denoiser"]["train_loss"][0] < meta["denoiser"]["continues"]["train_loss"][0]
    with pytest.raises(ValueError, match="sd.kind"):
        pretrain_toy_sd(tmp_path / "x", rooms_root, ROOMS, tiny_config("depth"), device="cpu", progress=False,
                        init_from=first)  # fmt: skip


def test_an_interrupted_run_resumes_to_the_same_weights(rooms_root, tmp_path, monkeypatch):
    """Rerunning after an interruption in the denoiser stage resumes from its last checkpoint (the autoencoder
    is not retrained) and ends with the weights of an uninterrupted run; other settings are refused."""
    from safetensors.torch import load_file

    from genvs.methods.mvdiffusion import toy_sd

    cfg = tiny_config("base", unet_steps=30, checkpoint_every=10)
    whole = pretrain_toy_sd(tmp_path / "whole", rooms_root, ROOMS, cfg, device="cpu", progress=False)

    step, vae_stages = toy_sd._Stage.step, []

    def interrupted(self, i, loss, progress):
        if self.name == "denoiser" and i == 25:
            raise KeyboardInterrupt
        step(self, i, loss, progress)

    monkeypatch.setattr(toy_sd._Stage, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain_toy_sd(tmp_path / "cut", rooms_root, ROOMS, cfg, device="cpu", progress=False)
    tmp = tmp_path / "cut.genvs-tmp"
    assert (tmp / "resume.pt").is_file() and (tmp / "denoiser_state.pt").is_file()
    assert torch.load(tmp / "denoiser_state.pt", weights_only=True)["step"] == 20
    with pytest.raises(ValueError, match=r"other settings \(sd.unet_lr\).*delete"):
        pretrain_toy_sd(tmp_path / "cut", rooms_root, ROOMS, tiny_config("base", unet_steps=30, checkpoint_every=10,
                        unet_lr=2e-3), device="cpu", progress=False)  # fmt: skip

    monkeypatch.setattr(toy_sd._Stage, "step", step)
    monkeypatch.setattr(toy_sd, "_train_autoencoder", lambda *a: vae_stages.append(a))
    cut = pretrain_toy_sd(tmp_path / "cut", rooms_root, ROOMS, cfg, device="cpu", progress=False)
    assert vae_stages == [] and not tmp.exists() and sorted(p.name for p in cut.iterdir()) == sorted(
        p.name for p in whole.iterdir())
    for part in ("vae", "unet", "text_encoder"):
        name = "model.safetensors" if part == "text_encoder" else "diffusion_pytorch_model.safetensors"
        a, b = load_file(str(whole / part / name)), load_file(str(cut / part / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    meta_whole, meta_cut = (json.loads((d / TOY_SD_FILE).read_text()) for d in (whole, cut))
    assert meta_cut["denoiser"]["train_loss"] == meta_whole["denoiser"]["train_loss"]
    assert meta_cut["denoiser"]["val_loss"] == meta_whole["denoiser"]["val_loss"]


def test_latents_are_encoded_once_per_image_and_mirror_image(rooms_root):
    """The denoiser stage draws latents from posteriors encoded before training: index 1 holds the mirrored
    views, equal to encoding the flipped images directly."""
    from genvs.methods.mvdiffusion.sd import tiny_vae
    from genvs.methods.mvdiffusion.toy_sd import _encode_posteriors

    torch.manual_seed(0)
    vae = tiny_vae((8, 8, 16, 16), sample_size=32).eval()
    images = _room_images(rooms_root, 0)
    mean, std = _encode_posteriors(vae, images, torch.contiguous_format, contextlib.nullcontext)
    assert mean.shape == std.shape == (2, 8, 4, 4, 4)
    with torch.no_grad():
        for k, x in enumerate((images, images.flip(-1))):
            post = vae.encode(x).latent_dist
            torch.testing.assert_close(mean[k], post.mean, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(std[k], post.std, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(mean[0], mean[1])  # the rooms are not mirror-symmetric


def _room_images(root, i: int) -> torch.Tensor:
    from genvs.data.panorama import RingScenes

    rings = RingScenes(root, "train")
    return rings.load(i, list(range(8)), load_depth=False)["images"]


def test_mvdiffusion_trains_and_benchmarks_on_the_toy_sd(rooms_root, tmp_path):
    """The written folder is a drop-in ``sd_path``: MVDiffusion trains on it, and samplers.py scores its rings
    with the overlap PSNR (no copy baseline: a text-conditioned ring has no input view)."""
    import importlib.util
    from pathlib import Path

    from genvs.cli import main
    from genvs.data.panorama import RingScenes
    from genvs.eval.consistency import ring_overlap_psnr

    sd = pretrain_toy_sd(tmp_path / "sd", rooms_root, ROOMS, tiny_config("base", vae_steps=2, unet_steps=2),
                         device="cpu", progress=False)  # fmt: skip
    data_args = [
        "--data.init_args.root", str(rooms_root), "--data.init_args.image_size", "32",
        "--data.init_args.rooms", json.dumps({"resolution": 32, "num_rooms": ROOMS.num_rooms, "supersample": 1}),
    ]  # fmt: skip
    configs = ["configs/mvdiffusion_toy.yaml", "configs/mvdiffusion_toy_sd.yaml"]
    rc = main([
        "fit", "--config", configs[0], "--config", configs[1], "--model.init_args.sd_path", str(sd), *data_args,
        "--data.init_args.num_workers", "0", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
        "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path / "run"),
    ])  # fmt: skip
    assert rc == 0
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(json.dumps({"model": {"init_args": {"sd_path": str(sd)}}, "data": {"init_args": {
        "root": str(rooms_root), "image_size": 32,
        "rooms": {"resolution": 32, "num_rooms": ROOMS.num_rooms, "supersample": 1}}}}))  # fmt: skip
    spec = importlib.util.spec_from_file_location("genvs_bench_samplers_toy_sd", Path("benchmarks/samplers.py"))
    samplers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(samplers)
    out = tmp_path / "samplers.json"
    data = samplers.main([
        *(a for c in (*configs, str(overlay)) for a in ("--config", c)), "--ckpt", str(ckpt), "--num-scenes", "1", "--steps", "2",
        "--paper-steps", "2", "--samplers", "paper", "ddim", "--precision", "32-true", "--out", str(out), "--no-readme",
    ])  # fmt: skip
    assert data["baseline"] is None and data["method"] == "MVDiffusion" and data["num_views"] == 8
    assert all(0 < r["overlap_psnr"] < 100 for r in data["rows"])
    ring = RingScenes(rooms_root, "test").load(0, list(range(8)), load_depth=False)
    real = float(ring_overlap_psnr(ring["images"], ring["K"], ring["c2w"]).nanmean())
    assert data["real_overlap_psnr"] == pytest.approx(real, abs=1e-3)
    md = out.with_suffix(".md").read_text()
    assert "overlap PSNR ↑" in md and f"| the real views (reference) | – | – | – | – | – | {real:.2f} |" in md
    assert "copy the input view" not in md


def test_bad_settings_name_the_argument(rooms_root, tmp_path):
    with pytest.raises(ValueError, match="kind="):
        ToySDConfig(kind="panorama")
    with pytest.raises(ValueError, match="vae_channels"):
        ToySDConfig(vae_channels=(8, 16))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        ToySDConfig(min_snr_gamma=0.0)
    odd = RoomConfig(resolution=36, num_rooms={"train": 1, "val": 1, "test": 0}, supersample=1)
    with pytest.raises(ValueError, match="multiple of 8"):
        pretrain_toy_sd(tmp_path / "sd", tmp_path / "rooms36", odd, tiny_config("base"), device="cpu", progress=False)


def test_samples_figure_shows_real_views_then_one_row_per_guidance_scale(rooms_root, tmp_path):
    """docs/figures/toy_sd_samples.py: the top row is the real training views of the prompts it samples."""
    import importlib.util
    from pathlib import Path

    from torchvision.io import read_image

    sd = pretrain_toy_sd(tmp_path / "sd", rooms_root, ROOMS, tiny_config("base", vae_steps=2, unet_steps=2),
                         device="cpu", progress=False)  # fmt: skip
    spec = importlib.util.spec_from_file_location("genvs_fig_toy_sd", Path("docs/figures/toy_sd_samples.py"))
    fig = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fig)
    out = fig.main(["--sd", str(sd), "--rooms", str(rooms_root), "--num-rooms", "2", "--guidance-scales", "1", "3",
                    "--steps", "2", "--out", str(tmp_path / "fig.png")])  # fmt: skip
    grid = read_image(str(out)).float() / 255  # 3 rows of 4 views of 32 px, 1 px padding
    assert grid.shape == (3, 3 * 33 + 1, 4 * 33 + 1)
    real = torch.cat([_room_images(rooms_root, i)[[0, 4]] for i in range(2)])
    top = torch.stack([grid[:, 1:33, 1 + 33 * k : 33 + 33 * k] for k in range(4)])
    assert (top - (real + 1) / 2).abs().max() < 1 / 255 + 1e-4
    assert not torch.allclose(grid[:, 34:66], grid[:, 67:99])  # guidance 1 and 3 differ
