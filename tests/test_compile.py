"""`model.torch_compile`: the method's networks compiled in place with torch.compile, from Python and the CLI.

A counting backend (or torch's ``eager`` backend through the CLI) checks the wiring without inductor's
minutes of C++ compilation; inductor itself is what `benchmarks/run.py --variants fp32_cl_compile` times.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo

from conftest import tiny_args
from genvs.core.config import spec
from genvs.methods.threedim import ThreeDiM, XUNet
from test_dfm import tiny_model as tiny_dfm
from test_dfm import views as dfm_views
from test_threedim import pair_views, tiny_model


class CountingBackend:
    """A torch.compile backend that runs the captured graphs as they are and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_denoiser_trains_like_the_eager_one():
    torch._dynamo.reset()
    backend = CountingBackend()
    torch.manual_seed(0)
    eager = tiny_model()
    torch.manual_seed(0)
    compiled = tiny_model(torch_compile={"backend": backend})
    compiled.load_state_dict(eager.state_dict())
    compiled.configure_model()
    assert compiled.compiled_modules() == [compiled.denoiser]
    views = pair_views(4)
    losses = []
    for model in (eager, compiled):
        torch.manual_seed(1)  # the step's draws (noise levels, noise, CFG dropout) from the global RNG
        loss = model.training_loss(views)["loss"]
        loss.backward()
        losses.append(loss.detach())
    assert backend.graphs >= 1  # the X-UNet's forward went through torch.compile
    torch.testing.assert_close(losses[1], losses[0])
    grads = [dict(m.denoiser.named_parameters())["conv_in.weight"].grad for m in (eager, compiled)]
    torch.testing.assert_close(grads[1], grads[0])
    # compiled in place: parameter names (checkpoints, EMA) unchanged; a second setup does not recompile
    assert list(compiled.state_dict()) == list(eager.state_dict())
    impl = compiled.denoiser._compiled_call_impl
    compiled.configure_model()
    assert compiled.denoiser._compiled_call_impl is impl


def test_dfm_compiles_the_networks_its_step_calls():
    """DFM drives its encoder and fields directly, not through the denoiser's forward: those are compiled."""
    m = tiny_dfm()
    called = set()
    for module in m.compiled_modules():
        module.register_forward_hook(lambda mod, args, out: called.add(id(mod)))
    m.training_loss(dfm_views())
    assert called == {id(module) for module in m.compiled_modules()} and len(called) == 3


def test_bad_compile_arguments_name_the_valid_ones(monkeypatch):
    with pytest.raises(ValueError, match=r"\['mdoe'\] are not torch.compile arguments.*'mode'"):
        ThreeDiM(network=spec(XUNet, image_size=32, ch=8, ch_mult=(1,), emb_ch=16, num_res_blocks=1, attn_resolutions=()),
                 torch_compile={"mdoe": "max-autotune"})  # fmt: skip
    m = tiny_model(torch_compile=True)
    monkeypatch.setattr(type(m), "_under_fsdp", lambda self: True)
    with pytest.raises(ValueError, match="torch_compile is not supported under FSDP"):
        m.configure_model()


def test_fit_with_torch_compile_from_the_command_line(toy_root, tmp_path):
    from genvs.cli import run

    torch._dynamo.reset()
    out = tmp_path / "run"
    cli = run(["fit", *tiny_args(toy_root, out), "--model.init_args.torch_compile", json.dumps({"backend": "eager"}),
                "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])  # fmt: skip
    model = cli.model
    assert model.torch_compile == {"backend": "eager"} and model.denoiser._compiled_call_impl is not None
    ckpt = torch.load(next(out.rglob("last.ckpt")), map_location="cpu", weights_only=True)
    assert not [k for k in ckpt["state_dict"] if "_orig_mod" in k]
    assert ckpt["hyper_parameters"]["torch_compile"] == {"backend": "eager"}
