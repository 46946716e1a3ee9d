"""Re-Tuning tasks: the paper's formats on hand-derived examples, seeded generation, argument errors, the validator
on many generated pairs and on corrupted ones, and a driver simulated through TaskRules reproducing the data."""

import itertools
import json
import random

import pytest

from fastattn_icl.methods.retuning import (
    FORMATS,
    TASKS,
    final_answer_of,
    generate_pairs,
    get_task,
    ground_truth,
    problem_pairs,
    sample_problem,
    top_prompt,
    validate_pair,
)

DP_TOP = "Compute the maximum sum of nonadjacent subsequences of "
DP_BASELINE = (
    "Given a sequence of integers, find a subsequence with the highest sum, such that no two numbers in the "
    'subsequence are adjacent in the original sequence.\n\nOutput a list with "1" for chosen numbers and "2" for '
    "unchosen ones. If multiple solutions exist, select the lexicographically smallest. Input = [3, -1, 2].\nAnswer: "
)
IDX_CALL = "If there is only 1 item, return 1 if we should use it else 2. If we should use the first item to get the sum, call False else True. Call: "  # noqa: E501
IDX_BASE = "If there is only 1 item, return 1 if we should use it else 2.\nAnswer: "
DP_CALL = "Call with array minus first element. Call: "
DP_STEP = "Append max(return[0], array[0] + return[1]) to return.\nAnswer: "


def chain(*steps):
    return [{"input": i, "output": o} for i, o in steps]


# The paper's notebooks' templates filled in by hand, in the order a driver meets the contexts.
EXPECTED = {
    ("addition", "retuning", (95, 7)): chain(
        ("95 + 07\nSolution: ", "Call: 5 + 7\n"),
        ("5 + 7\nSolution: ", "Carry 1, Output 2"),
        ("95 + 07\nSolution: Call: 5 + 7\nReturn: Carry 1, Output 2\nAnswer: ", "Carry 1, Output 02"),
    ),
    ("addition", "scratchpad", (95, 7)): chain(("95 + 07\nSolution: ", "Carry 1, Output 2\nCarry 1, Output 02")),
    ("addition", "baseline", (95, 7)): chain(("95 + 07\nAnswer: ", "102")),
    ("parity", "retuning", (1, 0, 1)): chain(
        ("What is the parity of [1, 0, 1]?\nSolution: ", "Call: What is the parity of [0, 1]?\n"),
        ("What is the parity of [0, 1]?\nSolution: ", "Call: What is the parity of [1]?\n"),
        ("What is the parity of [1]?\nSolution: ", "1"),
        ("What is the parity of [0, 1]?\nSolution: Call: What is the parity of [1]?\n\nReturn: 1\nAnswer: ", "1"),
        ("What is the parity of [1, 0, 1]?\nSolution: Call: What is the parity of [0, 1]?\n\nReturn: 1\nAnswer: ", "0"),
    ),
    ("parity", "scratchpad", (1, 0, 1)): chain(
        ("What is the parity of [1, 0, 1]?\nSolution: ", "Compute one element at a time. 1 1 0")
    ),
    ("parity", "baseline", (1, 0, 1)): chain(("What is the parity of [1, 0, 1]?\nAnswer: ", "0")),
    # dp = [5, 2, 2]; chosen = [1, 2, 1] (3 + 2)
    ("dp", "retuning", (3, -1, 2)): chain(
        (DP_TOP + "[3, -1, 2]\nSolution: ", "Call: Create dp array [3, -1, 2]\n"),
        ("Create dp array [3, -1, 2]\nSolution: ", DP_CALL + "Create dp array [-1, 2]\n"),
        ("Create dp array [-1, 2]\nSolution: ", DP_CALL + "Create dp array [2]\n"),
        ("Create dp array [2]\nSolution: ", "Return [0] if negative else element.\nAnswer: [2]"),
        (
            "Create dp array [-1, 2]\nSolution: " + DP_CALL + "Create dp array [2]\nReturn: [2]\nAnswer: ",
            DP_STEP + "[2, 2]",
        ),
        (
            "Create dp array [3, -1, 2]\nSolution: " + DP_CALL + "Create dp array [-1, 2]\nReturn: [2, 2]\nAnswer: ",
            DP_STEP + "[5, 2, 2]",
        ),
        (
            DP_TOP + "[3, -1, 2]\nSolution: Call: Create dp array [3, -1, 2]\nReturn: [5, 2, 2]\nAnswer: ",
            "Call: Create chosen indices array: sum array [5, 2, 2], item array [3, -1, 2], can use item True\n",
        ),
        (
            "Create chosen indices array: sum array [5, 2, 2], item array [3, -1, 2], can use item True\nSolution: ",
            IDX_CALL + "Create chosen indices array: sum array [2, 2], item array [-1, 2], can use item False\n",
        ),
        (
            "Create chosen indices array: sum array [2, 2], item array [-1, 2], can use item False\nSolution: ",
            IDX_CALL + "Create chosen indices array: sum array [2], item array [2], can use item True\n",
        ),
        ("Create chosen indices array: sum array [2], item array [2], can use item True\nSolution: ", IDX_BASE + "[1]"),
        (
            "Create chosen indices array: sum array [2, 2], item array [-1, 2], can use item False\nSolution: "
            + IDX_CALL
            + "Create chosen indices array: sum array [2], item array [2], can use item True\nReturn: [1]\nAnswer: ",
            "Append 1 if False else 2.\nAnswer: [2, 1]",
        ),
        (
            "Create chosen indices array: sum array [5, 2, 2], item array [3, -1, 2], can use item True\nSolution: "
            + IDX_CALL
            + "Create chosen indices array: sum array [2, 2], item array [-1, 2], can use item False\n"
            "Return: [2, 1]\nAnswer: ",
            "Append 1 if False else 2.\nAnswer: [1, 2, 1]",
        ),
    ),
    ("dp", "baseline", (3, -1, 2)): chain((DP_BASELINE, "[1, 2, 1]")),
    # the authors' own example list, [3, 2, 1, 5, 2]
    ("dp", "scratchpad", (3, 2, 1, 5, 2)): chain(
        (
            "Question: Let's solve input = [3, 2, 1, 5, 2].",
            "Scratchpad: dp[4] = max(input[4], 0) = max(2, 0) = 2\n"
            "dp[3] = max(input[3], input[4], 0) = max(5, 2, 0) = 5\n"
            "dp[2] = max(dp[3], input[2] + dp[4], 0) = max(5, 1 + 2, 0) = 5\n"
            "dp[1] = max(dp[2], input[1] + dp[3], 0) = max(5, 2 + 5, 0) = 7\n"
            "dp[0] = max(dp[1], input[0] + dp[2], 0) = max(7, 3 + 5, 0) = 8\n\n"
            "Finally, we reconstruct the lexicographically smallest subsequence that fulfills the task objective by "
            'selecting numbers as follows. We store the result on a list named "output".\n\n'
            "Let can_use_next_item = True.\n"
            "Since dp[0] == input[0] + dp[2] (8 == 3 + 5) and can_use_next_item == True, we store output[0] = 1. "
            "We update can_use_next_item = False.\n"
            "Since dp[1] != input[1] + dp[3] (7 != 2 + 5) or can_use_next_item == False, we store output[1] = 2. "
            "We update can_use_next_item = True.\n"
            "Since dp[2] != input[2] + dp[4] (5 != 1 + 2) or can_use_next_item == False, we store output[2] = 2. "
            "We update can_use_next_item = True.\n"
            "Since dp[3] == input[3] (5 == 5) and can_use_next_item == True, we store output[3] = 1. "
            "We update can_use_next_item = False.\n"
            "Since dp[4] != input[4] (2 != 2) or can_use_next_item == False, we store output[4] = 2.\n\n"
            "Reconstructing all together, output=[1, 2, 2, 1, 2].",
        )
    ),
}


@pytest.mark.parametrize("task, fmt, problem", list(EXPECTED))
def test_formats_match_the_paper(task, fmt, problem):
    pairs = problem_pairs(task, fmt, list(problem))
    assert pairs == EXPECTED[task, fmt, problem]
    assert top_prompt(task, fmt, list(problem)) == pairs[0]["input"]
    assert json.loads(json.dumps(pairs)) == pairs


def test_addition_example_of_the_issue():
    pairs = problem_pairs("addition", "retuning", (73199, 21439))
    assert {"input": "73199 + 21439\nSolution: ", "output": "Call: 3199 + 1439\n"} in pairs
    done = "73199 + 21439\nSolution: Call: 3199 + 1439\nReturn: Carry 0, Output 4638\nAnswer: "
    assert {"input": done, "output": "Carry 0, Output 94638"} in pairs
    assert {"input": "9 + 9\nSolution: ", "output": "Carry 1, Output 8"} in pairs
    assert len(pairs) == 2 * 4 + 1
    assert problem_pairs("addition", "retuning", ("0005", 12))[0]["input"] == "0005 + 0012\nSolution: "


def brute_force_chosen(items):
    """The lexicographically smallest 1/2 list among the non-adjacent choices of largest sum."""
    best = None
    for choice in itertools.product((1, 2), repeat=len(items)):
        if any(a == b == 1 for a, b in itertools.pairwise(choice)):
            continue
        key = (-sum(x for x, c in zip(items, choice) if c == 1), choice)
        best = key if best is None or key < best else best
    return str(list(best[1]))


def test_ground_truth_against_independent_answers():
    rng = random.Random(3)
    for _ in range(300):
        items = [rng.randint(-5, 5) for _ in range(rng.randint(2, 9))]
        truth = brute_force_chosen(items)
        assert {ground_truth("dp", top_prompt("dp", fmt, items)) for fmt in FORMATS} == {truth}, items
        a, b = rng.randrange(10 ** rng.randint(1, 40)), rng.randrange(10 ** rng.randint(1, 40))
        assert {ground_truth("addition", top_prompt("addition", fmt, (a, b))) for fmt in FORMATS} == {str(a + b)}
        bits = [rng.randint(0, 1) for _ in range(rng.randint(1, 30))]
        assert {ground_truth("parity", top_prompt("parity", fmt, bits)) for fmt in FORMATS} == {str(sum(bits) % 2)}
        assert get_task("parity").ground_truth(top_prompt("parity", "retuning", bits)) == str(sum(bits) % 2)


def problem_size(task, prompt):
    return len(prompt.split(" + ")[0]) if task == "addition" else prompt.rpartition("[")[2].count(",") + 1


def test_seeded_and_ranged():
    state = random.getstate()
    a = generate_pairs("addition", "retuning", 20, lengths=(3, 6), seed=7)
    assert random.getstate() == state  # the global RNG is neither used nor reseeded
    assert a == generate_pairs("addition", "retuning", 20, lengths=(3, 6), seed=7)
    assert a != generate_pairs("addition", "retuning", 20, lengths=(3, 6), seed=8)
    for task, lo, hi in [("addition", 3, 6), ("dp", 2, 4), ("parity", 5, 9)]:
        pairs = generate_pairs(task, "baseline", 200, lengths=(lo, hi), seed=1)
        assert {problem_size(task, p["input"]) for p in pairs} == set(range(lo, hi + 1))
    rng1, rng2 = random.Random(5), random.Random(5)
    assert [sample_problem("dp", 6, rng1) for _ in range(5)] == [sample_problem("dp", 6, rng2) for _ in range(5)]
    problems = [sample_problem("addition", 5, rng1) for _ in range(200)]
    assert all(len(a) == len(b) == 5 and a.isdigit() and b.isdigit() for a, b in problems)
    assert all(a[0] != "0" or b[0] != "0" for a, b in problems)  # one operand has all 5 digits,
    assert any(a[0] == "0" or b[0] == "0" for a, b in problems)  # the other may be shorter, zero-padded


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda: generate_pairs("multiplication", "retuning", 1), (ValueError, "known tasks: \\['addition', 'dp'")),
        (lambda: generate_pairs("addition", "cot", 1), (ValueError, "'cot'.*known formats")),
        (lambda: generate_pairs("addition", "retuning", 0), (ValueError, "n_problems must be >= 1, got 0")),
        (lambda: generate_pairs("addition", "retuning", 2.0), (TypeError, "n_problems must be an int, got float")),
        (lambda: generate_pairs("addition", "retuning", True), (TypeError, "n_problems must be an int, got bool")),
        (lambda: generate_pairs("addition", "retuning", 1, lengths=(4, 3)), (ValueError, "lo <= hi.*\\(4, 3\\)")),
        (lambda: generate_pairs("dp", "retuning", 1, lengths=(1, 3)), (ValueError, "2 <= lo <= hi for dp")),
        (lambda: generate_pairs("parity", "retuning", 1, lengths=(3,)), (TypeError, "lengths must be a pair")),
        (lambda: generate_pairs("parity", "retuning", 1, seed="1"), (TypeError, "seed must be an int, got str")),
        (lambda: sample_problem("parity", 3, random), (TypeError, "rng must be a random.Random")),
        (lambda: sample_problem("dp", 1, random.Random(0)), (ValueError, "length must be >= 2, got 1")),
        (lambda: top_prompt("addition", "retuning", (-1, 2)), (ValueError, "operand must be >= 0, got -1")),
        (lambda: top_prompt("addition", "retuning", ("12a", 2)), (TypeError, "digit string, got '12a'")),
        (lambda: top_prompt("addition", "retuning", 12), (TypeError, "a pair \\(a, b\\), got 12")),
        (lambda: top_prompt("parity", "retuning", [0, 2]), (ValueError, "in \\[0, 1\\], got 2")),
        (lambda: top_prompt("parity", "retuning", "0101"), (TypeError, "list of ints, got str")),
        (lambda: top_prompt("dp", "retuning", [4]), (ValueError, "at least 2 items, got 1")),
        (lambda: top_prompt("dp", "retuning", [1.5, 2]), (TypeError, "got an item 1.5")),
        (lambda: get_task(3), (TypeError, "task must be a str, got int")),
        (lambda: validate_pair("parity", "retuning", {"input": "x"}), (TypeError, "keys 'input' and 'output'")),
        (lambda: ground_truth("parity", "What is the parity of []?"), (ValueError, "not a top-level retuning")),
    ],
)
def test_argument_errors(call, error):
    with pytest.raises(error[0], match=error[1]):
        call()


LENGTHS = {"addition": (1, 12), "dp": (2, 7), "parity": (1, 21)}


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_validator_accepts_generated_pairs(task, fmt):
    pairs = generate_pairs(task, fmt, 300 if fmt == "retuning" else 2000, lengths=LENGTHS[task], seed=11)
    assert len(pairs) >= 2000
    for pair in pairs:
        validate_pair(task, fmt, pair)


def mutate_digit(text, rng):
    at = rng.choice([i for i, ch in enumerate(text) if ch.isdigit()])
    return text[:at] + rng.choice([d for d in "0123456789" if d != text[at]]) + text[at + 1 :]


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("fmt", FORMATS)
def test_validator_rejects_any_wrong_digit(task, fmt):
    """Every output is determined by its input, so one changed digit anywhere in it is an error; so is one in a
    return the input carries."""
    rng = random.Random(2)
    pairs = generate_pairs(task, fmt, 60, lengths=LENGTHS[task], seed=5)
    for pair in rng.sample(pairs, min(300, len(pairs))):
        with pytest.raises(ValueError, match="wrong|not a step"):
            validate_pair(task, fmt, {"input": pair["input"], "output": mutate_digit(pair["output"], rng)})
        head, found, ret = pair["input"].rpartition("Return: ")
        if found:
            ret = mutate_digit(ret.partition("\n")[0], rng) + "\n" + ret.partition("\n")[2]
            with pytest.raises(ValueError, match="not a step of the problem"):
                validate_pair(task, fmt, {"input": head + found + ret, "output": pair["output"]})


ADD_TOP = "73199 + 21439\nSolution: "
ADD_DONE = ADD_TOP + "Call: 3199 + 1439\nReturn: Carry 0, Output 4638\nAnswer: "
IDX_TOP = "Create chosen indices array: sum array [5, 2, 2], item array [3, -1, 2], can use item True\nSolution: "


@pytest.mark.parametrize(
    "task, fmt, inp, out, reason",
    [
        ("addition", "retuning", ADD_DONE, "Carry 0, Output 94639", "wrong addition output.*Output 94638"),
        ("addition", "retuning", ADD_DONE, "Carry 1, Output 94638", "wrong addition output.*'Carry 0"),
        ("addition", "retuning", ADD_DONE.replace("Carry 0", "Carry 1"), "Carry 0, Output 94638", "not a step"),
        ("addition", "retuning", ADD_TOP, "Call: 3199 + 1438\n", "wrong addition output.*'Call: 3199 \\+ 1439"),
        ("addition", "retuning", ADD_TOP, "Carry 0, Output 94638", "wrong addition output"),
        ("addition", "retuning", "7319 + 21439\nSolution: ", "Call: 319 + 1439\n", "malformed.*differ in length"),
        ("addition", "retuning", "73199 - 21439\nSolution: ", "Call: 3199 - 1439\n", "malformed addition input"),
        ("addition", "scratchpad", "95 + 07\nSolution: ", "Carry 1, Output 2\nCarry 0, Output 02", "wrong scratch"),
        ("addition", "baseline", "95 + 07\nAnswer: ", "103", "wrong baseline addition output"),
        ("addition", "baseline", "95 + 07\nSolution: ", "102", "not a top-level baseline addition prompt"),
        (
            "parity",
            "retuning",
            "What is the parity of [1, 1]?\nSolution: ",
            "Call: What is the parity of [0]?\n",
            "wrong parity",
        ),
        ("parity", "retuning", "What is the parity of [1]?\nSolution: ", "0", "wrong parity output"),
        ("parity", "retuning", "What is the parity of [1, 2]?\nSolution: ", "1", "malformed.*bits 0 or 1"),
        (
            "parity",
            "retuning",  # a single newline before the return is the authors' driver, not their data
            "What is the parity of [0, 1]?\nSolution: Call: What is the parity of [1]?\nReturn: 1\nAnswer: ",
            "1",
            "not a step",
        ),
        (
            "parity",
            "scratchpad",
            "What is the parity of [1, 1]?\nSolution: ",
            "Compute one element at a time. 1 1",
            "wrong scratchpad parity output",
        ),
        ("parity", "baseline", "What is the parity of [1, 1]?\nAnswer: ", "1", "wrong baseline parity output"),
        (
            "dp",
            "retuning",
            "Create dp array [-1, 2]\nSolution: " + DP_CALL + "Create dp array [2]\nReturn: [2]\nAnswer: ",
            DP_STEP + "[1, 2]",
            "wrong dp output.*\\[2, 2\\]",
        ),
        (
            "dp",
            "retuning",
            "Create dp array [3, -1, 2]\nSolution: " + DP_CALL + "Create dp array [-1, 2]\nReturn: [2, 1]\nAnswer: ",
            DP_STEP + "[5, 2, 1]",
            "not a step",
        ),
        (
            "dp",
            "retuning",
            IDX_TOP.replace("[5, 2, 2]", "[5, 2, 1]"),
            IDX_CALL,
            "sum array \\[5, 2, 1\\] is not the dp",
        ),
        (
            "dp",
            "retuning",
            IDX_TOP,
            IDX_CALL + "Create chosen indices array: sum array [2, 2], item array [-1, 2], can use item True\n",
            "wrong dp output",
        ),
        ("dp", "retuning", "Create dp array [3,-1, 2]\nSolution: ", DP_CALL, "malformed dp input.*list of integers"),
        ("dp", "retuning", "Create dp array [3, -01]\nSolution: ", DP_CALL, "malformed dp input.*Python writes"),
        ("dp", "retuning", DP_TOP + "[3]\nSolution: ", "Call: Create dp array [3]\n", "malformed.*at least 2"),
        ("dp", "scratchpad", "Question: Let's solve input = [3, -1, 2]", "x", "not a top-level scratchpad dp prompt"),
        ("dp", "baseline", DP_BASELINE, "[1, 2, 2]", "wrong baseline dp output.*\\[1, 2, 1\\]"),
    ],
)
def test_validator_rejects_corrupted_pairs(task, fmt, inp, out, reason):
    with pytest.raises(ValueError, match=reason):
        validate_pair(task, fmt, {"input": inp, "output": out})


def drive(rules, prompt, model, visited):
    """The recursive driver of the paper, with ``model`` looking up the generated output of each input."""
    text, n_calls = prompt, 0
    while True:
        visited.append(text)
        out = model[text]
        text += out
        if "Call: " not in out:
            return text
        call = out.split("Call: ", 1)[1].split("\n", 1)[0]
        child = drive(rules, rules.child_prompt(call), model, visited)
        text += rules.return_text(rules.answer_of(child))
        n_calls += 1
        if rules.finished_after_return(text, n_calls):
            return text


@pytest.mark.parametrize("task", sorted(TASKS))
def test_driver_through_task_rules_reproduces_the_data(task):
    rules, rng = get_task(task), random.Random(4)
    lo, hi = LENGTHS[task]
    for length in [lo, lo + 1, hi] + [rng.randint(lo, hi) for _ in range(40)]:
        problem = sample_problem(task, length, rng)
        pairs = problem_pairs(task, "retuning", problem)
        prompt = top_prompt(task, "retuning", problem)
        rules.check_prompt(prompt)
        visited = []
        text = drive(rules, prompt, {p["input"]: p["output"] for p in pairs}, visited)
        assert visited == [p["input"] for p in pairs]
        assert rules.final_answer(text) == rules.ground_truth(prompt) == ground_truth(task, prompt)
        assert final_answer_of(task, "retuning", text) == rules.ground_truth(prompt)
        for fmt in ("scratchpad", "baseline"):
            (pair,) = problem_pairs(task, fmt, problem)
            assert final_answer_of(task, fmt, pair["input"] + pair["output"]) == rules.ground_truth(prompt)


def test_rules_interface_examples():
    add, dp, parity = get_task("addition"), get_task("dp"), get_task("parity")
    assert add.name == "addition" and add.child_prompt("3199 + 1439") == "3199 + 1439\nSolution: "
    assert dp.child_prompt("Create dp array [-1, 2]") == "Create dp array [-1, 2]\nSolution: "
    assert add.return_text("Carry 0, Output 4638") == "Return: Carry 0, Output 4638\nAnswer: "
    assert dp.return_text("[2, 1]") == "Return: [2, 1]\nAnswer: "
    assert parity.return_text("1") == "\nReturn: 1\nAnswer: "
    assert add.answer_of("9 + 9\nSolution: Carry 1, Output 8") == "Carry 1, Output 8"
    assert add.answer_of(ADD_DONE + "Carry 0, Output 94638\n") == "Carry 0, Output 94638"
    assert (
        dp.answer_of("Create dp array [2]\nSolution: " + "Return [0] if negative else element.\nAnswer: [2]") == "[2]"
    )
    top = DP_TOP + "[3, -1, 2]\nSolution: Call: Create dp array [3, -1, 2]\nReturn: [5, 2, 2]\nAnswer: "
    assert not dp.finished_after_return(top, 1)
    done = top + "Call: Create chosen indices array: sum array [5, 2, 2], item array [3, -1, 2], can use item True\n"
    done += "Return: [1, 2, 1]\nAnswer: "
    assert dp.finished_after_return(done, 2) and dp.final_answer(done) == "[1, 2, 1]"
    assert not dp.finished_after_return("Create dp array [3, -1, 2]\nSolution: " + DP_CALL, 2)
    assert not add.finished_after_return(ADD_DONE, 1) and not parity.finished_after_return("x", 1)
    assert (
        add.final_answer(
            "9999 + 0001\nSolution: Call: 999 + 001\nReturn: Carry 1, Output 000\nAnswer: Carry 1, Output 0000"
        )
        == "10000"
    )  # noqa: E501
    assert (
        add.final_answer(
            "0005 + 0007\nSolution: Call: 005 + 007\nReturn: Carry 0, Output 012\nAnswer: Carry 0, Output 0012"
        )
        == "12"
    )  # noqa: E501
    assert add.final_answer(ADD_DONE + "Carry 0, Output 9x638") is None
    assert parity.final_answer("What is the parity of [1]?\nSolution: 1") == "1"
    assert parity.final_answer("What is the parity of [1]?\nSolution: 2") is None
    assert dp.final_answer(top) == "[5, 2, 2]"  # the paper's reading: the last return, whichever it is
    assert dp.final_answer(DP_TOP + "[3, -1, 2]\nSolution: ") is None


def test_final_answer_of_every_format():
    assert final_answer_of("addition", "baseline", "95 + 07\nAnswer: 102") == "102"
    assert final_answer_of("addition", "baseline", "95 + 07\nAnswer: 1o2") is None
    assert (
        final_answer_of("addition", "scratchpad", "95 + 07\nSolution: Carry 1, Output 2\nCarry 1, Output 02") == "102"
    )
    assert final_answer_of("addition", "scratchpad", "95 + 07\nSolution: Carry 1, Output 2\nCarry 1") is None
    assert (
        final_answer_of(
            "parity", "scratchpad", "What is the parity of [1, 1]?\nSolution: Compute one element at a time. 1 0"
        )
        == "0"
    )  # noqa: E501
    assert final_answer_of("parity", "baseline", "What is the parity of [1, 1]?\nAnswer: 1") == "1"
    assert final_answer_of("parity", "baseline", "What is the parity of [1, 1]?\nSolution: 1") is None
    assert final_answer_of("dp", "baseline", DP_BASELINE + "[1, 2, 2]") == "[1, 2, 2]"
    assert final_answer_of("dp", "baseline", DP_BASELINE + "[1, 2, 2") is None
    assert final_answer_of("dp", "scratchpad", "...\n\nReconstructing all together, output=[2, 1].") == "[2, 1]"
    assert final_answer_of("dp", "scratchpad", "...\n\nReconstructing all together, output=[2, 1]") is None


def test_check_and_child_prompt_reject_other_formats():
    add, dp, parity = get_task("addition"), get_task("dp"), get_task("parity")
    for rules, prompt in [
        (add, "319 + 14\nSolution: "),
        (add, "73199 + 21439\nAnswer: "),
        (dp, "Create dp array [3, -1, 2]\nSolution: "),
        (dp, "Question: Let's solve input = [3, -1, 2]."),
        (parity, "What is the parity of [1, 0]?\nAnswer: "),
    ]:
        with pytest.raises(ValueError, match=f"not a top-level retuning {rules.name} prompt.*expected '"):
            rules.check_prompt(prompt)
    for rules, call in [
        (add, "31x9 + 14"),
        (add, "3199 + 1439\n"),
        (dp, DP_TOP + "[3, -1, 2]"),
        (dp, "Create chosen indices array: sum array [2], item array [-1, 2], can use item True"),
        (parity, "What is the parity of 101?"),
    ]:
        with pytest.raises(ValueError, match=f"cannot parse the {rules.name} call .*expected '"):
            rules.child_prompt(call)
    with pytest.raises(TypeError, match="prompt must be a str"):
        add.check_prompt(None)
