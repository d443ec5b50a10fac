"""A run resumed from a checkpoint continues the uninterrupted run's loss curve exactly."""

import json
import shutil

from tests.train.conftest import make_config, run_trainer


def losses(output_dir):
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_losses(tiny_model, arithmetic_data, tmp_path):
    # LoRA with dropout: the random streams must be restored too, not only weights and optimizer
    common = dict(finetuning="lora", lora_r=4, lora_dropout=0.2, lora_target_modules=("q_proj", "up_proj"),
                  max_steps=6, checkpoint_every=3, learning_rate=5e-3, warmup_ratio=0.2)
    uninterrupted_dir = tmp_path / "full"
    run_trainer(make_config(tiny_model, arithmetic_data, uninterrupted_dir, **common))
    expected = losses(uninterrupted_dir)
    assert len(expected) == 6

    # a second run that only has the step-3 checkpoint, as if the first had crashed after step 4
    resumed_dir = tmp_path / "resumed"
    checkpoint_dir = tmp_path / "resumed.checkpoints"
    checkpoint_dir.mkdir()
    shutil.copytree(tmp_path / "full.checkpoints" / "step-00000003", checkpoint_dir / "step-00000003")
    (checkpoint_dir / "metrics.jsonl").write_text(
        (tmp_path / "full.checkpoints" / "metrics.jsonl").read_text())  # holds steps 1-6; 4-6 get cut
    trainer, result = run_trainer(make_config(tiny_model, arithmetic_data, resumed_dir, resume=True, **common))
    assert result.losses == expected[3:]  # bit-identical
    assert losses(resumed_dir) == expected
    # and not trivially so: a fresh start with another seed gives another curve
    other, _ = run_trainer(make_config(tiny_model, arithmetic_data, tmp_path / "other", seed=11, **common))
    assert losses(tmp_path / "other") != expected


def test_an_unfinished_checkpoint_is_never_loaded(tiny_model, arithmetic_data, tmp_path):
    common = dict(max_steps=4, checkpoint_every=2)
    run_trainer(make_config(tiny_model, arithmetic_data, tmp_path / "run", **common))
    checkpoints = tmp_path / "run.checkpoints"
    # simulate a crash while writing step 4: a partial directory the loader must skip
    (checkpoints / "step-00000004.tmp").mkdir()
    from dtm_fast.train.checkpoint import complete_checkpoints

    assert [step for step, _ in complete_checkpoints(checkpoints)] == [2]
