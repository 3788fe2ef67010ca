"""Run ``pretrain_bert.py`` with a fault injected, for the reliability tests.

    FAULT_KIND=sigkill FAULT_RANK=1 FAULT_ITERATION=3 python tests/fault_injection.py <flags>

``FAULT_KIND``:
  - ``sigkill``: rank ``FAULT_RANK`` kills itself with SIGKILL in the middle of iteration
    ``FAULT_ITERATION`` (after its forward pass, before its backward pass);
  - ``hang``: that rank stops responding there (sleeps) without dying;
  - ``nan_grad``: from that iteration on, every rank's gradients are NaN while the loss stays
    finite;
  - ``overflow``: from that iteration on, every rank's gradients are infinite (fp16 overflow);
  - unset: no fault.

``FAULT_RESULT``: rank 0 writes the per-iteration losses, the last iteration and checkpoint and
the exit reason there as JSON when training returns. Launch one process per rank with torchrun's
environment variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), as a scheduler would.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron.training.errors import exit_on_error  # noqa: E402
from tests.training_utils import load_pretrain_bert  # noqa: E402


def _inject(module) -> None:
    kind = os.environ.get("FAULT_KIND")
    if not kind:
        return
    rank = int(os.environ.get("RANK", "0"))
    target_rank = int(os.environ.get("FAULT_RANK", "0"))
    target_iteration = int(os.environ["FAULT_ITERATION"])
    calls = {"forward": 0}
    micro_batches = {"n": None}
    original_forward, original_loss = module.forward_step, module.loss_func

    def iteration_of_call() -> int:
        return calls["forward"] // micro_batches["n"] + 1

    def forward_step(data_iterator, model, *, args):
        micro_batches["n"] = args.num_micro_batches
        output = original_forward(data_iterator, model, args=args)
        if not model.training:  # validation
            return output
        iteration = iteration_of_call()
        calls["forward"] += 1
        if rank == target_rank and iteration == target_iteration:
            if kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                time.sleep(3600)
        return output

    def loss_func(*args):
        loss, reported = original_loss(*args)
        # forward_step has counted this micro-batch already.
        if kind in ("nan_grad", "overflow") and loss.requires_grad and \
                (calls["forward"] - 1) // micro_batches["n"] + 1 >= target_iteration:
            bad = float("nan") if kind == "nan_grad" else float("inf")
            loss.register_hook(lambda grad: grad * bad)
        return loss, reported

    module.forward_step, module.loss_func = forward_step, loss_func


def main() -> None:
    module = load_pretrain_bert()
    _inject(module)
    result = module.main(sys.argv[1:])
    out = os.environ.get("FAULT_RESULT")
    if out and int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as handle:
            json.dump({"losses": result.losses, "iteration": result.iteration,
                       "checkpoint": result.checkpoint, "exit_reason": result.exit_reason,
                       "skipped": result.skipped_iterations}, handle)


if __name__ == "__main__":
    with exit_on_error("pretrain_bert.py"):
        main()
