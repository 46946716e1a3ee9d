"""The Re-Tuning driver: KV reuse and batching change nothing but the work done.

A random-weight model does not recurse, so the model here is :class:`Scripted`: a real tiny Llama (its logits, its
KV cache, through the ``"fastattn_icl"`` seam) whose greedy token is set by a script of the context's text: the
script's token gets the largest logit plus one, every other logit is the Llama's. The script reads the context from
the cache itself (one extra cache layer holds the token ids), so the driver's padding, row splitting and KV reuse
decide both what the Llama computes and what the script sees. Two test-local tasks drive it: ``FakeAddition`` (the
Re-Tuning addition format, one call per level) and ``FakeSum`` (two calls per level, finished after the second
return); certain prompts make the script misbehave, one failure mode each.

The oracle is :func:`reprefill_generate` (one problem at a time, the whole text prefilled again after every
return): texts, trees, failures equal; every step's logits by the tolerance rule of ``fastattn_icl.testing``
(the re-prefill loop on an eager float32 twin as the same-dtype reference, on a float64 twin as the oracle).
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

import fastattn_icl
from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache
from fastattn_icl.methods.retuning import (
    char_tokenizer,
    get_task,
    problem_pairs,
    reprefill_generate,
    retune_generate,
    top_prompt,
)
from fastattn_icl.methods.retuning import driver as driver_module
from fastattn_icl.methods.retuning.driver import sliding_window
from fastattn_icl.testing import check_close
from tests.models import DEVICES, float64_twin

TOKENIZER = char_tokenizer()
EOS = TOKENIZER.eos_token_id


# -- test doubles: two tasks and a model that follows a script ----------------------------------------------------


class FakeAddition:
    """Re-Tuning's addition format: 'A + B\\nSolution: ', 'Call: A[1:] + B[1:]\\n', 'Carry c, Output digits'."""

    name = "fake_addition"

    def check_prompt(self, prompt):
        if not re.fullmatch(r"\d+ \+ \d+\nSolution: ", prompt):
            raise ValueError(f"not 'A + B\\nSolution: ': {prompt!r}")

    def child_prompt(self, call):
        if not re.fullmatch(r"\d+ \+ \d+", call):
            raise ValueError("expected 'A + B'")
        return call + "\nSolution: "

    def return_text(self, answer):
        return "Return: " + answer + "\nAnswer: "

    def answer_of(self, text):
        marker = "Answer: " if "Answer: " in text else "Solution: "
        return text.rsplit(marker, 1)[1]

    def finished_after_return(self, text, n_calls):
        return False

    def final_answer(self, text):
        m = re.fullmatch(r"Carry ([01]), Output (\d+)", self.answer_of(text))
        return None if m is None else str(int(m[1] + m[2]))

    def ground_truth(self, prompt):
        a, b = prompt.split("\n")[0].split(" + ")
        return str(int(a) + int(b))


class FakeSum:
    """'S x1 .. xn\\nSolution: ': n <= 2 answers 'Total: s'; else 'Call: S <first ceil(n/2)>\\n', 'Return: x\\n',
    'Call: S x <rest>\\n', and the context is finished after that second return: its answer is the last return."""

    name = "fake_sum"

    def check_prompt(self, prompt):
        if not re.fullmatch(r"S( \d+)+\nSolution: ", prompt):
            raise ValueError(f"not 'S x1 .. xn\\nSolution: ': {prompt!r}")

    def child_prompt(self, call):
        if not re.fullmatch(r"S( \d+)+", call):
            raise ValueError("expected 'S x1 .. xn'")
        return call + "\nSolution: "

    def return_text(self, answer):
        return "Return: " + answer + "\n"

    def answer_of(self, text):
        at = max(text.rfind("Total: ") + len("Total: "), text.rfind("Return: ") + len("Return: "))
        value = text[at:].split("\n")[0]
        if at < len("Total: ") or not value.isdigit():
            raise ValueError(f"no 'Total: <int>' or 'Return: <int>' at the end of {text[-20:]!r}")
        return value

    def finished_after_return(self, text, n_calls):
        return n_calls == 2

    def final_answer(self, text):
        try:
            return self.answer_of(text)
        except ValueError:
            return None

    def ground_truth(self, prompt):
        return str(sum(int(x) for x in prompt.split("\n")[0].split()[1:]))


def _addition_output(a: str, b: str, out: str) -> str | None:
    """The whole output the script writes after 'a + b\\nSolution: ', given what is there (None: forever '6')."""
    if a == "55":
        return "Call: 5 + x\n"  # a call the task cannot parse
    if a == "66":
        return None  # never stops
    if len(a) == 1:
        s = int(a) + int(b)
        return f"Carry {s // 10}, Output {s % 10}"
    target = f"Call: {a[1:]} + {b[1:]}\n"
    m = re.search(r"Return: Carry (\d), Output (\d+)\nAnswer: ", out)
    if m:
        s = int(a[0]) + int(b[0]) + int(m[1])
        digits = "?" + m[2] if a == "77" else f"{s % 10}{m[2]}"  # '77': a final answer that does not parse
        target += m[0] + f"Carry {s // 10}, Output {digits}"
    return target


def _sum_output(nums: list[str], out: str) -> str:
    if nums == ["8", "8"]:
        return "oops"  # an answer answer_of rejects
    if len(nums) <= 2:
        return f"Total: {sum(map(int, nums))}"
    k = (len(nums) + 1) // 2
    target = "Call: S " + " ".join(nums[:k]) + "\n"
    m = re.search(r"Return: (\d+)\n", out)
    if m:
        target += m[0] + "Call: S " + " ".join([m[1], *nums[k:]]) + "\n"
    return target


def script(text: str) -> str | None:
    """The next character of a context, or None for EOS."""
    head, out = text.split("\nSolution: ", 1)
    if head.startswith("S "):
        target = _sum_output(head.split()[1:], out)
    else:
        target = _addition_output(*head.split(" + "), out)
        if target is None:
            return "6"
    if not target.startswith(out):
        return "#"  # off script: the context the model saw is not the one the driver thinks it wrote
    return target[len(out)] if len(out) < len(target) else None


def data_script(pairs: list[dict[str, str]]):
    """A script that writes the training data of :mod:`fastattn_icl.methods.retuning.tasks`: a context continues the
    pair whose input is the longest prefix of its text."""
    outputs = {pair["input"]: pair["output"] for pair in pairs}

    def follow(text: str) -> str | None:
        start = max((prompt for prompt in outputs if text.startswith(prompt)), key=len, default=None)
        target = None if start is None else start + outputs[start]
        if target is None or not target.startswith(text):
            return "#"
        return target[len(text)] if len(text) < len(target) else None

    return follow


class Scripted(torch.nn.Module):
    """A Hugging Face causal LM whose greedy token follows ``script`` (default :func:`script`); it keeps the token ids
    in one extra cache layer after the model's own, so it reads each row's context from what the driver put in the
    cache."""

    def __init__(self, inner: torch.nn.Module, script=script):
        super().__init__()
        self.inner, self.script, self.config = inner, script, inner.config

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, cache=None, logits_to_keep=0):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=logits_to_keep, **cache_kwargs(cache, self.inner))
        cache = output_cache(out)
        dtype = out.logits.dtype
        ids = input_ids[:, None, :, None].to(dtype)  # [B, 1, T, 1]
        history, _ = cache.update(ids, ids, self.inner.config.num_hidden_layers)
        logits = out.logits.clone()
        for row in range(len(input_ids)):
            context = history[row, 0, :, 0][attention_mask[row].bool()].long().tolist()
            char = self.script(TOKENIZER.decode(context, skip_special_tokens=True))
            token = EOS if char is None else TOKENIZER.convert_tokens_to_ids(char)
            logits[row, -1, token] = logits[row, -1].max() + 1.0
        out.logits = logits
        return out


def _llama(layers: int, attn: str = "eager") -> torch.nn.Module:
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=layers, vocab_size=len(TOKENIZER), max_position_embeddings=256,
                         initializer_range=0.1, bos_token_id=1, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def _models(layers: int = 2, device: str = "cpu"):
    """(ours through the seam, the eager float32 twin, the eager float64 twin), all scripted, one set of weights."""
    eager = _llama(layers)
    seam = _llama(layers, "fastattn_icl")
    seam.load_state_dict(eager.state_dict())
    return Scripted(seam).to(device), Scripted(eager), Scripted(float64_twin(eager))


MODELS = _models()
ADDITION = ["7319 + 2143\nSolution: ", "5 + 7\nSolution: ", "481 + 356\nSolution: ", "92 + 19\nSolution: "]
SUMS = ["S 1 2 3 4 5\nSolution: ", "S 7\nSolution: ", "S 4 5 6\nSolution: ", "S 9 9 9 9\nSolution: "]
# one failure each: depth (4 > max_depth 3), an unparsable call, no EOS, an unparsable final answer; in the sums,
# too many calls (S of 6 numbers makes 8 > max_calls 7) and an answer answer_of rejects
BAD_ADDITION = ["12345 + 54321\nSolution: ", "55 + 55\nSolution: ", "66 + 66\nSolution: ", "77 + 11\nSolution: "]
BAD_SUMS = ["S 1 1 1 1 1 1\nSolution: ", "S 8 8 1\nSolution: "]
BUDGETS = dict(max_depth=3, max_calls=7, max_new_tokens=40)
CASES = [(FakeAddition(), ADDITION[:2] + BAD_ADDITION + ADDITION[2:]), (FakeSum(), SUMS[:3] + BAD_SUMS + SUMS[3:])]


def _run(fn, model, task, prompts, **kw):
    return fn(model, TOKENIZER, prompts, task=task, **{**BUDGETS, "return_logits": True, "progress": False, **kw})


def _check_same(results, same, high, name: str) -> None:
    """Same texts, answers, trees, failures and generated counts as the re-prefill loop; logits by the rule."""
    assert len(results) == len(same) == len(high)
    for i, (r, s, h) in enumerate(zip(results, same, high)):
        assert (r.prompt, r.answer, r.expected, r.correct, r.failure) == (s.prompt, s.answer, s.expected, s.correct,
                                                                          s.failure), f"{name} problem {i}"
        assert h.failure == s.failure
        nodes, snodes, hnodes = r.tree.nodes(), s.tree.nodes(), h.tree.nodes()
        assert len(nodes) == len(snodes) == len(hnodes), f"{name} problem {i}: call trees differ"
        for j, (n, sn, hn) in enumerate(zip(nodes, snodes, hnodes)):
            where = f"{name} problem {i} node {j}"
            assert (n.prompt, n.depth, n.text, n.answer, n.generated_tokens, len(n.children)) == (
                sn.prompt, sn.depth, sn.text, sn.answer, sn.generated_tokens, len(sn.children)), where
            assert hn.text == sn.text, where
            assert n.logits.shape == (n.generated_tokens, len(TOKENIZER)), where
            check_close(f"{where} logits", n.logits, sn.logits, hn.logits)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes gain nothing from threads, and on a busy machine OpenMP's waiting threads cost 5x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle():
    """The re-prefill loop's results on both cases, float32 eager and float64."""
    _, eager, twin64 = MODELS
    return [(_run(reprefill_generate, eager, task, prompts), _run(reprefill_generate, twin64, task, prompts))
            for task, prompts in CASES]


# -- 1. the oracle itself follows the script -------------------------------------------------------------------


def test_the_reprefill_loop_solves_the_fake_tasks(oracle):
    (addition, _), (sums, _) = oracle
    good = [r for r in addition + sums if r.failure is None]
    assert len(good) == len(ADDITION) + len(SUMS) and all(r.correct for r in good)
    first = addition[0]
    assert first.tree.children[0].prompt == "319 + 143\nSolution: "
    assert first.tree.children[0].answer == "Carry 0, Output 462"
    assert first.tree.text == ("7319 + 2143\nSolution: Call: 319 + 143\nReturn: Carry 0, Output 462\n"
                               "Answer: Carry 0, Output 9462")
    assert [n.depth for n in first.tree.nodes()] == [0, 1, 2, 3] and first.calls == 3
    five = sums[0]  # two calls at every level of more than two numbers
    assert [n.prompt.split("\n")[0] for n in five.tree.children] == ["S 1 2 3", "S 6 4 5"]
    assert five.tree.text.endswith("Call: S 6 4 5\nReturn: 15\n") and five.answer == "15"


# -- 2. KV reuse and batching: the re-prefill loop's results ----------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_equals_the_reprefill_loop_on_the_torch_backend(oracle, batch_size):
    """Batch 1 is one-at-a-time with KV reuse; 3 mixes contexts of different problems (and left-over rows after a
    row stops); 16 runs every problem in one batch."""
    ours = MODELS[0]
    for (task, prompts), (same, high) in zip(CASES, oracle):
        results = _run(retune_generate, ours, task, prompts, batch_size=batch_size)
        _check_same(results, same, high, f"{task.name} batch {batch_size}")


def test_equals_the_reprefill_loop_on_the_triton_backend(monkeypatch):
    """The Triton kernels (the interpreter on CPU) through the seam: a one-layer model, three short problems in
    batches of 2 (a prompt and a return in one batch, a row that stops before the other)."""
    from fastattn_icl._triton import attention as kernel

    calls, real = [], kernel.attention_fwd
    monkeypatch.setattr(kernel, "attention_fwd", lambda *a, **kw: (calls.append(a[0].shape), real(*a, **kw))[1])
    device = DEVICES["triton"]
    ours, eager, twin64 = _models(layers=1, device=device)
    task = FakeAddition()
    prompts = ["5 + 7\nSolution: ", "92 + 19\nSolution: ", "3 + 4\nSolution: "]
    budgets = dict(max_new_tokens=40)
    with fastattn_icl.use_backend("triton"):
        results = _run(retune_generate, ours, task, prompts, batch_size=2, **budgets)
    same, high = _run(reprefill_generate, eager, task, prompts, **budgets), _run(reprefill_generate, twin64, task,
                                                                                 prompts, **budgets)
    _check_same(results, same, high, "triton")
    assert {shape[0] for shape in calls} == {1, 2}  # the kernel ran, on batches of two rows and on a row alone
    assert all(r.correct for r in results)


def test_batched_results_equal_one_at_a_time():
    """The problems in batches and alone, through retune_generate itself (its own oracle: same texts and trees,
    logits by the rule against the float64 re-prefill loop)."""
    ours, _, twin64 = MODELS
    task, prompts = FakeSum(), SUMS + BAD_SUMS
    alone = [_run(retune_generate, ours, task, [p])[0] for p in prompts]
    high = _run(reprefill_generate, twin64, task, prompts)
    _check_same(_run(retune_generate, ours, task, prompts, batch_size=4), alone, high, "batched vs alone")


@pytest.mark.parametrize(("task", "problems"), [
    ("addition", [("731", "214"), ("95", "17"), ("6", "8")]),
    ("parity", [[1, 0, 1, 1], [0], [1, 1]]),
    ("dp", [[3, -1], [-2, 4, 1]]),
])
def test_the_tasks_module_rules_reproduce_its_training_data(task, problems):
    """The real tasks by name: a model that writes each task's Re-Tuning training data is driven through exactly
    those contexts (DP: two calls at the top, finished after the second return; parity: its own return text)."""
    pairs = [pair for problem in problems for pair in problem_pairs(task, "retuning", problem)]
    model = Scripted(_llama(1), data_script(pairs))
    prompts = [top_prompt(task, "retuning", problem) for problem in problems]
    results = retune_generate(model, TOKENIZER, prompts, task=task, batch_size=2, progress=False)
    assert all(r.failure is None and r.correct for r in results), [r.failure for r in results]
    contexts = [pair["input"] for pair in pairs if pair["input"].endswith("\nSolution: ")]
    assert [n.prompt for r in results for n in r.tree.nodes()] == contexts  # the data's contexts, in its order
    texts, rules = {pair["input"] + pair["output"] for pair in pairs}, get_task(task)
    for node in (n for r in results for n in r.tree.nodes()):  # each context wrote the data's output, or returned
        after_return = node.children and rules.finished_after_return(node.text, len(node.children))
        assert node.text in texts or after_return and node.text.endswith(rules.return_text(node.children[-1].answer))
    assert [r.answer for r in results] == [get_task(task).ground_truth(p) for p in prompts]


# -- 3. the work saved ----------------------------------------------------------------------------------------------


def _expected_prefill(task, node) -> int:
    """With KV reuse: the prompt once, then per return the call line's newline and the return text (none after the
    return a context finishes on)."""
    count, returns = len(TOKENIZER(node.prompt, add_special_tokens=False)["input_ids"]), 0
    for child in node.children:
        count += _expected_prefill(task, child)
        if child.answer is not None:
            returns += 1
            if not task.finished_after_return(node.text, returns):  # the fake tasks look at the count alone
                count += 1 + len(TOKENIZER(task.return_text(child.answer), add_special_tokens=False)["input_ids"])
    return count


def test_prefills_only_the_new_tokens(oracle):
    ours = MODELS[0]
    for (task, prompts), (again, _) in zip(CASES, oracle):
        results = _run(retune_generate, ours, task, prompts, batch_size=4)
        for r, a in zip(results, again):
            if r.failure is None:
                assert r.prefilled_tokens == _expected_prefill(task, r.tree), r.prompt
            assert r.generated_tokens == a.generated_tokens
            if r.failure is None and r.calls:
                assert r.prefilled_tokens < a.prefilled_tokens, r.prompt
            else:  # no return happened: both prefilled each prompt once
                assert r.prefilled_tokens <= a.prefilled_tokens, r.prompt


# -- 4. failures stay with their problem ----------------------------------------------------------------------------


def test_each_failure_is_reported_with_its_problem(oracle):
    ours = MODELS[0]
    failures = {}
    for (task, prompts), _ in zip(CASES, oracle):
        for r in _run(retune_generate, ours, task, prompts, batch_size=16):
            failures[r.prompt.split("\n")[0]] = r
    expected = {
        "12345 + 54321": "max_depth: a call at depth 4 exceeds max_depth=3",
        "55 + 55": "unparsable call '5 + x': expected 'A + B'",
        "66 + 66": "max_new_tokens: a context at depth 0 generated 40 tokens without EOS or a complete call",
        "77 + 11": "unparsable final answer in",
        "S 1 1 1 1 1 1": "max_calls: call 8 exceeds max_calls=7",
        "S 8 8 1": "unparsable answer: no 'Total: <int>' or 'Return: <int>'",
    }
    for head, r in failures.items():
        if head in expected:
            assert r.failure is not None and r.failure.startswith(expected[head]), (head, r.failure)
            assert r.answer is None and not r.correct
        else:
            assert r.failure is None and r.correct, (head, r.failure)
    deep = failures["12345 + 54321"].tree
    assert [n.prompt.split("\n")[0] for n in deep.nodes()] == ["12345 + 54321", "2345 + 4321", "345 + 321", "45 + 21"]
    assert deep.nodes()[-1].text.endswith("Call: 5 + 1\n")  # where the budget stopped it, kept for inspection
    assert failures["66 + 66"].tree.text.endswith("6" * 40)


def test_no_hang_when_every_problem_fails(capsys):
    ours = MODELS[0]
    prompts = ["66 + 66\nSolution: "] * 3
    results = _run(retune_generate, ours, FakeAddition(), prompts, max_new_tokens=5, progress=True)
    assert all(r.failure.startswith("max_new_tokens") for r in results)
    assert all(node.generated_tokens <= 5 for r in results for node in r.tree.nodes())  # the budget held per context
    err = capsys.readouterr().err  # the progress bar counts finished problems
    assert "re-tuning" in err and "3/3" in err


# -- 5. arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [retune_generate, reprefill_generate])
def test_argument_errors(fn):
    model, task = MODELS[0], FakeAddition()

    def call(prompts=ADDITION[:1], **kw):
        return fn(model, TOKENIZER, prompts, **{"task": task, "progress": False, **kw})

    for name in ("max_depth", "max_calls", "max_new_tokens", "batch_size"):
        for bad in (0, -1, True, 2.0, "3"):
            with pytest.raises(ValueError, match=name):
                call(**{name: bad})
    with pytest.raises(ValueError, match=r"prompts\[1\] is not a prompt of the task 'fake_addition'"):
        call([ADDITION[0], "73199 + 21439\n"])
    with pytest.raises(TypeError, match="list of str"):
        call(ADDITION[0])
    with pytest.raises(TypeError, match=r"prompts\[0\] must be a str"):
        call([b"1 + 2\nSolution: "])
    with pytest.raises(TypeError, match="lacks"):
        call(task=object())
    with pytest.raises(ValueError, match="unknown Re-Tuning task 'nope'"):
        call(task="nope")
    with pytest.raises(ValueError, match="prompts\\[0\\] is not a prompt of the task 'parity'"):
        call(task="parity")
    no_eos = char_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="eos_token_id"):
        fn(model, no_eos, ADDITION[:1], task=task, progress=False)
    assert call([]) == []


class AllLogits(Scripted):
    """A model whose ``forward`` has no ``logits_to_keep``: it returns every position's logits (recorded)."""

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, cache=None):
        out = super().forward(input_ids, attention_mask, position_ids, use_cache, cache)
        self.widths.append(out.logits.shape[1])
        return out


def test_logits_of_the_last_position_only_where_the_model_takes_logits_to_keep(oracle):
    """transformers' causal LMs (and Scripted) get logits_to_keep=1: the LM head runs on the last position alone. A
    model without the keyword is called without it, forms every position's logits, and gives the same results."""
    ours, eager, _ = MODELS
    assert driver_module._keeps_logits(type(ours).forward) and driver_module._keeps_logits(type(eager.inner).forward)
    plain = AllLogits(ours.inner)
    plain.widths = []
    assert not driver_module._keeps_logits(type(plain).forward)
    (task, prompts), (same, high) = CASES[0], oracle[0]
    for fn in (retune_generate, reprefill_generate):
        _check_same(_run(fn, plain, task, prompts, batch_size=3), same, high, f"{fn.__name__} without logits_to_keep")
    assert max(plain.widths) > 1


def test_model_mode_is_restored():
    ours = MODELS[0]
    ours.train()
    try:
        _run(retune_generate, ours, FakeAddition(), ADDITION[1:2])
        assert ours.training and all(p.requires_grad for p in ours.parameters())
    finally:
        ours.eval()


def test_sliding_window_models_run_one_row_at_a_time():
    """transformers counts a sliding window in cache slots, padding included: a binding window on a padded batch
    changes the logits (seen on Mistral, window 16), so only batch_size=1 runs, and equals the re-prefill loop."""
    config = MistralConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                           num_hidden_layers=1, vocab_size=len(TOKENIZER), max_position_embeddings=256,
                           sliding_window=16, eos_token_id=EOS, pad_token_id=0)
    torch.manual_seed(0)
    mistral = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    assert sliding_window(Scripted(mistral)) == 16 and sliding_window(MODELS[1]) is None
    assert sliding_window(Scripted(_llama(1))) is None
    task, prompts = FakeAddition(), ADDITION[:3]
    with pytest.raises(ValueError, match=r"sliding window \(16\).*batch_size=1"):
        _run(retune_generate, Scripted(mistral), task, prompts, batch_size=2)
    results = _run(retune_generate, Scripted(mistral), task, prompts, batch_size=1)
    _check_same(results, _run(reprefill_generate, Scripted(mistral), task, prompts),
                _run(reprefill_generate, Scripted(float64_twin(mistral)), task, prompts), "sliding window")
    assert all(r.correct for r in results) and results[0].tree.text.count("\n") > 1  # longer than the window


def test_refuses_caches_it_cannot_split():
    cache = driver_module._batch_cache([[(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))]], 3)
    with pytest.raises(RuntimeError, match="full DynamicLayers"):
        driver_module._row_kv(cache, torch.ones(1, 5, dtype=torch.long), 0)
