"""Tensor-parallel demo: a small character-level language model trained with megatron.mpu.

Run on CPU with two processes and tensor parallelism 2 (what ``make demo`` does)::

    torchrun --standalone --nproc_per_node 2 examples/tp_demo.py --tensor-model-parallel-size 2

or in one plain process (``python examples/tp_demo.py``). With 4 processes and
``--tensor-model-parallel-size 2`` it also runs 2-way data parallelism.

The model predicts the next character of Shakespeare from the previous ``--context``
characters: a vocabulary-parallel embedding of each of them, a column-parallel layer over their
concatenation, GeLU, a row-parallel layer, and vocabulary-parallel logits scored by
``vocab_parallel_cross_entropy``. Before training, the demo rebuilds the same model at TP=1 inside
each process and checks that both compute the same loss: tensor parallelism changes where the
arithmetic happens, not what it computes.
"""

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megatron import mpu

VOCAB = 256  # bytes; divisible by every tensor-parallel size up to 256
DATA = Path(__file__).resolve().parent.parent / "data" / "shakespeare_tiny.jsonl"


class CharModel(nn.Module):
    def __init__(self, context: int, hidden: int, dropout: float, process_group=None):
        super().__init__()
        kw = dict(process_group=process_group)
        self.embedding = mpu.VocabParallelEmbedding(VOCAB, hidden, **kw)
        self.fc1 = mpu.ColumnParallelLinear(context * hidden, 4 * hidden, gather_output=False,
                                            skip_bias_add=True, **kw)
        self.fc2 = mpu.RowParallelLinear(4 * hidden, hidden, input_is_parallel=True, **kw)
        self.head = mpu.ColumnParallelLinear(hidden, VOCAB, gather_output=False, **kw)
        self.dropout = dropout
        self.process_group = process_group

    def logits(self, chars: torch.Tensor) -> torch.Tensor:
        """Vocabulary-parallel logits ``[B, V/p]`` of the character after ``chars``."""
        B, T = chars.shape
        x = self.embedding(chars).view(B, -1)  # [B, T*h], replicated on every rank
        h, bias = self.fc1(x)  # [B, 4h/p]: this rank's columns
        with mpu.get_rng_tracker().fork():  # sharded activations: per-rank dropout stream
            h = F.dropout(F.gelu(h + bias), self.dropout, self.training)
        h, _ = self.fc2(h)  # [B, h], summed over ranks
        return self.head(F.dropout(h, self.dropout, self.training))[0]  # [B, V/p]

    def forward(self, chars: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = mpu.vocab_parallel_cross_entropy(self.logits(chars), target,
                                                process_group=self.process_group)
        return loss.mean()

    @torch.no_grad()
    def sample(self, prompt: bytes, length: int, context: int, seed: int) -> str:
        """Sample ``length`` characters; every rank draws the same ones from a shared seed."""
        generator = torch.Generator().manual_seed(seed)
        out = list(prompt)
        for _ in range(length):
            chars = torch.tensor([out[-context:]])
            logits = mpu.gather_from_tensor_model_parallel_region(self.logits(chars),
                                                                  self.process_group)
            probs = F.softmax(logits[0] / 0.7, dim=-1)
            out.append(int(torch.multinomial(probs, 1, generator=generator)))
        return bytes(out).decode("utf-8", errors="replace")


def load_corpus() -> torch.Tensor:
    with open(DATA, encoding="utf-8") as f:
        text = "\n".join(json.loads(line)["text"] for line in f if line.strip())
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)


def get_batch(corpus, args, generator):
    """Sampled on the first rank of each tensor-parallel group, broadcast to the others."""
    data = None
    if mpu.get_tensor_model_parallel_rank() == 0:
        starts = torch.randint(0, len(corpus) - args.context - 1, (args.micro_batch_size,),
                               generator=generator)
        windows = torch.stack([corpus[s : s + args.context + 1] for s in starts.tolist()])
        data = {"chars": windows[:, :-1].contiguous(), "target": windows[:, -1].contiguous()}
    batch = mpu.broadcast_data(["chars", "target"], data, torch.int64)
    return batch["chars"], batch["target"]


def check_against_tp1(model, args, corpus, log):
    """Build the same model at TP=1 (a group of one) and compare the initial loss."""
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]
    mpu.model_parallel_manual_seed(args.seed)
    reference = CharModel(args.context, args.hidden_size, 0.0, process_group=singles[rank])
    chars, target = get_batch(corpus, args, torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        loss_tp, loss_ref = model(chars, target).item(), reference(chars, target).item()
    model.train()
    log(f"initial loss at TP={mpu.get_tensor_model_parallel_world_size()}: {loss_tp:.6f} | "
        f"same weights at TP=1: {loss_ref:.6f} | difference {abs(loss_tp - loss_ref):.1e}")
    if abs(loss_tp - loss_ref) > 1e-5:
        raise RuntimeError(f"TP and TP=1 losses differ: {loss_tp} vs {loss_ref}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None,
                        help="default: the number of processes")
    parser.add_argument("--train-iters", type=int, default=1000)
    parser.add_argument("--micro-batch-size", type=int, default=64)
    parser.add_argument("--context", type=int, default=16)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clip-grad", type=float, default=1.0)
    parser.add_argument("--hidden-dropout", type=float, default=0.1)
    parser.add_argument("--log-interval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--local-rank", "--local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    backend = "gloo"  # the demo's tensors live on the CPU
    if "MASTER_ADDR" in os.environ:  # launched by torchrun
        dist.init_process_group(backend)
    else:  # a plain single process
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    state = mpu.initialize_model_parallel(args.tensor_model_parallel_size or world)
    rank = dist.get_rank()
    log = (lambda msg: print(f"[demo] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    log(f"world size {world}: tensor-model-parallel size {state.tensor_model_parallel_size}, "
        f"data-parallel size {state.data_parallel_size}, backend {backend}")

    corpus = load_corpus()
    mpu.model_parallel_manual_seed(args.seed)
    model = CharModel(args.context, args.hidden_size, args.hidden_dropout)
    shard = sum(p.numel() for p in model.parameters())
    log(f"{len(corpus):,} characters of Shakespeare; {shard:,} parameters on each rank")
    check_against_tp1(model, args, corpus, log)

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed + 1 + mpu.get_data_parallel_rank())
    dp_group, dp_size = mpu.get_data_parallel_group(), mpu.get_data_parallel_world_size()
    start, first_loss, losses = time.time(), None, []
    for iteration in range(1, args.train_iters + 1):
        chars, target = get_batch(corpus, args, generator)
        loss = model(chars, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dp_size > 1:  # average gradients over replicas holding the same shards
            for p in model.parameters():
                dist.all_reduce(p.grad, group=dp_group)
                p.grad.div_(dp_size)
        grad_norm = mpu.clip_grad_norm(model.parameters(), args.clip_grad)
        optimizer.step()
        losses.append(loss.item())
        first_loss = first_loss if first_loss is not None else losses[0]
        if iteration % args.log_interval == 0:
            elapsed = (time.time() - start) * 1000 / iteration
            mean_loss = sum(losses) / len(losses)
            log(f"iteration {iteration:5d}/{args.train_iters} | loss {mean_loss:.4f} "
                f"| grad norm {grad_norm:.3f} | {elapsed:.1f} ms/iteration")
            losses = []
    log(f"loss went from {first_loss:.3f} (uniform guess: {torch.log(torch.tensor(VOCAB)):.3f}) "
        f"to {loss.item():.3f} in {args.train_iters} iterations, {time.time() - start:.1f} s")
    model.eval()
    prompt = corpus[: args.context].tolist()
    log("sample: " + repr(model.sample(bytes(prompt), 160, args.context, args.seed)))
    dist.barrier()
    mpu.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
