"""One BERT training step, ours vs Hugging Face's ``MegatronBertForPreTraining``; prints JSON.

For each configuration (small: hidden 256 x 4 layers; base: hidden 768 x 12 layers; both batch
8 x seq 128, vocabulary 30522) the script builds our :class:`megatron.model.BertModel` at TP=1 and
``transformers.MegatronBertForPreTraining`` with the same shapes, the same batch (15% of positions
masked, a sentence-order label per sequence) and the same optimizer (``torch.optim.AdamW`` with
``fused=True``), and times forward + backward + optimizer step, alternating the two models round
by round so drift on the machine affects both alike. Dropout is on (0.1) in both, as in training.

It also measures the fp32 matmul peak of this machine in the same run and reports each model's
FLOP/s as a fraction of it, counting the standard ``6*N*T + 12*L*h*s*T`` model FLOPs (N: all
parameters including the tied embedding, T: tokens per step), the same count for both models.

Usage: ``python bench/bench_model.py [--threads 2] [--rounds-small 8] [--rounds-base 5]``.
Where a CUDA GPU is present, ``--gpu`` times BERT-345M (seq 512, bf16, SDPA) instead.
"""

import argparse
import json
import logging
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from megatron import mpu
from megatron.model import BertConfig, BertModel

logger = logging.getLogger("bench_model")

CONFIGS = {
    "small": dict(hidden=256, layers=4, heads=4, seq=128, batch=8),
    "base": dict(hidden=768, layers=12, heads=12, seq=128, batch=8),
    "345m": dict(hidden=1024, layers=24, heads=16, seq=512, batch=8),
}
VOCAB = 30522


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, sizes=(2048, 3072),
                      repeats: int = 12) -> float:
    """Best FLOP/s of square matmuls (what the hardware and BLAS reach on large dense GEMMs).

    The best of several sizes and repeats: a generous peak, so the fractions reported against it
    are conservative.
    """
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for _ in range(repeats):
            _sync(device)
            start = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(shape: dict, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B, S = shape["batch"], shape["seq"]
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    loss_mask = (torch.rand(B, S, generator=g) < 0.15).long()
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    batch = dict(ids=ids, attention_mask=torch.ones(B, S, dtype=torch.long),
                 tokentype=(torch.arange(S) >= S // 2).long().expand(B, S).contiguous(),
                 loss_mask=loss_mask, labels=labels,
                 hf_labels=labels.masked_fill(loss_mask == 0, -100),
                 sop=torch.randint(0, 2, (B,), generator=g))
    return {k: v.to(device) for k, v in batch.items()}


def build_ours(shape: dict, device, dtype):
    config = BertConfig(num_layers=shape["layers"], hidden_size=shape["hidden"],
                        num_attention_heads=shape["heads"], vocab_size=VOCAB,
                        max_position_embeddings=max(512, shape["seq"]),
                        bf16=dtype == torch.bfloat16)
    mpu.model_parallel_manual_seed(1234)
    model = BertModel(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(batch):
        lm_loss, binary_logits = model(batch["ids"], batch["attention_mask"], batch["tokentype"],
                                       lm_labels=batch["labels"], loss_mask=batch["loss_mask"])
        mask = batch["loss_mask"].float()
        loss = (lm_loss * mask).sum() / mask.sum() + F.cross_entropy(binary_logits.float(),
                                                                     batch["sop"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return model, step


def build_hf(shape: dict, device, dtype):
    import transformers

    config = transformers.MegatronBertConfig(
        vocab_size=VOCAB, hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], intermediate_size=4 * shape["hidden"],
        max_position_embeddings=max(512, shape["seq"]))
    torch.manual_seed(1234)
    model = transformers.MegatronBertForPreTraining(config).to(device=device, dtype=dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(batch):
        out = model(input_ids=batch["ids"], attention_mask=batch["attention_mask"],
                    token_type_ids=batch["tokentype"], labels=batch["hf_labels"],
                    next_sentence_label=batch["sop"])
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return out.loss

    return model, step, config._attn_implementation


def model_flops_per_step(shape: dict, num_params: int) -> float:
    tokens = shape["batch"] * shape["seq"]
    return 6 * num_params * tokens + 12 * shape["layers"] * shape["hidden"] * shape["seq"] * tokens


def bench_config(name: str, rounds: int, device, dtype, peak: float) -> dict:
    shape = CONFIGS[name]
    batch = make_batch(shape, device)
    ours, ours_step = build_ours(shape, device, dtype)
    hf, hf_step, attn_impl = build_hf(shape, device, dtype)
    steps = {"ours": ours_step, "hf": hf_step}
    for step in steps.values():  # warm-up: allocator, kernels, optimizer state
        for _ in range(2):
            step(batch)
    _sync(device)
    times = {"ours": [], "hf": []}
    for r in range(rounds):
        order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")
        for key in order:
            _sync(device)
            start = time.perf_counter()
            steps[key](batch)
            _sync(device)
            times[key].append(time.perf_counter() - start)
        logger.info("%s round %d: ours %.3f s, hf %.3f s", name, r, times["ours"][-1],
                    times["hf"][-1])
    tokens = shape["batch"] * shape["seq"]
    num_params = sum(p.numel() for p in hf.parameters())  # untied count == ours minus padding
    flops = model_flops_per_step(shape, num_params)
    result = {"config": shape, "params": num_params, "tokens_per_step": tokens,
              "model_flops_per_step": flops, "hf_attn_implementation": attn_impl}
    for key in ("ours", "hf"):
        median = statistics.median(times[key])
        result[key] = {"step_s": round(median, 4), "steps": [round(t, 4) for t in times[key]],
                       "tokens_per_s": round(tokens / median, 1),
                       "model_tflops": round(flops / median / 1e12, 4),
                       "fraction_of_matmul_peak": round(flops / median / peak, 3)}
    result["ours_over_hf"] = round(result["ours"]["step_s"] / result["hf"]["step_s"], 3)
    # Within-round ratios cancel the machine's slow drift better than a ratio of medians.
    result["ours_over_hf_per_round_median"] = round(statistics.median(
        o / h for o, h in zip(times["ours"], times["hf"])), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds-small", type=int, default=8)
    parser.add_argument("--rounds-base", type=int, default=5)
    parser.add_argument("--configs", default="small,base")
    parser.add_argument("--gpu", action="store_true", help="time BERT-345M in bf16 on CUDA")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")

    if args.gpu:
        device, dtype, configs = torch.device("cuda"), torch.bfloat16, ["345m"]
        rounds = {"345m": 10}
    else:
        torch.set_num_threads(args.threads)
        device, dtype = torch.device("cpu"), torch.float32
        configs = args.configs.split(",")
        rounds = {"small": args.rounds_small, "base": args.rounds_base}
    peak = matmul_peak_flops(device, dtype)
    out = {"torch": torch.__version__, "device": str(device), "dtype": str(dtype),
           "threads": torch.get_num_threads(), "matmul_peak_tflops": round(peak / 1e12, 4)}
    for name in configs:
        out[name] = bench_config(name, rounds[name], device, dtype, peak)
    targets = {"ours_over_hf_max": 0.8, "base_fraction_of_peak_min": 0.65}
    if not args.gpu:
        met = all(out[n]["ours_over_hf"] <= 0.8 for n in configs)
        if "base" in out:
            met = met and out["base"]["ours"]["fraction_of_matmul_peak"] >= 0.65
        targets["met"] = met
    out["targets"] = targets
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
