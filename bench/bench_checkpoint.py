"""Time and peak memory of resharding and exporting a BERT-345M-sized checkpoint; prints JSON.

The script writes a random checkpoint of BERT-345M's shapes (24 layers, hidden 1024, 16 heads,
vocabulary 30522 padded to 30592, fp32 weights with AdamW moments: 4.1 GB at TP=1) with
``torch.save`` in Megatron's layout, then measures, each in a fresh child process:

- ``reshard 1->8``: ``tools/checkpoint_util.py`` from the TP=1 checkpoint to TP=8;
- ``reshard 8->1``: from that TP=8 checkpoint back to TP=1;
- ``export tp1`` / ``export tp8``: ``tools/convert_checkpoint_to_hf.py`` from each (weights
  only: 1.3 GB of safetensors);

and two references for the same bytes, alternating with the tool round by round so that drift
on the machine hits both alike (medians are reported):

- ``copy``: read every source byte and write it once through user space into as many files as
  the tool writes (8 for 1->8, 1 for 8->1; for an export, the weights' size into one file),
  fsynced: the I/O floor, the target's reference;
- ``resave`` (reshards only): ``torch.load(mmap=True)`` + ``torch.save`` of every source file,
  fsynced: the checkpoint format's own cost (``torch.save`` computes a CRC32 per record).

The tools fsync what they write before renaming it into place, so every side includes the disk.
Peak RSS is the child's ``VmHWM`` (peak resident memory, file-backed mapped pages included; unlike
``ru_maxrss`` it does not carry the forking parent's peak across ``exec``), also given above the
child's resident memory before the operation (``baseline``: Python, torch and the tools' imports).
The targets: peak ≤ 1.5 × (largest single shard + largest tensor), and time ≤ 2 × ``copy``. The
TP=1 file is the largest shard in both reshard directions. Threads are pinned (``--threads``,
default 1, and one CPU) for every side. Disk: about 9.5 GB at peak, removed at the end.

Usage: ``python bench/bench_checkpoint.py [--rounds 2] [--dir /tmp] [--model 345m|3.9b|small]
[--no-optimizer]`` (``--model small``, or ``--small``, is a 4-layer, hidden-256 model for a
quick check; ``--model 3.9b --no-optimizer`` writes 15.6 GB at TP=1 and needs about 47 GB of
scratch disk).
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB = ROOT / "data" / "bert-large-uncased-vocab.txt"
# (layers, hidden, heads): BERT-345M and BERT-3.9B of the Megatron-LM paper, and a quick check.
MODELS = {"345m": (24, 1024, 16), "3.9b": (48, 2560, 40), "small": (4, 256, 8)}


def _status_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process. ``VmHWM`` belongs to this program's address space:
    unlike ``ru_maxrss`` it does not carry the forking parent's peak across ``exec``."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def build_checkpoint(save: Path, layers: int, hidden: int, heads: int,
                     optimizer: bool = True) -> dict:
    """A random BERT checkpoint at TP=1, with AdamW state if ``optimizer``; returns sizes."""
    from megatron.checkpoint.hf_import import expected_shapes
    from megatron.checkpoint.sharding import optimizer_param_names
    from megatron.model import BertConfig
    from megatron.model.bert_model import nested_state_dict
    from megatron.training.arguments import build_parser

    config = BertConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                        vocab_size=30522)
    generator = torch.Generator().manual_seed(0)
    model = {}
    for name, shape in expected_shapes(config, "pretraining").items():
        tensor = torch.randn(shape, generator=generator) * 0.02
        if name.endswith("word_embeddings.weight") or name == "lm_head.bias":
            tensor[config.vocab_size:] = 0
        model[name] = tensor
    groups = optimizer_param_names(model) if optimizer else []
    ids, state, param_groups, index = {}, {}, [], 0
    for group in groups:
        param_groups.append({"params": list(range(index, index + len(group))), "lr": 1e-4,
                             "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01,
                             "amsgrad": False, "wd_mult": 1.0, "lr_mult": 1.0})
        for name in group:
            ids[index] = name
            state[index] = {"step": torch.tensor(100.0),
                            "exp_avg": torch.randn(model[name].shape, generator=generator),
                            "exp_avg_sq": torch.rand(model[name].shape, generator=generator)}
            index += 1
    args = build_parser().parse_args([])
    args.__dict__.update(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                         ffn_hidden_size=4 * hidden, max_position_embeddings=512,
                         tensor_model_parallel_size=1, padded_vocab_size=config.padded_vocab_size,
                         vocab_size=30522, vocab_file=str(VOCAB))
    checkpoint = {"args": args, "checkpoint_version": 3.0, "iteration": 100,
                  "model": nested_state_dict(model), "opt_param_scheduler": {"num_steps": 800}}
    if optimizer:
        checkpoint["optimizer"] = {"state": state, "param_groups": param_groups}
    path = save / "iter_0000100" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)
    (save / "latest_checkpointed_iteration.txt").write_text("100")
    largest = max(t.numel() * t.element_size() for t in model.values())
    return {"params": sum(t.numel() for t in model.values()),
            "weights_bytes": sum(t.numel() * t.element_size() for t in model.values()),
            "largest_tensor_bytes": largest}


def files_of(directory: Path):
    return sorted(p for p in directory.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ children


def copy_bytes(path: Path, out, limit: int) -> int:
    """Copy up to ``limit`` bytes of ``path`` to ``out`` (a path or an open file), fsynced."""
    own = not hasattr(out, "write")
    target = open(out, "wb") if own else out
    done = 0
    with open(path, "rb") as handle:
        while done < limit:
            block = handle.read(min(limit - done, 64 << 20))
            if not block:
                break
            target.write(block)
            done += len(block)
    target.flush()
    os.fsync(target.fileno())
    if own:
        target.close()
    return done


def child(argv) -> None:
    """Run one measured operation in this (fresh) process and print JSON."""
    op, source, target = argv[0], Path(argv[1]), Path(argv[2])
    from tools import checkpoint_util, convert_checkpoint_to_hf  # imports outside the timing

    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    if op == "copy":  # read every source byte and write it once into N files (no reflinks)
        target.mkdir()
        sources, outputs = files_of(source), int(argv[3])
        total = sum(path.stat().st_size for path in sources)
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(open(target / f"{i}.bin", "wb"))
                       for i in range(outputs)]
            written = 0
            for path in sources:
                with open(path, "rb") as handle:
                    while block := handle.read(64 << 20):
                        handles[min(written * outputs // total, outputs - 1)].write(block)
                        written += len(block)
            for out in handles:
                out.flush()
                os.fsync(out.fileno())
    elif op == "copy-bytes":  # read and write the first N bytes of the source files
        remaining = int(argv[3])
        with open(target.with_suffix(".bin"), "wb") as out:
            for path in files_of(source):
                remaining -= copy_bytes(path, out, remaining)
    elif op == "resave":  # torch.load + torch.save of every file: the format's own cost
        target.mkdir()
        for index, path in enumerate(files_of(source)):
            if path.suffix == ".pt":
                with open(target / f"{index}.pt", "wb") as out:
                    torch.save(torch.load(path, weights_only=False, mmap=True), out)
                    out.flush()
                    os.fsync(out.fileno())
    elif op == "reshard":
        checkpoint_util.main(["--load-dir", str(source), "--save-dir", str(target),
                              "--target-tensor-parallel-size", argv[3], "--quiet"])
    else:
        convert_checkpoint_to_hf.main(["--load-dir", str(source), "--save-dir", str(target),
                                       "--quiet"])
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss_kib": peak, "baseline_rss_kib": baseline}))


def run_child(args, *argv) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, __file__, "--child", *map(str, argv)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def measure(args, name: str, op: list, references: dict, out: Path) -> dict:
    """Alternate the operation and its references ``args.rounds`` times; medians."""
    runs = {"tool": [], **{key: [] for key in references}}
    for _ in range(args.rounds):
        runs["tool"].append(run_child(args, *op))
        remove(out)
        for key, reference in references.items():
            runs[key].append(run_child(args, *reference))
            remove(Path(reference[2]))
            remove(Path(reference[2]).with_suffix(".bin"))
    median = {key: statistics.median(r["seconds"] for r in values)
              for key, values in runs.items()}
    peak = max(r["peak_rss_kib"] for r in runs["tool"]) * 1024
    baseline = min(r["baseline_rss_kib"] for r in runs["tool"]) * 1024
    result = {"seconds": round(median["tool"], 2)}
    for key in references:
        result[f"{key}_seconds"] = round(median[key], 2)
        result[f"time_ratio_vs_{key}"] = round(median["tool"] / median[key], 2)
    result.update(peak_rss_gib=round(peak / 2 ** 30, 3),
                  peak_above_baseline_gib=round((peak - baseline) / 2 ** 30, 3))
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dir", default=None, help="scratch directory (default: $TMPDIR)")
    parser.add_argument("--model", default="345m", choices=sorted(MODELS),
                        help="shape (layers, hidden, heads): " + ", ".join(
                            f"{k} {v}" for k, v in sorted(MODELS.items())))
    parser.add_argument("--small", action="store_true", help="the same as --model small")
    parser.add_argument("--no-optimizer", action="store_true",
                        help="weights only, no AdamW state (3.9b with its state needs 94 GB of "
                             "disk for source and target)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # children inherit it
    shape = MODELS["small" if args.small else args.model]
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoint-", dir=args.dir))
    try:
        sizes = build_checkpoint(work / "tp1", *shape, optimizer=not args.no_optimizer)
        tp1_bytes = sum(p.stat().st_size for p in files_of(work / "tp1"))
        result = {"model": {"layers": shape[0], "hidden": shape[1], "heads": shape[2],
                            "params": sizes["params"], "optimizer_state": not args.no_optimizer},
                  "checkpoint_bytes": tp1_bytes, "largest_tensor_bytes":
                      sizes["largest_tensor_bytes"], "threads": args.threads, "rounds": args.rounds}
        bound = 1.5 * (tp1_bytes + sizes["largest_tensor_bytes"])

        def references(source, outputs):
            return {"copy": ["copy", work / source, work / "copy", outputs],
                    "resave": ["resave", work / source, work / "copy"]}

        result["reshard_1_to_8"] = measure(
            args, "1->8", ["reshard", work / "tp1", work / "tp8", 8], references("tp1", 8),
            work / "tp8")
        run_child(args, "reshard", work / "tp1", work / "tp8", 8)  # keep one TP=8 copy
        result["reshard_8_to_1"] = measure(
            args, "8->1", ["reshard", work / "tp8", work / "back", 1], references("tp8", 1),
            work / "back")
        for source in ("tp1", "tp8"):
            reference = {"copy": ["copy-bytes", work / source, work / "copy",
                                  sizes["weights_bytes"]]}
            result[f"export_{source}"] = measure(
                args, source, ["export", work / source, work / "hf"], reference, work / "hf")
        result["largest_shard_bytes"] = tp1_bytes
        result["peak_bound_gib"] = round(bound / 2 ** 30, 3)
        for key in ("reshard_1_to_8", "reshard_8_to_1", "export_tp1", "export_tp8"):
            entry = result[key]
            entry["meets_memory_target"] = entry["peak_rss_gib"] * 2 ** 30 <= bound
            entry["meets_time_target"] = entry["time_ratio_vs_copy"] <= 2.0
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
