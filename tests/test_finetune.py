"""tasks/main.py end to end on CPU/gloo from a tiny pretrained checkpoint.

One tiny BERT (2 layers, hidden 64) is pretrained for 20 iterations at tensor-parallel size 2;
SST-2 and RACE are finetuned from it at TP=1 (the checkpoint resharded on load) and TP=2, and
with two data-parallel ranks, dropout off: the losses and metrics agree and the loss falls.
"""

import dataclasses
import json
import subprocess
import sys

import pytest

from tests.distributed import run_distributed
from tests.training_utils import ROOT, VOCAB, preprocess_sample_corpus, run_pretrain, tiny_argv

GLUE = ROOT / "tests" / "assets" / "glue"
RACE = ROOT / "tests" / "assets" / "race"
TIMEOUT = 240


def _pretrain_worker(rank, world_size, argv):
    run_pretrain(argv)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A checkpoint of the tiny model, pretrained at tensor-parallel size 2."""
    directory = tmp_path_factory.mktemp("pretrained")
    prefix = preprocess_sample_corpus(directory)
    save = str(directory / "checkpoint")
    run_distributed(_pretrain_worker, 2, tiny_argv(
        prefix, "--save", save, "--tensor-model-parallel-size", "2"), timeout=TIMEOUT)
    return save


def _finetune_worker(rank, world_size, argv, out):
    from tasks.main import main

    result = main(argv)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(dataclasses.asdict(result), handle)


def finetune(tmp_path, argv, world_size=1, name="run"):
    out = str(tmp_path / f"{name}.json")
    run_distributed(_finetune_worker, world_size, argv, out, timeout=TIMEOUT)
    with open(out) as handle:
        return json.load(handle)


def sst2_argv(pretrained, *extra, epochs=6, tp=1, schedule=("--lr-warmup-fraction", "0.1")):
    return ["--task", "SST-2", "--train-data", str(GLUE / "SST-2" / "train.tsv"),
            "--valid-data", str(GLUE / "SST-2" / "dev.tsv"), "--pretrained-checkpoint",
            pretrained, "--epochs", str(epochs), "--micro-batch-size", "4",
            "--global-batch-size", "8", "--lr", "2e-3", *schedule,
            "--seq-length", "64", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--tensor-model-parallel-size", str(tp), "--log-interval", "32",
            "--eval-interval", "1000", "--distributed-backend", "gloo", *extra]


def _metrics(result):
    return [(e["iteration"], e["metrics"]) for e in result["evaluations"]]


def test_sst2_is_the_same_at_every_layout_and_learns(tmp_path, pretrained):
    save = str(tmp_path / "sst2")
    constant = ("--lr-decay-style", "constant")  # two epochs then follow six exactly
    reference = finetune(tmp_path, sst2_argv(
        pretrained, "--save", save, "--predict", "--test-data", str(GLUE / "SST-2" / "test.tsv"),
        schedule=constant), name="tp1")
    assert reference["iteration"] == 6 * 32 and len(reference["evaluations"]) == 6
    losses = reference["losses"]
    first, last = sum(losses[:16]) / 16, sum(losses[-16:]) / 16
    assert first > 0.6 and last < first - 0.4, (first, last)  # it fits the training set
    # Compared over two epochs: once the model starts to memorise the training set, the
    # rounding differences between layouts (summation order) grow from one step to the next.
    for world_size, tp in ((2, 2), (2, 1)):
        result = finetune(tmp_path, sst2_argv(pretrained, tp=tp, epochs=2, schedule=constant),
                          world_size, f"w{world_size}tp{tp}")
        assert result["losses"] == pytest.approx(losses[:64], rel=1e-4, abs=1e-6), tp
        assert _metrics(result) == _metrics(reference)[:2], tp  # accuracies: exact fractions

    # The best model, the summary and GLUE's submission file.
    best = reference["best"]
    assert best["score"] == max(e["score"] for e in reference["evaluations"])
    assert reference["best_checkpoint"].endswith(f"best/iter_{best['iteration']:07d}")
    summary = json.loads((tmp_path / "sst2" / "finetune_summary.json").read_text())
    assert summary["best"] == best and summary["task"] == "SST-2"
    assert summary["label_names"] == ["0", "1"] and summary["iterations_per_epoch"] == 32
    predictions = (tmp_path / "sst2" / "predictions" / "SST-2.tsv").read_text().split("\n")
    assert predictions[0] == "index\tprediction" and len(predictions) == 18
    assert all(line.split("\t")[1] in ("0", "1") for line in predictions[1:-1])

    # --epochs 0: evaluate and predict with the saved best model, as the run did.
    again = finetune(tmp_path, sst2_argv(
        pretrained, "--load", str(tmp_path / "sst2" / "best"), "--save",
        str(tmp_path / "eval"), "--predict", "--test-data", str(GLUE / "SST-2" / "test.tsv"),
        epochs=0), name="eval")
    assert again["evaluations"][0]["metrics"] == best["metrics"]
    assert (tmp_path / "eval" / "predictions" / "SST-2.tsv").read_text() == "\n".join(predictions)

    # The best checkpoint exports to Hugging Face with its labels and predicts the same.
    _hf_predictions_agree(str(tmp_path / "sst2" / "best"), str(tmp_path / "hf"), predictions)


def _hf_predictions_agree(best: str, hf_dir: str, predictions) -> None:
    import torch
    import transformers

    from megatron.checkpoint.hf import export_to_hf
    from megatron.tokenizer import build_tokenizer
    from tasks.glue.data import TASKS, build_glue_dataset

    export_to_hf(best, hf_dir)
    model = transformers.MegatronBertForSequenceClassification.from_pretrained(hf_dir).eval()
    assert model.config.id2label == {0: "0", 1: "1"}
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))
    test = build_glue_dataset(TASKS["SST-2"], [str(GLUE / "SST-2" / "test.tsv")], tokenizer, 64)
    batch = test.batch(range(len(test)), torch.device("cpu"))
    with torch.no_grad():
        logits = model(input_ids=batch["text"], attention_mask=batch["padding_mask"],
                       token_type_ids=batch["types"]).logits
    expected = [line.split("\t")[1] for line in predictions[1:-1]]
    assert [model.config.id2label[int(i)] for i in logits.argmax(1)] == expected


def test_race_is_the_same_at_tp1_and_tp2(tmp_path, pretrained):
    argv = ["--task", "RACE", "--train-data", str(RACE / "train"), "--valid-data",
            str(RACE / "dev"), "--pretrained-checkpoint", pretrained, "--epochs", "2",
            "--micro-batch-size", "4", "--lr", "1e-3", "--seq-length", "64",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "5",
            "--distributed-backend", "gloo"]
    tp1 = finetune(tmp_path, argv, name="race1")
    tp2 = finetune(tmp_path, argv + ["--tensor-model-parallel-size", "2"], 2, "race2")
    assert tp1["iteration"] == 2 * (37 // 4)
    assert tp2["losses"] == pytest.approx(tp1["losses"], rel=1e-4)
    metrics = tp1["evaluations"][-1]["metrics"]["dev"]
    assert set(metrics) == {"accuracy", "questions", "accuracy_middle", "questions_middle",
                            "accuracy_high", "questions_high"}
    assert (metrics["questions_middle"], metrics["questions_high"]) == (8, 6)
    assert _metrics(tp2) == _metrics(tp1)


def test_resume_continues_exactly(tmp_path, pretrained):
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
    straight = finetune(tmp_path, sst2_argv(pretrained, *dropout, epochs=2), name="straight")
    save = str(tmp_path / "resume")
    first = finetune(tmp_path, sst2_argv(pretrained, *dropout, "--save", save,
                                         "--exit-interval", "40", epochs=2), name="first")
    assert first["stopped_early"] and first["iteration"] == 40
    second = finetune(tmp_path, sst2_argv(pretrained, *dropout, "--save", save, "--load", save,
                                          epochs=2), name="second")
    assert first["losses"] + second["losses"] == straight["losses"]  # bit for bit
    assert _metrics(second) == _metrics(straight)  # the epoch-1 evaluation carried over
    assert second["best"] == straight["best"]


def test_stsb_regression(tmp_path, pretrained):
    stsb = str(GLUE / "STS-B" / "dev.tsv")
    result = finetune(tmp_path, ["--task", "STS-B", "--train-data", stsb, "--valid-data", stsb,
                                 "--pretrained-checkpoint", pretrained, "--epochs", "3",
                                 "--micro-batch-size", "2", "--lr", "1e-3", "--seq-length",
                                 "32", "--distributed-backend", "gloo"], name="stsb")
    assert result["iteration"] == 6
    assert set(result["evaluations"][-1]["metrics"]["dev"]) == {"pearson", "spearman", "samples"}


def test_shape_flags_must_agree_with_the_checkpoint(pretrained):
    from megatron.training.arguments import ArgumentError
    from tasks.main import main

    argv = sst2_argv(pretrained, "--hidden-size", "128", "--num-layers", "2")
    with pytest.raises(ArgumentError, match=r"--hidden-size 128 disagrees with the checkpoint "
                                            r".* which has hidden_size 64"):
        main(argv)
    cased = str(ROOT / "data" / "bert-large-cased-vocab.txt")
    with pytest.raises(ArgumentError, match="has 28996 tokens; the checkpoint was trained "
                                            "with 30522"):
        main(sst2_argv(pretrained, "--vocab-file", cased, "--tokenizer-type",
                       "BertWordPieceCase"))


def test_epoch_order_does_not_depend_on_the_data_parallel_size():
    from tasks.finetune_utils import epoch_micro_batches

    def batches(dp, rank, start=0):
        return [b.tolist() for b in epoch_micro_batches(
            50, epoch=3, seed=7, global_batch_size=8, micro_batch_size=8 // dp // 2 or 1,
            data_parallel_rank=rank, data_parallel_size=dp, start_iteration=start)]

    whole = batches(1, 0)
    assert len(whole) == 2 * (50 // 8) and sorted(sum(whole, [])) == sorted(set(sum(whole, [])))
    for dp in (2, 4):
        ranks = [batches(dp, rank) for rank in range(dp)]
        per_step = len(ranks[0]) // (50 // 8)
        for step in range(50 // 8):  # each global batch holds the same samples
            merged = sum((r[step * per_step:(step + 1) * per_step] for r in ranks), [])
            assert sorted(sum(merged, [])) == sorted(sum(whole[2 * step:2 * step + 2], []))
    assert batches(1, 0, start=4) == whole[8:]  # resuming inside the epoch
    assert batches(1, 0) != [b.tolist() for b in epoch_micro_batches(
        50, epoch=4, seed=7, global_batch_size=8, micro_batch_size=4, data_parallel_rank=0,
        data_parallel_size=1)]


def test_dynamic_padding_changes_nothing_but_the_cost():
    import torch

    from megatron import mpu
    from megatron.model import BertConfig, MultipleChoice
    from megatron.tokenizer import build_tokenizer
    from tasks.race.data import build_race_dataset

    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=str(VOCAB))
    dataset = build_race_dataset([str(RACE / "dev" / "middle")], tokenizer, 256)
    mpu.model_parallel_manual_seed(1234)
    model = MultipleChoice(BertConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                      vocab_size=tokenizer.vocab_size,
                                      max_position_embeddings=256)).eval()
    full = dataset.batch([0, 1, 2], torch.device("cpu"), trim=False)
    trimmed = dataset.batch([0, 1, 2], torch.device("cpu"))
    assert full["text"].shape[-1] == 256 > trimmed["text"].shape[-1]
    assert trimmed["padding_mask"][..., -1].any()  # cut right after the longest sequence
    with torch.no_grad():
        outputs = [model(b["text"], b["padding_mask"], b["types"]) for b in (full, trimmed)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_task_flags_are_megatron_lms():
    from megatron.training.arguments import flag_names
    from tasks.arguments import add_task_args

    assert sorted(set(flag_names(add_task_args)) - set(flag_names())) == [
        "--epochs", "--eval-micro-batch-size", "--predict", "--pretrained-checkpoint",
        "--task", "--test-data", "--train-data", "--valid-data"]


@pytest.mark.parametrize("extra, message", [
    (["--train-iters", "10"], "--train-iters does not apply to finetuning: use --epochs"),
    (["--predict"], "--predict needs --test-data"),
    (["--data-path", "x"], "--data-path does not apply to finetuning"),
    (["--task", "GLUE"], "unknown --task 'GLUE'; choose one of MNLI, QQP, SST-2"),
])
def test_task_flag_errors(extra, message):
    from megatron.training.arguments import ArgumentError
    from tasks import arguments

    argv = ["--task", "SST-2", "--epochs", "1", "--train-data", "train.tsv", "--num-layers", "2",
            "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
            "--micro-batch-size", "2", "--lr", "1e-4", "--vocab-file", str(VOCAB), *extra]
    with pytest.raises(ArgumentError, match=message):
        arguments.validate_task_args(arguments.parse_task_args(argv))


def _cli(*argv):
    return subprocess.run([sys.executable, str(ROOT / "tasks" / "main.py"), *argv],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_command_line_errors_name_the_culprit_without_a_traceback(tmp_path):
    result = _cli("--task", "SST-3", "--epochs", "1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "tasks/main.py: error: unknown --task 'SST-3'; choose one of MNLI" in result.stderr
    bad = tmp_path / "train.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nno label\n")
    result = _cli("--task", "SST-2", "--train-data", str(bad), "--epochs", "1",
                  "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                  "--seq-length", "32", "--micro-batch-size", "2", "--lr", "1e-4",
                  "--vocab-file", str(VOCAB))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: {bad}:3: expected 2 tab-separated fields, found 1" in result.stderr
