"""Run `genvs fit` in this process and SIGKILL it at a chosen point (used by tests/test_resume.py).

    python run_and_kill.py <kill_at> <genvs fit args...>

kill_at: ``step:N`` kills right after training step N; ``save:N`` kills in the middle of writing the
N-th checkpoint (after the temporary file is written, before it replaces the old one); ``never`` runs
to the end. Every training batch's scenes and views are printed (``BATCH ...`` lines) for comparison.
"""

import os
import signal
import sys

import lightning as L

from genvs.cli import main


def kill():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAfterStep(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            kill()


class PrintBatches(L.Callback):
    """Print each training batch's scene ids and view indices (to compare runs)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        print(f"BATCH step={trainer.global_step} epoch={trainer.current_epoch} idx={batch_idx} "
              f"scenes={batch.scene} views={batch.index.tolist()}", flush=True)


if __name__ == "__main__":
    mode, _, n = sys.argv[1].partition(":")
    n = int(n or 0)
    callbacks = [PrintBatches()]
    if mode == "save":
        real_replace = os.replace
        calls = {"n": 0}

        def replace(src, dst):
            if str(dst).endswith(".ckpt"):
                calls["n"] += 1
                if calls["n"] >= n:
                    kill()
            return real_replace(src, dst)

        os.replace = replace
    elif mode == "step":
        callbacks.append(KillAfterStep(n))
    import genvs.cli as cli

    defaults = cli._trainer_defaults
    cli._trainer_defaults = lambda: {**defaults(), "callbacks": [*defaults().get("callbacks", []), *callbacks]}
    main(sys.argv[2:])

