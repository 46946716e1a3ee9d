"""scripts/train_retuning.py: the loss mask, the length batches, a few steps of a tiny model that save and load."""

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("safetensors")

from fastattn_icl.methods.retuning.tokenizer import char_tokenizer  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "train_retuning.py"


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_retuning", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_mask_covers_exactly_output_and_eos(train_script):
    tok = char_tokenizer()
    pair = {"input": "15 + 02\nSolution: ", "output": "Call: 5 + 2\n"}
    ids, labels = train_script.encode_pair(tok, pair)
    n_in, n_out = len(pair["input"]), len(pair["output"])
    assert len(ids) == len(labels) == n_in + n_out + 1
    assert tok.decode(ids[:-1]) == pair["input"] + pair["output"]
    assert ids[-1] == tok.eos_token_id and tok.bos_token_id not in ids
    assert labels[:n_in] == [train_script.IGNORE_INDEX] * n_in
    assert labels[n_in:] == ids[n_in:]
    assert tok.decode(labels[n_in:-1]) == pair["output"]

    batch = train_script.collate([(ids, labels), ([5, 6], [-100, 6])], tok.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, len(ids))
    assert int((batch["labels"][0] != -100).sum()) == n_out + 1
    assert batch["labels"][1].tolist() == [-100, 6] + [-100] * (len(ids) - 2)
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * (len(ids) - 2)


def test_length_batches_keep_the_token_budget_and_every_sequence(train_script):
    rng = random.Random(0)
    seqs = [([1] * n, [1] * n) for n in (rng.randint(3, 40) for _ in range(200))]
    batches = train_script.length_batches(seqs, 128, random.Random(1))
    assert sum(len(b) for b in batches) == len(seqs)
    for b in batches:
        assert len(b) * max(len(ids) for ids, _ in b) <= 128


@pytest.mark.parametrize("fmt", ["retuning", "baseline"])
def test_a_few_steps_write_a_loadable_model(train_script, tmp_path, fmt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    try:
        rc = train_script.main(["--format", fmt, "--out", str(tmp_path), "--max-steps", "3", "--d-model", "32",
                                "--layers", "1", "--heads", "2", "--batch-tokens", "512", "--chunk-problems", "20",
                                "--warmup", "2", "--lengths", "1", "3"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert (tmp_path / "model.safetensors").exists()
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert log["steps"] == 3 and log["format"] == fmt and log["parameters"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert sum(p.numel() for p in model.parameters()) == log["parameters"]
    enc = tok(["1 + 2\nSolution: "], add_special_tokens=False, return_tensors="pt")
    assert model(**enc).logits.shape == (1, enc["input_ids"].shape[1], len(tok))


@pytest.mark.parametrize("bad", [["--minutes", "0"], ["--lengths", "5", "2"], ["--d-model", "30", "--heads", "4"],
                                 ["--format", "cot"]])
def test_bad_arguments_exit_with_a_message(train_script, bad, tmp_path, capsys):
    argv = ["--format", "retuning", "--out", str(tmp_path)]
    argv = argv + bad if bad[0] != "--format" else bad + ["--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        train_script.parse_args(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_eval_script_writes_table_json_and_plot(train_script, tmp_path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location("eval_retuning", SCRIPT.parent / "eval_retuning.py")
    eval_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_script)
    threads = torch.get_num_threads()
    try:
        for fmt in ("retuning", "scratchpad", "baseline"):
            train_script.main(["--format", fmt, "--out", str(tmp_path / "models" / fmt), "--max-steps", "1",
                               "--d-model", "32", "--layers", "1", "--heads", "2", "--batch-tokens", "256",
                               "--chunk-problems", "5", "--lengths", "1", "2"])
        rc = eval_script.main(["--models", str(tmp_path / "models"), "--out", str(tmp_path / "out"),
                               "--lengths", "1", "2", "--per-length", "2", "--slack", "2"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    results = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert results["trained_lengths"] == [1, 2]
    for fmt in ("retuning", "scratchpad", "baseline"):
        assert set(results["accuracy"][fmt]) == {"1", "2"}
        assert all(0.0 <= a <= 1.0 for a in results["accuracy"][fmt].values())
    assert "| 2 |" in (tmp_path / "out" / "eval_results.md").read_text()
    assert (tmp_path / "out" / "accuracy_vs_length.png").stat().st_size > 0
