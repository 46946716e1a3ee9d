"""``python -m fastattn_icl reproduce`` end to end on a tiny random Llama checkpoint (no download): every study runs
through the command line and lands in report.md / report.json / the figures; bad input stops it before any long
step. The real model's numbers are in tests/real_model and docs/reproduction/."""

import json
import subprocess
import sys

import pytest
import torch

from fastattn_icl.lab import TASKS, TaskDataError, load_model, load_task
from fastattn_icl.lab.reproduce import STUDIES, Plan, run

TINY = Plan(n_icl=6, n_flow=2, n_isolation=4, isolation_layers=1, reweight_train_per_class=1, reweight_epochs=1,
            n_reweight=4, n_compression=4, n_compression_timing=2, deep_thinking_steps=2, n_deep_thinking_dev=4,
            n_deep_thinking=4, n_eager=2, batch_size=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-layer Llama (GQA 4/2) with a byte-level BPE trained on the shipped data, saved as a checkpoint folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = []
    for name in TASKS:
        task = load_task(name)
        corpus += [task.template.format(x=e.text, y=task.label_words[e.label]) for e in task.split("train")] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1500, special_tokens=["<pad>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=fast.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_every_study_lands_in_the_report(checkpoint, tmp_path):
    report = run(model=str(checkpoint), tasks=["sst2", "trec"], out=tmp_path, plan=TINY, seed=1)
    for name in ("report.md", "report.json", "information_flow.png", "isolation.png", "correlation.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["meta"]["seed"] == 1 and saved["meta"]["machine"]["device"] == "cpu"
    assert saved["meta"]["model"]["layers"] == 2 and saved["meta"]["model"]["dtype"] == "float32"
    for name in ("sst2", "trec"):
        entry = saved["tasks"][name]
        assert set(STUDIES) | {"correlation", "task", "times"} <= set(entry)
        assert entry["icl"]["n"] == 6 and 0 <= entry["icl"]["k0"]["accuracy"] <= 1
        assert len(entry["flow"]["normalised_mean"]) == 2
        for row in entry["flow"]["normalised_mean"]:
            assert sum(row) == pytest.approx(1.0)
        assert len(entry["correlation"]["auc"]) == 2 and len(entry["correlation"]["R"]) == 2
        assert set(entry["compression"]["methods"]) == {"hidden_anchor", "hidden_random", "text_anchor"}
        assert entry["deep_thinking"]["chosen_step"] in (1, 2)
        for step in entry["eager"]["steps"].values():
            assert step["max_abs_difference"] < 1e-3  # fused and eager compute the same thing
    assert report["tasks"]["trec"]["task"]["num_classes"] == 6
    text = (tmp_path / "report.md").read_text()
    assert "## Findings (paper vs this model)" in text and "| trec |" in text


def test_the_command_line(checkpoint, tmp_path):
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "fastattn_icl", "reproduce", "--model", str(checkpoint),
                           "--tasks", "emoc", "--studies", "icl,flow", "--out", str(out), "--quick"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((out / "report.json").read_text())
    assert list(saved["tasks"]) == ["emoc"] and saved["meta"]["quick"] is True
    assert "reproduce" in done.stderr  # progress goes to stderr
    help_text = subprocess.run([sys.executable, "-m", "fastattn_icl", "reproduce", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    for flag in ("--model", "--tasks", "--out", "--quick", "--seed", "--studies"):
        assert flag in help_text


def test_bad_arguments_stop_before_the_model_loads(tmp_path):
    for argv, message in ((["--tasks", "sst5"], "unknown tasks"), (["--studies", "icl,fly"], "unknown studies"),
                          (["--model", str(tmp_path / "none")], "no model at")):
        done = subprocess.run([sys.executable, "-m", "fastattn_icl", "reproduce", *argv, "--out", str(tmp_path)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr[-2000:])


def test_a_label_word_that_is_not_one_token_is_named(checkpoint):
    lm = load_model(str(checkpoint))
    task = load_task("sst2")
    object.__setattr__(task, "label_words", ("negative", "xqzvbnmwk"))
    with pytest.raises(TaskDataError, match="label word 'xqzvbnmwk' is not a single token"):
        task.check_tokenizer(lm.tokenizer)


def test_a_prompt_longer_than_the_context_stops_the_run(checkpoint, tmp_path):
    small = tmp_path / "small"
    lm = load_model(str(checkpoint))
    lm.model.config.max_position_embeddings = 40
    lm.model.save_pretrained(small)
    lm.tokenizer.save_pretrained(small)
    with pytest.raises(ValueError, match="more than the model's context of 40"):
        run(model=str(small), tasks=["agnews"], out=tmp_path / "out", plan=TINY)
    assert not (tmp_path / "out" / "report.json").exists()  # nothing ran
