"""Checkpoints: Megatron's layout and keys, atomic saves, clear errors on bad checkpoints."""

import json
import logging
import os

import pytest
import torch

from megatron.model import BertConfig, BertModel
from megatron.training import checkpointing
from megatron.training.checkpointing import CheckpointError, load_checkpoint, save_checkpoint
from megatron.training.optimizer import MegatronOptimizer
from megatron.training.optimizer_param_scheduler import OptimizerParamScheduler


def _setup(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=100,
                        max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
    model = BertModel(config)
    optimizer = MegatronOptimizer(model, lr=1e-2)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=1e-2, min_lr=0.0, lr_warmup_steps=2, lr_decay_steps=10,
        lr_decay_style="linear", start_wd=0.01, end_wd=0.01, wd_incr_steps=10)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler):
    ids = torch.randint(0, 100, (2, 8))
    optimizer.zero_grad()
    lm, binary = model(ids, torch.ones(2, 8), lm_labels=ids, loss_mask=torch.ones(2, 8))
    (lm.mean() + binary.sum()).backward()
    optimizer.step()
    scheduler.step(increment=1)


def test_layout_keys_and_round_trip(tmp_path):
    model, optimizer, scheduler = _setup()
    _step(model, optimizer, scheduler)
    directory = save_checkpoint(7, model, optimizer, scheduler, save_dir=str(tmp_path))
    assert directory == str(tmp_path / "iter_0000007")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "7"
    assert sorted(os.listdir(tmp_path)) == ["iter_0000007", "latest_checkpointed_iteration.txt"]
    state = torch.load(tmp_path / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=False)
    assert set(state) == {"args", "checkpoint_version", "iteration", "model", "optimizer",
                          "opt_param_scheduler", "rng_state"}
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 7
    assert set(state["model"]) == {"language_model", "lm_head", "binary_head"}
    assert set(state["model"]["language_model"]) == {"embedding", "encoder", "pooler"}
    assert "layers.0.self_attention.query_key_value.weight" in \
        state["model"]["language_model"]["encoder"]
    assert "word_embeddings" in state["model"]["language_model"]["embedding"]

    restored, optimizer2, scheduler2 = _setup(seed=1)
    iteration, _ = load_checkpoint(restored, optimizer2, scheduler2, load_dir=str(tmp_path))
    assert iteration == 7
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.equal(a, b), name
    assert scheduler2.num_steps == scheduler.num_steps
    # The restored optimizer takes exactly the step the original one takes.
    rng = torch.get_rng_state()
    _step(model, optimizer, scheduler)
    torch.set_rng_state(rng)
    _step(restored, optimizer2, scheduler2)
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("failure", ["second_file", "before_publish"])
def test_an_interrupted_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    model, optimizer, scheduler = _setup()
    save_checkpoint(1, model, optimizer, scheduler, save_dir=str(tmp_path))
    _step(model, optimizer, scheduler)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    if failure == "second_file":
        monkeypatch.setattr(checkpointing.torch, "save", crash)
    else:
        monkeypatch.setattr(checkpointing, "_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(2, model, optimizer, scheduler, save_dir=str(tmp_path))
    monkeypatch.undo()
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (tmp_path / "iter_0000002").exists()
    fresh, opt, sched = _setup(seed=3)
    assert load_checkpoint(fresh, opt, sched, load_dir=str(tmp_path))[0] == 1
    # The next save clears the leftover staging directory and succeeds.
    save_checkpoint(2, model, optimizer, scheduler, save_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", "iter_0000002",
                                            "latest_checkpointed_iteration.txt"]


def test_saving_the_same_iteration_twice_replaces_it(tmp_path):
    model, optimizer, scheduler = _setup()
    save_checkpoint(3, model, optimizer, scheduler, save_dir=str(tmp_path))
    _step(model, optimizer, scheduler)
    save_checkpoint(3, model, optimizer, scheduler, save_dir=str(tmp_path))
    fresh, _, _ = _setup(seed=5)
    load_checkpoint(fresh, load_dir=str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000003", "latest_checkpointed_iteration.txt"]


def test_no_tracker_starts_fresh_with_a_message(tmp_path, caplog):
    model, optimizer, scheduler = _setup()
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(model, optimizer, scheduler, load_dir=str(tmp_path)) == (0, None)
    assert "starting from scratch" in caplog.text


def test_bad_checkpoints_give_errors_naming_the_file(tmp_path):
    model, optimizer, scheduler = _setup()
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("12")
    with pytest.raises(CheckpointError, match="points at 12, but .*iter_0000012 does not exist"):
        load_checkpoint(model, load_dir=str(tmp_path))
    tracker.write_text("twelve")
    with pytest.raises(CheckpointError, match="expected an iteration number or 'release'"):
        load_checkpoint(model, load_dir=str(tmp_path))

    save_checkpoint(4, model, optimizer, scheduler, save_dir=str(tmp_path))
    path = tmp_path / "iter_0000004" / "mp_rank_00" / "model_optim_rng.pt"
    data = path.read_bytes()
    path.write_bytes(data[:1000])  # truncated
    with pytest.raises(CheckpointError, match=f"{path} is truncated or corrupt: 1000 bytes, "
                                              f"{len(data)} when saved"):
        load_checkpoint(model, load_dir=str(tmp_path))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # same size, one byte changed
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match=f"{path} is corrupt: its SHA-256 differs"):
        load_checkpoint(model, load_dir=str(tmp_path))
    # Without the integrity record (Megatron-LM's own checkpoints), torch.load still fails
    # clearly on a truncated file.
    (tmp_path / "iter_0000004" / "checkpoint_integrity.json").unlink()
    path.write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint file {path}"):
        load_checkpoint(model, load_dir=str(tmp_path))
    path.unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint file {path} does not exist"):
        load_checkpoint(model, load_dir=str(tmp_path))


def test_another_tensor_parallel_size_points_to_the_resharding_tool(tmp_path):
    model, optimizer, scheduler = _setup()
    save_checkpoint(2, model, optimizer, scheduler, save_dir=str(tmp_path))
    os.makedirs(tmp_path / "iter_0000002" / "mp_rank_01")
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(model, load_dir=str(tmp_path))
    assert "tensor-model-parallel size 2; this run uses 1" in str(error.value)
    assert (f"python tools/checkpoint_util.py --load-dir {tmp_path} --save-dir {tmp_path}_tp1 "
            "--target-tensor-parallel-size 1") in str(error.value)


def test_finetune_release_and_missing_optimizer_state(tmp_path):
    model, optimizer, scheduler = _setup()
    _step(model, optimizer, scheduler)
    save_checkpoint(5, model, optimizer, scheduler, save_dir=str(tmp_path), no_save_optim=True,
                    no_save_rng=True)
    fresh, opt, sched = _setup(seed=9)
    with pytest.raises(CheckpointError, match="no optimizer state .* --no-load-optim"):
        load_checkpoint(fresh, opt, sched, load_dir=str(tmp_path))
    with pytest.raises(CheckpointError, match="no rng_state .* --no-load-rng"):
        load_checkpoint(fresh, opt, sched, load_dir=str(tmp_path), no_load_optim=True)
    assert load_checkpoint(fresh, opt, sched, load_dir=str(tmp_path), finetune=True)[0] == 0
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    # NVIDIA's released checkpoints say "release" in the tracker and sit in release/.
    os.rename(tmp_path / "iter_0000005", tmp_path / "release")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    assert load_checkpoint(_setup(seed=2)[0], load_dir=str(tmp_path))[0] == 0


def test_integrity_record_ckpt_step_and_keep_last_n(tmp_path):
    model, optimizer, scheduler = _setup()
    weights = {}
    for iteration in (1, 2, 3):
        _step(model, optimizer, scheduler)
        save_checkpoint(iteration, model, optimizer, scheduler, save_dir=str(tmp_path))
        weights[iteration] = [p.detach().clone() for p in model.parameters()]
    record = json.loads((tmp_path / "iter_0000003" / "checkpoint_integrity.json").read_text())
    shard = tmp_path / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt"
    assert record["iteration"] == 3 and record["tensor_model_parallel_size"] == 1
    assert record["files"]["mp_rank_00/model_optim_rng.pt"]["bytes"] == shard.stat().st_size
    # --ckpt-step: an earlier iteration than the tracker's, or a clear error.
    fresh, opt, sched = _setup(seed=4)
    assert load_checkpoint(fresh, opt, sched, load_dir=str(tmp_path), iteration=2)[0] == 2
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), weights[2]))
    with pytest.raises(CheckpointError, match=r"--ckpt-step 7: .*iter_0000007 does not exist "
                                              r"\(checkpoints in .*: 1, 2, 3\)"):
        load_checkpoint(fresh, load_dir=str(tmp_path), iteration=7)
    # keep_last_n deletes the oldest only after the new one is complete.
    _step(model, optimizer, scheduler)
    save_checkpoint(4, model, optimizer, scheduler, save_dir=str(tmp_path), keep_last_n=2)
    assert checkpointing.list_checkpoints(str(tmp_path)) == [3, 4]
    monkeypatched = {"called": False}

    def fail(*args, **kwargs):
        monkeypatched["called"] = True
        raise KeyboardInterrupt("killed while publishing")

    original = checkpointing._publish
    checkpointing._publish = fail
    try:
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(5, model, optimizer, scheduler, save_dir=str(tmp_path), keep_last_n=1)
    finally:
        checkpointing._publish = original
    assert monkeypatched["called"] and checkpointing.list_checkpoints(str(tmp_path)) == [3, 4]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "4"


def test_an_interrupted_resave_of_the_same_iteration_is_recovered(tmp_path):
    model, optimizer, scheduler = _setup()
    save_checkpoint(6, model, optimizer, scheduler, save_dir=str(tmp_path))
    # The window between "final -> final.old" and "staging -> final" of a re-save.
    os.replace(tmp_path / "iter_0000006", tmp_path / "iter_0000006.old")
    fresh, opt, sched = _setup(seed=8)
    assert load_checkpoint(fresh, opt, sched, load_dir=str(tmp_path))[0] == 6
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
