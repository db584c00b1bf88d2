"""No host-device synchronisation in any method's training step (`genvs.core.syncs.HostSyncs`).

The detector is checked on operations known to synchronise and on their synchronisation-free
replacements; then each method's training step (loss, backward, EMA update) on its tiny benchmark
reference, in fp32 and under bf16 autocast, must record none.
"""

from __future__ import annotations

import pytest
import torch

from genvs.core.syncs import HostSyncs
from test_benchmarks import _load


def test_detector_sees_the_operations_that_wait_for_the_device():
    x = torch.randn(6, 4)
    mask = x[:, 0] > 0
    idx = torch.tensor([0, 2])
    waiting = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "if tensor.any()": lambda: 1 if mask.any() else 0,
        "nonzero": lambda: torch.nonzero(mask),
        "boolean-mask index": lambda: x[mask],
        "boolean-mask assignment": lambda: x.clone().__setitem__(mask, 0.0),
        "masked_select": lambda: torch.masked_select(x, x > 0),
        "unique": lambda: torch.unique(idx),
        "repeat_interleave by a tensor": lambda: torch.repeat_interleave(x, mask.long() + 1, dim=0),
        "equal": lambda: torch.equal(x, x),
    }
    for name, op in waiting.items():
        with HostSyncs() as syncs:  # every tensor is on the CPU: nothing waits for a device
            op()
        assert not syncs.ops, f"{name}: {syncs.report()}"
        with HostSyncs([x, idx, mask]) as syncs:  # "on the device", with what is computed from them
            op()
        assert syncs.ops, f"{name} was not seen"
        assert all(s.where.startswith(__file__) for s in syncs.ops), syncs.report()  # the line to fix
        assert all(" in <lambda> " in s.where for s in syncs.ops)

    with pytest.raises(TypeError, match="modules, Views and tensors"):
        HostSyncs([1.0])
    free = {
        "torch.where": lambda: torch.where(mask[:, None], x, 0.0),
        "masked_fill": lambda: x.masked_fill(~mask[:, None], 0.0),
        "integer index": lambda: x[idx],
        "index_select": lambda: x.index_select(0, idx),
        "reduction": lambda: (x * mask[:, None]).sum() / mask.sum().clamp(min=1),
        "repeat_interleave by an int": lambda: torch.repeat_interleave(x, 2, dim=0),
        "isfinite().all() kept on the device": lambda: torch.isfinite(x).all(),
        "repeat_interleave with output_size": lambda: torch.repeat_interleave(x, idx.new_full((6,), 2) + 0 * idx[0], dim=0, output_size=12),
        "host tensor read": lambda: int(torch.tensor([3]).sum()),  # never was on the device
    }
    for name, op in free.items():
        with HostSyncs([x, idx, mask]) as syncs:
            op()
        assert not syncs.ops, f"{name}: {syncs.report()}"


@pytest.mark.parametrize("method", ["threedim", "mvdiffusion", "dfm", "warping"])
def test_training_step_has_no_host_sync(method, monkeypatch):
    """On the CPU, the model's parameters and buffers and the batch as Lightning moves it to the device
    count as device tensors; the batch before the move stays on the host (MVDiffusion keeps its cameras).

    The one exception is the warping model's training pairs: the mesh rasteriser reads its number of
    candidate pixels (data) once per call to size its buffers; nothing else may synchronise."""
    import genvs.core.geometry as geometry

    rasterized = []
    rasterize = geometry.rasterize_depth_mesh
    monkeypatch.setattr(geometry, "rasterize_depth_mesh", lambda *a, **k: rasterized.append(1) or rasterize(*a, **k))
    torch.manual_seed(0)
    ref = _load("run").REFERENCES[method](True)
    model = ref.model
    model.configure_model()  # channels_last and the EMA, as Lightning does
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for bf16 in (False, True):
        host = model.on_before_batch_transfer(ref.views, 0)
        views = host.apply(lambda _, t: t.clone())  # the transfer: new tensors, on the "device"
        device = [model, views]
        rasterized.clear()
        with HostSyncs(device) as syncs:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = model.training_loss(views)["loss"]
            loss.backward()
        counts = [s for s in syncs.ops if " in _candidate_chunks " in s.where]
        assert len(counts) == len(rasterized) == (2 if method == "warping" else 0)  # forward and backward warp
        syncs.ops = [s for s in syncs.ops if s not in counts]
        # torch's Adam reads its step counter, a CPU tensor by design (no device involved), so it runs outside
        opt.step()
        opt.zero_grad(set_to_none=True)
        with HostSyncs(device) as ema_syncs:
            if model.ema is not None:  # MVDiffusion keeps none (ema_decay 0, as the paper)
                model.ema.update(model.denoiser)
        assert not syncs.ops + ema_syncs.ops, f"{method} (bf16 {bf16}):\n{syncs.report()}\n{ema_syncs.report()}"
    # the steps ran: the trained weights moved
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if p.requires_grad)
