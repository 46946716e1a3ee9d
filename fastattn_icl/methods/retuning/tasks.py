"""Re-Tuning's tasks (Pasewark et al., ACL 2024): training data, its validation, and the rules of recursion.

A Re-Tuned model solves a problem by writing a sub-prompt to itself, ``Call: <subproblem>\\n``; a driver answers
``<subproblem>\\nSolution: `` with the same model in a fresh context, appends ``Return: <answer>\\nAnswer: `` to the
caller's context, and the caller continues. Tasks (:data:`TASKS`): ``"addition"`` of two integers, ``"dp"`` (maximum
sum of non-adjacent elements, answered as the chosen-indices list) and ``"parity"`` of a bit list, each in the three
formats of the paper (:data:`FORMATS`): ``"retuning"``, ``"scratchpad"`` (every step in one output) and ``"baseline"``
(the answer directly). Prompt and output strings are the paper's, so a model trained on either data set runs with
either driver. Where the authors' own code disagrees with itself, one choice is made:

- DP's chosen-indices sub-task gets ``Return: `` like every other context (their training data writes ``Return ``
  there, their evaluation driver ``Return: ``; :meth:`TaskRules.return_text` sees only the answer);
- baseline prompts end with ``\\nAnswer: `` as in their training data (their addition and parity evaluations prompt
  with ``\\nSolution: ``).

Data: :func:`generate_pairs`, :func:`problem_pairs`, :func:`sample_problem`, :func:`top_prompt`; checks:
:func:`validate_pair`; one scorer for all formats: :func:`final_answer_of`, :func:`ground_truth`; the recursive
driver's interface: :class:`TaskRules` through :func:`get_task`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence

__all__ = [
    "FORMATS",
    "TASKS",
    "TaskRules",
    "final_answer_of",
    "generate_pairs",
    "get_task",
    "ground_truth",
    "problem_pairs",
    "sample_problem",
    "top_prompt",
    "validate_pair",
]

FORMATS = ("retuning", "scratchpad", "baseline")
SOLUTION = "\nSolution: "
ANSWER = "\nAnswer: "
_LIST = r"\[-?\d+(?:, -?\d+)*\]"


def _fmt_list(values: Sequence[int]) -> str:
    """Python's ``str(list)`` of ints, the paper's list format: ``[3, -1, 2]``."""
    return "[" + ", ".join(str(v) for v in values) + "]"


def _parse_list(text: str, what: str) -> tuple[int, ...]:
    if re.fullmatch(_LIST, text) is None:
        raise ValueError(f"{what} must be a non-empty list of integers like '[3, -1, 2]', got {text!r}")
    values = tuple(int(v) for v in text[1:-1].split(", "))
    if _fmt_list(values) != text:
        raise ValueError(f"{what} {text!r} is not written as Python writes the list ({_fmt_list(values)!r})")
    return values


def _require_str(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _require_int(name: str, value: object, minimum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _int_items(name: str, problem: object, allowed: range | None = None, min_len: int = 1) -> tuple[int, ...]:
    if isinstance(problem, (str, bytes)) or not isinstance(problem, Sequence):
        raise TypeError(f"a {name} problem must be a list of ints, got {type(problem).__name__}")
    if len(problem) < min_len:
        raise ValueError(f"a {name} problem needs at least {min_len} items, got {len(problem)}")
    for v in problem:
        if not isinstance(v, int) or isinstance(v, bool):
            raise TypeError(f"a {name} problem must be a list of ints, got an item {v!r}")
        if allowed is not None and v not in allowed:
            raise ValueError(f"a {name} problem's items must be in {list(allowed)}, got {v}")
    return tuple(problem)


def _difference(got: str, want: str) -> str:
    """Where ``got`` first departs from ``want``, with a little context on both sides."""
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    lo = max(0, i - 30)
    return f"at character {i}: got {got[lo : i + 30]!r} where {want[lo : i + 30]!r} was expected"


def _after(text: str, marker: str) -> str | None:
    """The stripped text after the last ``marker``, or ``None`` without one."""
    _, found, tail = text.rpartition(marker)
    return tail.strip() if found else None


def _common_prefix(a: str, b: str) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class TaskRules:
    """How one task recurses in the Re-Tuning format: the interface of the recursive driver.

    A *context* is one conversation with the model: a prompt ending in ``\\nSolution: ``, then what the model
    generates and the driver appends. When the model's output in a context contains ``Call: <call>\\n``, the driver
    solves :meth:`child_prompt` ``(<call>)`` in a fresh context, appends :meth:`return_text` of that context's
    :meth:`answer_of` to the caller's text, and lets the caller continue, unless :meth:`finished_after_return`.
    A context whose output has no call is finished. Only the ``"retuning"`` format is driven; :func:`final_answer_of`
    and :func:`ground_truth` score all three formats.
    """

    name: str
    min_length: int = 1
    default_lengths: tuple[int, int]
    top_format: str
    call_format: str
    return_prefix = "Return: "

    def check_prompt(self, prompt: str) -> None:
        """Raise ``ValueError``, naming the expected format, unless ``prompt`` is a top-level Re-Tuning prompt."""
        self._parse_top("retuning", prompt)

    def child_prompt(self, call: str) -> str:
        """The prompt that solves ``call`` (the text between ``Call: `` and the next newline of the model's output)
        in a fresh context: ``call + '\\nSolution: '``. ``ValueError`` if ``call`` is not a sub-problem of the task."""
        prompt = _require_str("call", call) + SOLUTION
        try:
            if self._callable(self._parse(prompt)):
                return prompt
            reason = "a top-level problem"
        except ValueError as e:
            reason = str(e)
        raise ValueError(f"cannot parse the {self.name} call {call!r} ({reason}); expected {self.call_format}")

    def return_text(self, answer: str) -> str:
        """What the driver appends to the caller's context after a child returned ``answer``."""
        return self.return_prefix + _require_str("answer", answer) + ANSWER

    def answer_of(self, text: str) -> str:
        """The answer a finished context (its whole text) returns to its caller: the text after its last
        ``\\nAnswer: ``, or after ``\\nSolution: `` for a base case answered directly, stripped of whitespace."""
        _require_str("text", text)
        for marker in (ANSWER, SOLUTION):
            _, found, tail = text.rpartition(marker)
            if found:
                return tail.strip()
        raise ValueError(f"a {self.name} context's text must contain '\\nSolution: ', got {text!r}")

    def finished_after_return(self, text: str, n_calls: int) -> bool:
        """Whether the context ``text`` is finished right after its ``n_calls``-th return, without generating more
        (its answer is then that return)."""
        return False

    def final_answer(self, text: str) -> str | None:
        """The canonical final answer (:meth:`ground_truth`'s form) in a finished top-level context, or ``None``
        if it cannot be parsed."""
        return self._final("retuning", _require_str("text", text))

    def ground_truth(self, prompt: str) -> str:
        """The correct final answer of a top-level Re-Tuning prompt, in canonical form."""
        return self._truth(self._parse_top("retuning", prompt))

    # One task's format, implemented per task. A ctx is the problem of one context (hashable).
    def _parse(self, prompt: str):
        """The ctx of any context prompt of the task; ``ValueError`` saying what is wrong with it."""
        raise NotImplementedError

    def _prompt(self, ctx) -> str:
        raise NotImplementedError

    def _children(self, ctx) -> list:
        """The contexts ``ctx`` calls, in order; empty for a base case."""
        raise NotImplementedError

    def _answer(self, ctx) -> str:
        """What a context of ``ctx`` returns to its caller."""
        raise NotImplementedError

    def _answer_output(self, ctx) -> str:
        """The model's last output in a context of ``ctx`` (after its last return, or the base case's answer)."""
        return self._answer(ctx)

    def _preamble(self, ctx) -> str:
        """Text the model writes before ``Call: ``."""
        return ""

    def _callable(self, ctx) -> bool:
        """Whether a context may call ``ctx``."""
        return True

    def _check_context(self, ctx) -> None:
        """Raise ``ValueError`` if a well-formed ctx is not one the task's data can contain."""

    def _root(self, problem):
        return problem

    def _problem_of(self, ctx):
        return ctx

    def _normalize(self, problem):
        raise NotImplementedError

    def _sample(self, length: int, rng: random.Random):
        raise NotImplementedError

    def _prompt_in(self, fmt: str, problem) -> str:
        raise NotImplementedError

    def _parse_in(self, fmt: str, prompt: str):
        """The problem of a scratchpad or baseline prompt: by default the Re-Tuning prompt, ending in ``\\nAnswer: ``
        for a baseline."""
        end = ANSWER if fmt == "baseline" else SOLUTION
        if not prompt.endswith(end):
            raise ValueError(f"it does not end with {end!r}")
        return self._problem_of(self._parse(prompt[: -len(end)] + SOLUTION))

    def _single_output(self, fmt: str, problem) -> str:
        """The output of a scratchpad or baseline problem."""
        raise NotImplementedError

    def _final(self, fmt: str, text: str) -> str | None:
        raise NotImplementedError

    def _truth(self, problem) -> str:
        raise NotImplementedError

    # Shared by every task.
    def _parse_top(self, fmt: str, prompt: str):
        _require_str("prompt", prompt)
        try:
            if fmt != "retuning":
                return self._parse_in(fmt, prompt)
            ctx = self._parse(prompt)
            if self._root(self._problem_of(ctx)) != ctx:
                raise ValueError("a sub-task prompt")
            return self._problem_of(ctx)
        except ValueError as e:
            want = self.top_format if fmt == "retuning" else f"e.g. {self._prompt_in(fmt, self._example)!r}"
            raise ValueError(f"not a top-level {fmt} {self.name} prompt: {prompt!r} ({e}); expected {want}") from None

    def _level(self, ctx) -> Iterator[tuple[str, str, object]]:
        """``(input, output, called ctx or None)`` of each pair of one context, in the driver's order."""
        text = self._prompt(ctx)
        children = self._children(ctx)
        for child in children:
            call = self._preamble(ctx) + "Call: " + self._prompt(child)[: -len(SOLUTION)] + "\n"
            yield text, call, child
            text += call + self.return_text(self._answer(child))
        if not children or not self.finished_after_return(text, len(children)):
            yield text, self._answer_output(ctx), None

    def _chain(self, ctx) -> list[dict[str, str]]:
        pairs = []
        for inp, out, child in self._level(ctx):
            pairs.append({"input": inp, "output": out})
            if child is not None:
                pairs += self._chain(child)
        return pairs


class _Addition(TaskRules):
    name = "addition"
    default_lengths = (1, 15)
    top_format = "'<a> + <b>\\nSolution: ' with a and b zero-padded to the same number of digits"
    call_format = "'<a> + <b>' with a and b of the same number of digits"
    _example = ("73199", "21439")
    _PROMPT = re.compile(r"([0-9]+) \+ ([0-9]+)\nSolution: ")
    _RESULT = re.compile(r"Carry ([01]), Output ([0-9]+)")

    def _parse(self, prompt):
        m = self._PROMPT.fullmatch(prompt)
        if m is None:
            raise ValueError("not '<digits> + <digits>\\nSolution: '")
        if len(m[1]) != len(m[2]):
            raise ValueError(f"operands {m[1]} and {m[2]} differ in length")
        return m[1], m[2]

    def _prompt(self, ctx):
        return f"{ctx[0]} + {ctx[1]}{SOLUTION}"

    def _children(self, ctx):
        return [(ctx[0][1:], ctx[1][1:])] if len(ctx[0]) > 1 else []

    def _answer(self, ctx):
        n, total = len(ctx[0]), int(ctx[0]) + int(ctx[1])
        return f"Carry {total // 10**n}, Output {total % 10**n:0{n}d}"

    def _normalize(self, problem):
        if isinstance(problem, (str, bytes)) or not isinstance(problem, Sequence) or len(problem) != 2:
            raise TypeError(f"an addition problem must be a pair (a, b), got {problem!r}")
        ops = []
        for x in problem:
            if isinstance(x, int) and not isinstance(x, bool):
                ops.append(str(_require_int("an addition operand", x, 0)))
            elif isinstance(x, str) and re.fullmatch(r"[0-9]+", x):
                ops.append(x)
            else:
                raise TypeError(f"an addition operand must be a non-negative int or a digit string, got {x!r}")
        n = max(len(o) for o in ops)
        return tuple(o.zfill(n) for o in ops)

    def _sample(self, length, rng):
        digits = [length, rng.randint(1, length)]
        rng.shuffle(digits)
        return tuple(str(rng.randint(10 ** (k - 1) if k > 1 else 0, 10**k - 1)).zfill(length) for k in digits)

    def _prompt_in(self, fmt, problem):
        return f"{problem[0]} + {problem[1]}" + (SOLUTION if fmt != "baseline" else ANSWER)

    def _single_output(self, fmt, problem):
        if fmt == "baseline":
            return str(int(problem[0]) + int(problem[1]))
        return "\n".join(self._answer((problem[0][-k:], problem[1][-k:])) for k in range(1, len(problem[0]) + 1))

    def _final(self, fmt, text):
        if fmt == "baseline":
            tail = _after(text, ANSWER)
            return str(int(tail)) if tail and re.fullmatch(r"[0-9]+", tail) else None
        if fmt == "retuning":
            m = self._RESULT.fullmatch(self.answer_of(text)) if SOLUTION in text else None
        else:
            m = re.search(self._RESULT.pattern + r"\s*\Z", text)
        return str(int(m[1] + m[2])) if m else None

    def _truth(self, problem):
        return str(int(problem[0]) + int(problem[1]))


def _dp_array(items: Sequence[int]) -> list[int]:
    """``dp[i]``: the largest sum of non-adjacent items of ``items[i:]`` (0 for none)."""
    dp = [0] * (len(items) + 2)
    for i in reversed(range(len(items))):
        dp[i] = max(dp[i + 1], items[i] + dp[i + 2], 0)
    return dp[: len(items)]


def _chosen(sums: Sequence[int], items: Sequence[int], can_use: bool) -> list[int]:
    """The paper's chosen-indices list (1 chosen, 2 not) from the dp array ``sums``: an item is chosen when the
    previous one was not and ``sums[i] == items[i] + sums[i + 2]``; the lexicographically smallest optimum."""
    padded, out = [*sums, 0, 0], []
    for i, item in enumerate(items):
        take = can_use and padded[i] == item + padded[i + 2]
        out.append(1 if take else 2)
        can_use = not take
    return out


class _DP(TaskRules):
    name = "dp"
    min_length = 2
    default_lengths = (2, 5)
    _example = (3, 2, 1, 5, 2)
    _TOP = "Compute the maximum sum of nonadjacent subsequences of "
    _DP_CALL = "Create dp array "
    _IDX = re.compile(r"Create chosen indices array: sum array (.*), item array (.*), can use item (True|False)")
    _IDX_CALL = "Create chosen indices array: sum array {}, item array {}, can use item {}"
    _BASELINE = (
        "Given a sequence of integers, find a subsequence with the highest sum, such that no two numbers in the "
        'subsequence are adjacent in the original sequence.\n\nOutput a list with "1" for chosen numbers and "2" for '
        "unchosen ones. If multiple solutions exist, select the lexicographically smallest. Input = {}." + ANSWER
    )
    _SCRATCHPAD = "Question: Let's solve input = {}."
    _STEPS = {  # (sub-task, base case): what the model writes before its answer
        ("dp", True): "Return [0] if negative else element.",
        ("dp", False): "Append max(return[0], array[0] + return[1]) to return.",
        ("idx", True): "If there is only 1 item, return 1 if we should use it else 2.",
        ("idx", False): "Append 1 if False else 2.",
    }
    top_format = f"'{_TOP}[<ints>]\\nSolution: ' with at least 2 ints"
    call_format = f"'{_DP_CALL}[<ints>]' or '{_IDX_CALL.format('[<ints>]', '[<ints>]', 'True|False')}'"

    def finished_after_return(self, text, n_calls):
        """True after the top-level context's second return (the chosen indices): its final answer."""
        return _require_str("text", text).startswith(self._TOP) and _require_int("n_calls", n_calls) >= 2

    def _parse(self, prompt):
        body = prompt[: -len(SOLUTION)] if prompt.endswith(SOLUTION) else None
        if body is not None and body.startswith(self._TOP):
            items = _parse_list(body[len(self._TOP) :], "the top-level list")
            if len(items) < 2:
                raise ValueError(f"a top-level list has at least 2 items, got {items}")
            return ("top", items)
        if body is not None and body.startswith(self._DP_CALL):
            return ("dp", _parse_list(body[len(self._DP_CALL) :], "the dp sub-task's list"))
        m = self._IDX.fullmatch(body or "")
        if m is None:
            raise ValueError(f"neither a top-level problem nor one of {self.call_format}, then '\\nSolution: '")
        sums, items = _parse_list(m[1], "the sum array"), _parse_list(m[2], "the item array")
        if len(sums) != len(items):
            raise ValueError(f"sum array {m[1]} and item array {m[2]} differ in length")
        return ("idx", sums, items, m[3] == "True")

    def _prompt(self, ctx):
        if ctx[0] == "idx":
            return self._IDX_CALL.format(_fmt_list(ctx[1]), _fmt_list(ctx[2]), ctx[3]) + SOLUTION
        return (self._TOP if ctx[0] == "top" else self._DP_CALL) + _fmt_list(ctx[1]) + SOLUTION

    def _children(self, ctx):
        if ctx[0] == "top":
            return [("dp", ctx[1]), ("idx", tuple(_dp_array(ctx[1])), ctx[1], True)]
        if len(ctx[1]) == 1:
            return []
        if ctx[0] == "dp":
            return [("dp", ctx[1][1:])]
        _, sums, items, can_use = ctx
        return [("idx", sums[1:], items[1:], _chosen(sums, items, can_use)[0] == 2)]

    def _answer(self, ctx):
        if ctx[0] == "dp":
            return _fmt_list(_dp_array(ctx[1]))
        if ctx[0] == "idx":
            return _fmt_list(_chosen(ctx[1], ctx[2], ctx[3]))
        return self._truth(ctx[1])

    def _preamble(self, ctx):
        if ctx[0] == "dp":
            return "Call with array minus first element. "
        if ctx[0] == "idx":
            return (
                "If there is only 1 item, return 1 if we should use it else 2. "
                "If we should use the first item to get the sum, call False else True. "
            )
        return ""

    def _answer_output(self, ctx):
        return self._STEPS[ctx[0], len(ctx[1]) == 1] + ANSWER + self._answer(ctx)

    def _callable(self, ctx):
        return ctx[0] != "top"

    def _check_context(self, ctx):
        if ctx[0] == "idx" and list(ctx[1]) != _dp_array(ctx[2]):
            raise ValueError(
                f"sum array {_fmt_list(ctx[1])} is not the dp array of item array {_fmt_list(ctx[2])}, "
                f"which is {_fmt_list(_dp_array(ctx[2]))}"
            )

    def _root(self, problem):
        return ("top", problem)

    def _problem_of(self, ctx):
        return ctx[1]

    def _normalize(self, problem):
        return _int_items("dp", problem, min_len=2)

    def _sample(self, length, rng):
        return tuple(rng.randint(-5, 5) for _ in range(length))

    def _prompt_in(self, fmt, problem):
        return (self._BASELINE if fmt == "baseline" else self._SCRATCHPAD).format(_fmt_list(problem))

    def _parse_in(self, fmt, prompt):
        head, _, tail = (self._BASELINE if fmt == "baseline" else self._SCRATCHPAD).partition("{}")
        if not (prompt.startswith(head) and prompt.endswith(tail)) or len(prompt) < len(head) + len(tail):
            raise ValueError("the text around the list differs")
        items = _parse_list(prompt[len(head) : len(prompt) - len(tail)], "the list")
        if len(items) < 2:
            raise ValueError(f"a list has at least 2 items, got {items}")
        return items

    def _single_output(self, fmt, problem):
        return self._truth(problem) if fmt == "baseline" else _dp_scratchpad(problem)

    def _final(self, fmt, text):
        if fmt == "scratchpad":
            m = re.search(rf"output=({_LIST})\.\s*\Z", text)
            tail = m[1] if m else None
        elif fmt == "retuning":  # the last return, as the paper's evaluation reads it
            _, found, tail = text.rpartition("Return: ")
            tail = tail.partition("\n")[0].strip() if found else None
        else:
            tail = _after(text, ANSWER)
        try:
            return _fmt_list(_parse_list(tail, "the answer")) if tail is not None else None
        except ValueError:
            return None

    def _truth(self, problem):
        return _fmt_list(_chosen(_dp_array(problem), problem, True))


def _dp_scratchpad(items: Sequence[int]) -> str:
    """The paper's DP scratchpad: the dp array from the right, then the chosen indices from the left."""
    n, dp = len(items), _dp_array(items)
    lines = []
    for i in reversed(range(n)):
        if i == n - 1:
            terms, values = f"input[{i}], 0", f"{items[i]}, 0"
        elif i == n - 2:
            terms, values = f"input[{i}], input[{i + 1}], 0", f"{items[i]}, {items[i + 1]}, 0"
        else:
            terms, values = f"dp[{i + 1}], input[{i}] + dp[{i + 2}], 0", f"{dp[i + 1]}, {items[i]} + {dp[i + 2]}, 0"
        lines.append(f"dp[{i}] = max({terms}) = max({values}) = {dp[i]}\n")
    text = "Scratchpad: " + "".join(lines)
    text += (
        "\nFinally, we reconstruct the lexicographically smallest subsequence that fulfills the task objective by "
        'selecting numbers as follows. We store the result on a list named "output".\n\nLet can_use_next_item = True.\n'
    )
    result = _chosen(dp, items, True)
    for i, r in enumerate(result):
        rel = "==" if r == 1 else "!="
        lhs, rhs = (
            (f"input[{i}]", f"{items[i]}") if i >= n - 2 else (f"input[{i}] + dp[{i + 2}]", f"{items[i]} + {dp[i + 2]}")
        )
        cond = "and can_use_next_item == True" if r == 1 else "or can_use_next_item == False"
        text += f"Since dp[{i}] {rel} {lhs} ({dp[i]} {rel} {rhs}) {cond}, we store output[{i}] = {r}."
        text += f" We update can_use_next_item = {r == 2}.\n" if i < n - 1 else "\n"
    return text + f"\nReconstructing all together, output={_fmt_list(result)}."


class _Parity(TaskRules):
    name = "parity"
    default_lengths = (1, 21)
    return_prefix = "\nReturn: "
    top_format = "'What is the parity of [<bits>]?\\nSolution: ' with bits 0 or 1"
    call_format = "'What is the parity of [<bits>]?'"
    _example = (1, 0, 1)
    _PROMPT = re.compile(r"What is the parity of (.*)\?" + SOLUTION)

    def _parse(self, prompt):
        m = self._PROMPT.fullmatch(prompt)
        if m is None:
            raise ValueError("not 'What is the parity of [...]?\\nSolution: '")
        bits = _parse_list(m[1], "the bit list")
        if any(b not in (0, 1) for b in bits):
            raise ValueError(f"the bit list has bits 0 or 1 only, got {m[1]}")
        return bits

    def _prompt(self, ctx):
        return f"What is the parity of {_fmt_list(ctx)}?{SOLUTION}"

    def _children(self, ctx):
        return [ctx[1:]] if len(ctx) > 1 else []

    def _answer(self, ctx):
        return str(sum(ctx) % 2)

    def _normalize(self, problem):
        return _int_items("parity", problem, allowed=range(2))

    def _sample(self, length, rng):
        return tuple(rng.randint(0, 1) for _ in range(length))

    def _prompt_in(self, fmt, problem):
        return f"What is the parity of {_fmt_list(problem)}?" + (SOLUTION if fmt != "baseline" else ANSWER)

    def _single_output(self, fmt, problem):
        if fmt == "baseline":
            return self._truth(problem)
        return "Compute one element at a time." + "".join(f" {sum(problem[: i + 1]) % 2}" for i in range(len(problem)))

    def _final(self, fmt, text):
        if fmt == "scratchpad":
            m = re.search(r"Compute one element at a time\.(?: [01])* ([01])\s*\Z", text)
            return m[1] if m else None
        tail = (self.answer_of(text) if SOLUTION in text else None) if fmt == "retuning" else _after(text, ANSWER)
        return tail if tail in ("0", "1") else None

    def _truth(self, problem):
        return str(sum(problem) % 2)


TASKS: dict[str, TaskRules] = {rules.name: rules for rules in (_Addition(), _DP(), _Parity())}


def get_task(name: str) -> TaskRules:
    """The rules of task ``name`` (a key of :data:`TASKS`); ``ValueError`` listing the known tasks otherwise."""
    _require_str("task", name)
    if name not in TASKS:
        raise ValueError(f"unknown Re-Tuning task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS[name]


def _get_format(fmt: str) -> str:
    if _require_str("fmt", fmt) not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; known formats: {list(FORMATS)}")
    return fmt


def sample_problem(task: str, length: int, rng: random.Random):
    """A random problem of ``length`` from ``rng``: addition, two digit strings zero-padded to ``length`` digits
    (one operand has exactly ``length`` digits, the other a uniform number in ``1..length``, in random order); dp,
    ``length`` ints in ``[-5, 5]`` (``length >= 2``); parity, ``length`` bits."""
    rules = get_task(task)
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    return rules._sample(_require_int("length", length, rules.min_length), rng)


def top_prompt(task: str, fmt: str, problem) -> str:
    """The evaluation (top-level) prompt of ``problem`` in format ``fmt``: addition ``(a, b)`` as non-negative ints
    or digit strings (zero-padded to equal length), dp a list of at least 2 ints, parity a list of bits."""
    rules, fmt = get_task(task), _get_format(fmt)
    problem = rules._normalize(problem)
    return rules._prompt(rules._root(problem)) if fmt == "retuning" else rules._prompt_in(fmt, problem)


def problem_pairs(task: str, fmt: str, problem) -> list[dict[str, str]]:
    """The training pairs of one problem (:func:`top_prompt` for its forms). Re-Tuning: two pairs per context with a
    call (the call, then the answer after the return), one for a base case, in the order a driver meets them
    (the DP top level has two calls and no answer pair). Scratchpad and baseline: one pair."""
    rules, fmt = get_task(task), _get_format(fmt)
    problem = rules._normalize(problem)
    if fmt == "retuning":
        return rules._chain(rules._root(problem))
    return [{"input": rules._prompt_in(fmt, problem), "output": rules._single_output(fmt, problem)}]


def generate_pairs(
    task: str, fmt: str, n_problems: int, lengths: tuple[int, int] | None = None, seed: int = 0
) -> list[dict[str, str]]:
    """Training data: the :func:`problem_pairs` of ``n_problems`` problems, each of a length drawn uniformly from
    ``lengths = (lo, hi)`` (inclusive; default the paper's range: addition (1, 15) digits, dp (2, 5) items, parity
    (1, 21) bits) with ``random.Random(seed)``. A JSON-able list of ``{"input", "output"}``; the loss goes on
    ``output`` only, and the trainer appends EOS to it. The paper's per-length resampling is left to the caller."""
    rules, fmt = get_task(task), _get_format(fmt)
    _require_int("n_problems", n_problems, 1)
    _require_int("seed", seed)
    lo, hi = rules.default_lengths if lengths is None else _lengths(lengths, rules)
    rng = random.Random(seed)
    pairs = []
    for _ in range(n_problems):
        pairs += problem_pairs(task, fmt, rules._sample(rng.randint(lo, hi), rng))
    return pairs


def _lengths(lengths: object, rules: TaskRules) -> tuple[int, int]:
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence) or len(lengths) != 2:
        raise TypeError(f"lengths must be a pair (lo, hi), got {lengths!r}")
    lo, hi = (_require_int("lengths", v) for v in lengths)
    if not rules.min_length <= lo <= hi:
        raise ValueError(f"lengths must satisfy {rules.min_length} <= lo <= hi for {rules.name}, got {tuple(lengths)}")
    return lo, hi


def validate_pair(task: str, fmt: str, pair: dict[str, str]) -> None:
    """Check one training pair against the task's ground truth, recomputed from the problem parsed out of its
    input; ``ValueError`` saying what is wrong (malformed input, a return or step that is not the problem's, a
    wrong output and where it departs from the right one)."""
    rules, fmt = get_task(task), _get_format(fmt)
    if not isinstance(pair, dict) or set(pair) != {"input", "output"}:
        raise TypeError(f"pair must be a dict with keys 'input' and 'output', got {pair!r}")
    inp, out = _require_str("pair['input']", pair["input"]), _require_str("pair['output']", pair["output"])
    if fmt != "retuning":
        want = rules._single_output(fmt, rules._parse_top(fmt, inp))
        if out != want:
            raise ValueError(f"wrong {fmt} {task} output for {inp!r}: {_difference(out, want)}")
        return
    cut = inp.find(SOLUTION)
    try:
        ctx = rules._parse(inp[: cut + len(SOLUTION)] if cut >= 0 else inp)
    except ValueError as e:
        raise ValueError(f"malformed {task} input: {e}") from None
    rules._check_context(ctx)
    level = list(rules._level(ctx))
    for want_in, want_out, _ in level:
        if inp == want_in:
            if out != want_out:
                raise ValueError(f"wrong {task} output for {inp!r}: {_difference(out, want_out)}")
            return
    nearest = max((w for w, _, _ in level), key=lambda w: _common_prefix(w, inp))
    raise ValueError(f"{task} input is not a step of the problem it states: {_difference(inp, nearest)}")


def final_answer_of(task: str, fmt: str, text: str) -> str | None:
    """The canonical final answer in a finished top-level text (prompt and everything after it) of format ``fmt``,
    or ``None`` if it cannot be parsed: addition the sum as an integer string (the carry prepended when 1, no
    leading zeros), dp the chosen-indices list ``'[1, 2, 1]'``, parity ``'0'`` or ``'1'``."""
    rules, fmt = get_task(task), _get_format(fmt)
    return rules._final(fmt, _require_str("text", text))


def ground_truth(task: str, prompt: str) -> str:
    """The correct final answer of a top-level prompt of any format, in :func:`final_answer_of`'s form."""
    rules = get_task(task)
    errors = []
    for fmt in FORMATS:
        try:
            return rules._truth(rules._parse_top(fmt, prompt))
        except ValueError as e:
            errors.append(str(e))
    raise ValueError("; ".join(errors))
