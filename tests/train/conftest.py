import json
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer Llama (hidden 64) with a byte-level ChatML tokenizer, as an HF directory."""
    from dtm_fast.train.tiny import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "base", hidden_size=64, layers=2)


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory):
    """48 alpaca records of different lengths; the answers are learnable."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "portion.jsonl"
    with open(path, "w") as handle:
        for _ in range(48):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            handle.write(json.dumps({"instruction": f"What is {a} plus {b}?" + " Thanks." * rng.randint(0, 4),
                                     "output": f"{a} plus {b} is {a + b}."}) + "\n")
    return path


def make_config(model, data, output_dir, **overrides):
    from dtm_fast.train.config import TrainConfig

    values = dict(model=str(model), data=(str(data),), output_dir=str(output_dir), max_length=160, batch_size=4,
                  micro_batch_size=1, max_steps=4, learning_rate=1e-3, mixed_precision="fp32",
                  activation_checkpointing=False, seed=3)
    values.update(overrides)
    return TrainConfig(**values)


def run_trainer(config):
    """Build, train and export in this process; returns the Trainer for its in-memory model."""
    from dtm_fast import ui
    from dtm_fast.train.loop import Trainer
    from dtm_fast.train.parallel import init_runtime

    ui.configure(quiet=True)
    trainer = Trainer(config, init_runtime())
    trainer.build()
    result = trainer.train()
    trainer.export(result)
    return trainer, result


def tiny_args(model, data, output, *extra):
    """`dtm train` arguments for a one-step run of the tiny model (plus `extra`)."""
    return ["train", "--model", str(model), "--data", str(data), "--output_dir", str(output), "--max_steps", "1",
            "--batch_size", "2", "--max_length", "160", "--learning_rate", "1e-3", "--mixed_precision", "fp32",
            "--activation_checkpointing", "false", "--quiet", *map(str, extra)]


def dtm_train(capsys, *args):
    """Run `dtm ARGS` in this process; returns (exit code, stderr)."""
    from dtm_fast.cli import main

    capsys.readouterr()
    code = main(list(map(str, args)))
    return code, capsys.readouterr().err


def assert_one_line_error(code, stderr, expected):
    """Exit 1, exactly one `dtm train: error:` line holding `expected`, and no traceback."""
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines()
              if line.startswith(("dtm train: error", "dtm train: internal error", "dtm train: interrupted"))]
    assert len(errors) == 1 and errors[0].startswith("dtm train: error: "), stderr
    assert expected in errors[0], errors[0]
    return errors[0]


class PicklePayload:
    """Unpickling this creates the marker file: what a crafted checkpoint or model file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_pickle(marker):
    """The bytes of a pickle whose loading creates `marker`."""
    import pickle

    return pickle.dumps(PicklePayload(marker))
