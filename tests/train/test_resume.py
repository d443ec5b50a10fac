"""A run resumed from a checkpoint continues the uninterrupted run's loss curve exactly."""

import json
import shutil

from dtm_fast.train.checkpoint import complete_checkpoints
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


# ---- issue 8.2: a rerun continues by itself; checkpoints go only when asked ----------------------------
RESUMABLE = ("--max_steps", "6", "--checkpoint_every", "3", "--batch_size", "4", "--seed", "3",
             "--finetuning", "lora", "--lora_r", "4", "--lora_dropout", "0.2", "--lora_target_modules", "[q_proj,up_proj]",
             "--learning_rate", "5e-3", "--warmup_ratio", "0.2")


def interrupt_at_step(monkeypatch, step_index, signal_name=None):
    """Make the training step with this 0-based index be interrupted: by a real signal, or as
    Ctrl-C does under Python's default SIGINT handler (which another test may have replaced)."""
    import os
    import signal

    from dtm_fast.train.loop import Trainer

    original = Trainer.train_step

    def step(self, step):
        if step == step_index:
            if signal_name is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), getattr(signal, signal_name))
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", step)
    return original


def test_interrupted_run_continues_when_rerun(tiny_model, arithmetic_data, tmp_path, capsys, monkeypatch):
    from tests.train.conftest import dtm_train, tiny_args

    reference = tmp_path / "reference"
    assert dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, reference, *RESUMABLE))[0] == 0
    expected = losses(reference)

    output = tmp_path / "sub-0"
    original = interrupt_at_step(monkeypatch, 4, "SIGTERM")  # SIGTERM during step 5: checkpoint 3 exists
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE))
    assert code == 130, err
    assert (f"interrupted; the last checkpoint (step 3) is kept in {tmp_path / 'sub-0.checkpoints'}; rerun the same "
            "command to continue from it") in err
    assert not output.exists()

    from dtm_fast.train.loop import Trainer

    monkeypatch.setattr(Trainer, "train_step", original)
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE))  # the same command
    assert code == 0, err
    assert "continuing from the checkpoint of step 3" in err
    assert losses(output) == expected  # bit-identical to the uninterrupted run
    assert [s for s, _ in complete_checkpoints(tmp_path / "sub-0.checkpoints")] == [3]  # nothing deleted


def test_ctrl_c_before_any_checkpoint_says_a_rerun_starts_over(tiny_model, arithmetic_data, tmp_path, capsys,
                                                             monkeypatch):
    from tests.train.conftest import dtm_train, tiny_args

    interrupt_at_step(monkeypatch, 1)
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, tmp_path / "out", *RESUMABLE))
    assert code == 130
    assert "interrupted; no checkpoint was written yet (the first comes at step 3); rerunning the same command " \
           "starts from step 0" in err


def test_checkpoints_of_other_settings_are_refused_not_deleted(tiny_model, arithmetic_data, tmp_path, capsys):
    from tests.train.conftest import assert_one_line_error, dtm_train, tiny_args

    output = tmp_path / "sub-0"
    checkpoints = tmp_path / "sub-0.checkpoints"
    assert dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE))[0] == 0
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [3]
    (checkpoints / "my-notes.txt").write_text("keep me")

    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE, "--learning_rate", "1e-2"))
    assert_one_line_error(code, err, "holds checkpoints (newest: step 3) of a run with other settings or inputs: "
                                     "learning_rate 0.005 -> 0.01. Rerun with the settings")
    assert "pass --fresh to delete them" in err
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [3]

    other_data = tmp_path / "other.jsonl"
    other_data.write_text(arithmetic_data.read_text().replace("plus", "and"))
    code, err = dtm_train(capsys, *tiny_args(tiny_model, other_data, output, *RESUMABLE))
    assert_one_line_error(code, err, f"data {other_data} has other content")

    # asked for: --fresh deletes dtm's checkpoints (only them) and starts at step 0
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE, "--learning_rate", "1e-2",
                                             "--fresh"))
    assert code == 0, err
    assert "fresh start: removed the checkpoints of steps 3" in err
    assert (checkpoints / "my-notes.txt").read_text() == "keep me"
    assert [s for s, _ in complete_checkpoints(checkpoints)] == [3]  # the new run's own
    assert len(losses(output)) == 6


def test_resume_true_without_a_checkpoint_is_an_error(tiny_model, arithmetic_data, tmp_path, capsys):
    from tests.train.conftest import assert_one_line_error, dtm_train, tiny_args

    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, tmp_path / "out", "--resume"))
    assert_one_line_error(code, err, "resume: no complete checkpoint in")


# ---- issue 8.3: nothing in a checkpoint is ever unpickled ----------------------------------------------
def test_malicious_pickles_in_a_checkpoint_never_run(tiny_model, arithmetic_data, tmp_path, capsys):
    import pickle

    from tests.train.conftest import assert_one_line_error, dtm_train, malicious_pickle, tiny_args

    marker = tmp_path / "pwned"
    payload = malicious_pickle(marker)
    pickle.loads(payload)  # the control: loading it does create the marker
    assert marker.exists()
    marker.unlink()

    output = tmp_path / "sub-0"
    checkpoints = tmp_path / "sub-0.checkpoints"
    assert dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE))[0] == 0
    (step_dir,) = [path for _, path in complete_checkpoints(checkpoints)]
    originals = {path.name: path.read_bytes() for path in step_dir.iterdir()}
    assert {"trainer.json", "rank-00000-of-00001.safetensors"} <= set(originals)

    # 1: every file of the checkpoint is the pickle, plus the files other formats would unpickle
    for name in [*originals, ".metadata", "__0_0.distcp", "trainer-rank0.pt", "optimizer.pt", "rng_state.pth"]:
        (step_dir / name).write_bytes(payload)
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE))
    assert_one_line_error(code, err, "trainer.json: not a dtm train checkpoint record")
    assert not marker.exists()

    # 2: a valid record, but the tensor file is the pickle
    (step_dir / "trainer.json").write_bytes(originals["trainer.json"])
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE))
    assert_one_line_error(code, err, "rank-00000-of-00001.safetensors: corrupt safetensors header")
    assert not marker.exists()

    # 3: the real files back, the pickles of other formats beside them: ignored, and the run continues
    (step_dir / "rank-00000-of-00001.safetensors").write_bytes(originals["rank-00000-of-00001.safetensors"])
    code, err = dtm_train(capsys, *tiny_args(tiny_model, arithmetic_data, output, *RESUMABLE))
    assert code == 0, err
    assert "continuing from the checkpoint of step 3" in err
    assert not marker.exists()


def test_no_pickle_loading_anywhere_in_the_trainer():
    """The source guard: no unpickling in the trainer and the data code. (In the whole package the
    one use is the merger's opt-in `--allow-pickle`, which loads with weights_only=True.)"""
    from pathlib import Path

    import dtm_fast

    root = Path(dtm_fast.__file__).parent
    offenders = []
    for path in [*(root / "train").rglob("*.py"), *(root / "data").rglob("*.py")]:
        text = path.read_text()
        for needle in ("torch.load(", "pickle.load", "import pickle", "weights_only=False", "import torch.distributed.checkpoint",
                       "from torch.distributed.checkpoint import", "dcp.load"):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
    assert not offenders, offenders
