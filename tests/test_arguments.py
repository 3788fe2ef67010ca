"""The command line of pretrain_bert.py: a frozen set of Megatron-LM flags, validated."""

import pytest

from megatron.training import arguments
from tests.training_utils import ROOT, VOCAB

FROZEN = ROOT / "tests" / "assets" / "pretrain_bert_flags.txt"

ISSUE_FLAGS = """--tensor-model-parallel-size --num-layers --hidden-size --num-attention-heads
--ffn-hidden-size --seq-length --max-position-embeddings --micro-batch-size --global-batch-size
--train-iters --train-samples --lr --min-lr --lr-decay-style --lr-decay-iters
--lr-warmup-fraction --lr-warmup-iters --weight-decay --clip-grad --adam-beta1 --adam-beta2
--adam-eps --hidden-dropout --attention-dropout --data-path --split --vocab-file
--tokenizer-type --save --load --save-interval --eval-interval --eval-iters --log-interval
--seed --fp16 --bf16 --loss-scale --initial-loss-scale --min-loss-scale --loss-scale-window
--hysteresis --recompute-activations --checkpoint-activations --bert-no-binary-head
--distributed-backend --distributed-timeout-minutes --tensorboard-dir --no-load-optim
--no-load-rng --finetune --exit-interval --exit-duration-in-mins --local-rank
--local_rank""".split()


def test_the_flag_set_is_frozen():
    # Adding or removing a flag is a change to the user interface: update the asset on purpose.
    assert arguments.flag_names() == FROZEN.read_text().split()


def test_every_flag_the_issue_names_exists():
    assert set(ISSUE_FLAGS) <= set(arguments.flag_names())


def _argv(*extra):
    return ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--seq-length", "32", "--micro-batch-size", "2", "--train-iters", "10",
            "--lr", "1e-3", "--data-path", "some/prefix", "--vocab-file", str(VOCAB), *extra]


def test_defaults_and_derived_values():
    args = arguments.parse_args(_argv("--global-batch-size", "8"), world_size=2)
    assert args.data_parallel_size == 2 and args.num_micro_batches == 2
    assert args.ffn_hidden_size == 256 and args.max_position_embeddings == 32
    assert args.bert_binary_head and args.lr_decay_style == "linear"
    assert args.params_dtype == "float32" and args.split == "969, 30, 1"
    args = arguments.parse_args(_argv("--checkpoint-activations", "--local_rank", "3",
                                      "--bf16"), world_size=1)
    assert args.recompute_activations and args.params_dtype == "bfloat16"
    assert args.global_batch_size == 2


def test_train_samples_give_iterations():
    argv = [a for a in _argv() if a not in ("--train-iters", "10")]
    args = arguments.parse_args(argv + ["--train-samples", "100", "--global-batch-size", "4"],
                                world_size=1)
    assert args.train_iters == 25


def test_several_datasets_take_weight_prefix_pairs():
    args = arguments.parse_args(_argv("--data-path", "0.3", "a", "0.7", "b"), world_size=1)
    assert args.data_path == ["0.3", "a", "0.7", "b"]


@pytest.mark.parametrize("extra, world_size, message", [
    (["--hidden-size", "66"], 1, "--hidden-size 66 is not divisible by --num-attention-heads 4"),
    (["--tensor-model-parallel-size", "3"], 3,
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--tensor-model-parallel-size", "2"], 3,
     "world size 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--global-batch-size", "6"], 2,
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 x data-parallel size 2"),
    (["--train-samples", "100"], 1, "give exactly one of --train-iters and --train-samples"),
    (["--fp16", "--bf16"], 1, "--fp16 and --bf16 cannot both be given"),
    (["--min-lr", "0.1"], 1, "--min-lr 0.1 is larger than --lr 0.001"),
    (["--lr-warmup-fraction", "1.5"], 1, "--lr-warmup-fraction must be in [0, 1], got 1.5"),
    (["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"], 1,
     "give only one of --lr-warmup-fraction"),
    (["--lr-decay-samples", "5"], 1, "--lr-decay-samples does not go with --train-iters"),
    (["--lr-warmup-iters", "11"], 1, "--lr-warmup-iters 11 is longer than --train-iters 10"),
    (["--lr-warmup-iters", "6", "--lr-decay-iters", "5"], 1,
     "--lr-warmup-iters 6 is longer than --lr-decay-iters 5"),
    (["--hidden-dropout", "1.0"], 1, "--hidden-dropout must be in [0, 1), got 1.0"),
    (["--seq-length", "600", "--max-position-embeddings", "512"], 1,
     "--seq-length 600 is longer than --max-position-embeddings 512"),
    (["--micro-batch-size", "0"], 1, "--micro-batch-size must be > 0, got 0"),
    (["--vocab-file", "/no/such/vocab.txt"], 1, "--vocab-file /no/such/vocab.txt does not exist"),
    (["--data-path", "0.5", "a", "b"], 1, "takes weight-prefix pairs, got 3 values"),
    (["--data-path", "a", "b"], 1, "--data-path weight 'a' is not a number"),
    (["--save-interval", "5"], 1, "--save-interval needs --save DIR"),
    (["--min-loss-scale", "8", "--initial-loss-scale", "4"], 1,
     "--min-loss-scale 8.0 is larger than --initial-loss-scale 4.0"),
])
def test_bad_values_raise_errors_naming_them(extra, world_size, message):
    with pytest.raises(arguments.ArgumentError) as error:
        arguments.parse_args(_argv(*extra), world_size=world_size)
    assert message in str(error.value)


def test_missing_required_flags_are_listed():
    with pytest.raises(arguments.ArgumentError, match="--num-layers, --hidden-size"):
        arguments.parse_args(["--lr", "1e-3"], world_size=1)
    argv = [a for a in _argv() if a not in ("--data-path", "some/prefix")]
    with pytest.raises(arguments.ArgumentError, match="--data-path PREFIX"):
        arguments.parse_args(argv, world_size=1)


def test_unknown_flags_and_bad_env_fail():
    with pytest.raises(SystemExit):
        arguments.parse_args(_argv("--no-such-flag"), world_size=1)
    with pytest.raises(arguments.ArgumentError, match="WORLD_SIZE='two'"):
        arguments.world_from_env({"WORLD_SIZE": "two"})
    assert arguments.world_from_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}) == {
        "rank": 3, "world_size": 8, "local_rank": 1}


def test_bert_config_from_args_pads_the_vocabulary_per_tensor_parallel_size():
    args = arguments.parse_args(_argv("--tensor-model-parallel-size", "2"), world_size=2)
    config = arguments.bert_config_from_args(args, 30522)
    assert config.padded_vocab_size == 30720 and config.tensor_model_parallel_size == 2
    assert config.layernorm_epsilon == 1e-12 and config.add_binary_head
