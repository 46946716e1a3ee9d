"""Re-Tuning inference (Pasewark et al., ACL 2024): greedy decoding of a model that calls itself on subproblems.

A context is a prompt and what the model writes after it. When the model's output contains ``Call: `` and a
newline after it, the context stops there; the text in between (the call) becomes a sub-prompt
(``task.child_prompt``) that the same model answers in a fresh context, recursively. The child's answer
(``task.answer_of`` of its whole text) goes back to the parent as ``task.return_text(answer)``, and the parent
goes on from there, possibly calling again; EOS ends a context (so does ``task.finished_after_return``).

    results = retune_generate(model, tokenizer, ["73199 + 21439\\nSolution: "], task="addition")
    results[0].answer, results[0].correct, results[0].tree.children[0].prompt, results[0].prefilled_tokens

Two loops with the same results (texts, greedy tokens, answers, call trees, failures):

- :func:`retune_generate` keeps a parent's KV cache while its child runs and, after the return, prefills only the
  return text (plus the newline that ended the call, generated but not yet fed) onto it; contexts at one recursion
  depth that are ready to run (top-level prompts, children of different parents, parents after a return) run as
  one batch.
- :func:`reprefill_generate`, the reference loop: one problem at a time, each segment (the prompt, then the whole
  parent text after each return) prefilled from scratch, then decoded on a cache that is dropped at the next call.
  It is the oracle of the tests and the baseline of the benchmark.

Batching. Row ``i`` of a batch holds ``t_i`` cached positions (none for a fresh context) and ``p_i`` tokens still to
feed. The batch cache is ``[B, H, max t, D]`` per layer with each row's keys right-aligned, the input ``[B, max p]``
right-aligned, so a row reads ``[pad, its keys, pad, its tokens]``; the 2D attention mask marks the pads and the
position ids are the mask's running count, so every row sees the positions it would have alone. Each decode step
appends one column. A row that stops leaves the batch (the rest are index-selected, and leading columns no row
uses are cut); a row that stops at a call keeps its own keys (the mask's columns) until its child returns. Both
loops feed the same token ids: the prompt's, the generated ones, each return text's (tokenized on its own, so a
BPE tokenizer cannot merge across the boundary, as re-tokenizing the whole text would).

Budgets (per problem; exceeding one fails that problem alone, the rest of the batch goes on): ``max_depth``
(recursion depth of a context, the top level is 0), ``max_calls`` (calls in the whole tree), ``max_new_tokens``
(tokens one context generates, all its segments together). A call the task cannot parse, an answer ``answer_of``
rejects, or a final text without a parsable answer fail the problem too. ``RetuneResult.failure`` says which.

The driver builds its caches itself, of full ``DynamicLayer`` s that keep every position (the only kind it can split
into rows). Sliding-window models therefore keep all keys (the mask applies the window) and run with
``batch_size=1`` only: transformers counts the window in cache slots, padding included, so a padded row would see
fewer tokens than it does alone.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from fastattn_icl.integrations.cache_keyword import cache_kwargs, output_cache
from fastattn_icl.methods._model import frozen_weights, model_device
from fastattn_icl.methods.retuning.tasks import get_task

__all__ = ["CALL_MARKER", "CallNode", "RetuneResult", "reprefill_generate", "retune_generate", "sliding_window"]

CALL_MARKER = "Call: "
_TASK_METHODS = (
    "check_prompt",
    "child_prompt",
    "return_text",
    "answer_of",
    "finished_after_return",
    "final_answer",
    "ground_truth",
)


@dataclass(eq=False)
class CallNode:
    """One context of a problem's recursion: the top-level prompt (depth 0) or the sub-prompt of a call.

    ``text`` is the context's whole text where it stopped (prompt, generated text and return texts, no EOS);
    ``answer`` what it returned (``task.answer_of(text)``), ``None`` if it did not finish. ``logits``
    (``return_logits=True``) is ``[generated_tokens, V]``: the logits each greedy token was chosen from, in order.
    ``prefilled_tokens`` counts the tokens fed in prefill passes, ``generated_tokens`` the greedy tokens (EOS too).
    """

    prompt: str
    depth: int
    text: str = ""
    answer: str | None = None
    children: list[CallNode] = field(default_factory=list)
    generated_tokens: int = 0
    prefilled_tokens: int = 0
    logits: torch.Tensor | None = None

    def nodes(self) -> list[CallNode]:
        """This node and its descendants, depth first in call order."""
        return [self, *(n for child in self.children for n in child.nodes())]


@dataclass(eq=False)
class RetuneResult:
    """One problem: ``answer`` is ``task.final_answer`` of the top-level text (``None`` on failure), ``expected``
    ``task.ground_truth(prompt)``, ``failure`` ``None`` or why the problem stopped (which budget, what was
    unparsable). Token counts sum over the call tree."""

    prompt: str
    answer: str | None
    expected: str
    correct: bool
    tree: CallNode
    failure: str | None

    @property
    def calls(self) -> int:
        return len(self.tree.nodes()) - 1

    @property
    def prefilled_tokens(self) -> int:
        return sum(n.prefilled_tokens for n in self.tree.nodes())

    @property
    def generated_tokens(self) -> int:
        return sum(n.generated_tokens for n in self.tree.nodes())


class _Failure(Exception):
    """A problem stops: the message goes to ``RetuneResult.failure``."""


# -- arguments ------------------------------------------------------------------------------------------------------


def _resolve_task(task: Any) -> Any:
    if isinstance(task, str):
        return get_task(task)  # ValueError naming the known tasks
    missing = [m for m in _TASK_METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise TypeError(f"task must be a task name or an object with the methods {list(_TASK_METHODS)}; "
                        f"{type(task).__name__} lacks {missing}")
    return task


def _check_budget(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window of a model with sliding-window layers (Mistral, Gemma-2, Qwen2 with
    ``use_sliding_window``), ``None`` for full attention everywhere."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(text, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return getattr(text, "sliding_window", None)


def _check_arguments(tokenizer, prompts, task, budgets: dict[str, Any]) -> Any:
    task = _resolve_task(task)
    for name, value in budgets.items():
        _check_budget(name, value)
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{i}] must be a str, got {type(prompt).__name__}")
        try:
            task.check_prompt(prompt)
        except ValueError as e:
            raise ValueError(f"prompts[{i}] is not a prompt of the task {getattr(task, 'name', task)!r}: {e}") from e
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError("the tokenizer has no eos_token_id: EOS is what ends a context")
    return task


# -- pieces both loops share -----------------------------------------------------------------------------------------


def _find_call(segment: str) -> str | None:
    """The call in a context's generated text since its last return, once the line that carries it is complete."""
    start = segment.find(CALL_MARKER)
    if start < 0:
        return None
    end = segment.find("\n", start + len(CALL_MARKER))
    return None if end < 0 else segment[start + len(CALL_MARKER) : end]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _forward(model, ids: torch.Tensor, mask: torch.Tensor, cache: DynamicCache) -> tuple[torch.Tensor, DynamicCache]:
    """Logits of the last input position ``[B, V]`` and the grown cache; positions count the mask's kept columns."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
    kwargs = cache_kwargs(cache, model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
    return out.logits[:, -1], output_cache(out)


class _Budget:
    """One problem's call count and the checks both loops make, in the same order, at a complete call line."""

    def __init__(self, task, max_depth: int, max_calls: int, max_new_tokens: int):
        self.task, self.max_depth, self.max_calls, self.max_new_tokens = task, max_depth, max_calls, max_new_tokens
        self.calls = 0

    def open_call(self, call: str, depth: int) -> str:
        self.calls += 1
        if self.calls > self.max_calls:
            raise _Failure(f"max_calls: call {self.calls} exceeds max_calls={self.max_calls}")
        if depth + 1 > self.max_depth:
            raise _Failure(f"max_depth: a call at depth {depth + 1} exceeds max_depth={self.max_depth}")
        try:
            child = self.task.child_prompt(call)
        except ValueError as e:
            raise _Failure(f"unparsable call {call!r}: {e}") from None
        return child

    def check_length(self, node: CallNode) -> None:
        if node.generated_tokens >= self.max_new_tokens:
            raise _Failure(f"max_new_tokens: a context at depth {node.depth} generated {node.generated_tokens} tokens "
                           "without EOS or a complete call")

    def answer_of(self, text: str) -> str:
        try:
            return self.task.answer_of(text)
        except ValueError as e:
            raise _Failure(f"unparsable answer: {e}") from None


def _result(task, prompt: str, tree: CallNode, failure: str | None) -> RetuneResult:
    expected = task.ground_truth(prompt)
    answer = None
    if failure is None:
        answer = task.final_answer(tree.text)
        if answer is None:
            failure = f"unparsable final answer in {tree.text[-40:]!r}"
    return RetuneResult(prompt, answer, expected, failure is None and answer == expected, tree, failure)


# -- the batched loop with KV reuse ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Context:
    problem: int
    node: CallNode
    parent: _Context | None
    text: str  # up to the current segment
    pending: list[int]  # tokens not yet fed: the next prefill
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per cache layer [H, t, D], only while it waits
    segment: list[int] = field(default_factory=list)  # generated since the last return
    returns: int = 0
    logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def cached(self) -> int:
        return 0 if self.kv is None else self.kv[0][0].shape[1]


def _batch_cache(kvs: list[list[tuple[torch.Tensor, torch.Tensor]] | None], width: int) -> DynamicCache:
    """Rows' caches right-aligned in ``[B, H, width, D]`` per layer (zeros where a row has fewer positions)."""
    if width == 0:
        return DynamicCache()
    layers = next(kv for kv in kvs if kv is not None)
    data = []
    for layer, (k0, v0) in enumerate(layers):
        k = k0.new_zeros(len(kvs), k0.shape[0], width, k0.shape[2])
        v = v0.new_zeros(len(kvs), v0.shape[0], width, v0.shape[2])
        for row, kv in enumerate(kvs):
            if kv is not None:
                t = kv[layer][0].shape[1]
                k[row, :, width - t :], v[row, :, width - t :] = kv[layer]
        data.append((k, v))
    return DynamicCache(ddp_cache_data=data)


def _cache_layers(cache: DynamicCache, mask: torch.Tensor) -> list:
    layers = list(cache.layers)
    if any(layer.keys.shape[2] != mask.shape[1] for layer in layers):
        raise RuntimeError("a cache layer does not hold every position (a sliding-window or other cache): the "
                           "Re-Tuning driver can only split caches of full DynamicLayers into rows")
    return layers


def _row_kv(cache: DynamicCache, mask: torch.Tensor, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    keep = mask[row].bool()
    return [(layer.keys[row][:, keep], layer.values[row][:, keep]) for layer in _cache_layers(cache, mask)]


def _select_rows(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> tuple[DynamicCache, torch.Tensor]:
    index = torch.tensor(rows, device=mask.device)
    mask = mask[index]
    start = int(mask.any(0).int().argmax())  # leading columns that only left rows used
    layers = _cache_layers(cache, mask)
    data = [(layer.keys[index][:, :, start:], layer.values[index][:, :, start:]) for layer in layers]
    return DynamicCache(ddp_cache_data=data), mask[:, start:]


class _Driver:
    def __init__(self, model, tokenizer, task, budgets: dict[str, int], batch_size: int, return_logits: bool):
        self.model, self.tokenizer, self.task, self.batch_size = model, tokenizer, task, batch_size
        self.budgets, self.return_logits = budgets, return_logits
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.device = model_device(model)
        self.ready: dict[int, collections.deque[_Context]] = collections.defaultdict(collections.deque)

    def run(self, prompts: list[str], progress: bool) -> list[RetuneResult]:
        self.results: list[RetuneResult | None] = [None] * len(prompts)
        self.problems = [_Budget(self.task, **self.budgets) for _ in prompts]
        self.prompts, self.bar = prompts, tqdm(total=len(prompts), desc="re-tuning", disable=not progress)
        for i, prompt in enumerate(prompts):
            self._start(i, CallNode(prompt, 0), None)
        with self.bar:
            while any(self.ready.values()):
                depth = max(d for d, queue in self.ready.items() if queue)  # deepest first: finishes problems early
                queue = self.ready[depth]
                self._run_segment([queue.popleft() for _ in range(min(self.batch_size, len(queue)))])
        return self.results

    def _start(self, problem: int, node: CallNode, parent: _Context | None) -> None:
        context = _Context(problem, node, parent, node.prompt, _encode(self.tokenizer, node.prompt))
        self.ready[node.depth].append(context)

    def _run_segment(self, batch: list[_Context]) -> None:
        width, new = max(c.cached for c in batch), max(len(c.pending) for c in batch)
        ids = torch.full((len(batch), new), self.pad, dtype=torch.long)
        mask = torch.zeros(len(batch), width + new, dtype=torch.long)
        for row, c in enumerate(batch):
            ids[row, new - len(c.pending) :] = torch.tensor(c.pending)
            mask[row, width - c.cached : width] = 1
            mask[row, width + new - len(c.pending) :] = 1
            c.node.prefilled_tokens += len(c.pending)
        ids, mask = ids.to(self.device), mask.to(self.device)
        cache = _batch_cache([c.kv for c in batch], width)
        for c in batch:
            c.kv, c.pending = None, []
        logits, cache = _forward(self.model, ids, mask, cache)
        live = batch
        while True:
            tokens = logits.argmax(-1)
            going = []
            for row, c in enumerate(live):
                state = self._on_token(c, int(tokens[row]), logits[row])
                if state == "call":
                    c.kv, c.pending = _row_kv(cache, mask, row), [int(tokens[row])]
                elif state == "continue":
                    going.append(row)
            if not going:
                return
            if len(going) < len(live):
                cache, mask = _select_rows(cache, mask, going)
                live, tokens = [live[row] for row in going], tokens[going]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            logits, cache = _forward(self.model, tokens[:, None], mask, cache)

    def _on_token(self, c: _Context, token: int, logits: torch.Tensor) -> str:
        """``"continue"``, ``"call"`` (waits for a child) or ``"stop"`` (finished or failed)."""
        c.node.generated_tokens += 1
        if self.return_logits:
            c.logits.append(logits.detach().clone())
        try:
            if token == self.eos:
                self._finish(c)
                return "stop"
            c.segment.append(token)
            piece = _decode(self.tokenizer, c.segment)
            call = _find_call(piece)
            if call is not None:
                c.text, c.segment = c.text + piece, []
                child = CallNode(self.problems[c.problem].open_call(call, c.node.depth), c.node.depth + 1)
                c.node.children.append(child)
                self._start(c.problem, child, c)
                return "call"
            self.problems[c.problem].check_length(c.node)
            return "continue"
        except _Failure as failure:
            self._fail(c, str(failure))
            return "stop"

    def _close(self, c: _Context) -> None:
        c.node.text = c.text + _decode(self.tokenizer, c.segment)
        if c.logits:
            c.node.logits = torch.stack(c.logits)

    def _finish(self, c: _Context) -> None:
        self._close(c)
        c.node.answer = self.problems[c.problem].answer_of(c.node.text)
        parent = c.parent
        if parent is None:
            self._done(c.problem, c.node, None)
            return
        back = self.task.return_text(c.node.answer)
        parent.text += back
        parent.returns += 1
        if self.task.finished_after_return(parent.text, parent.returns):
            self._finish(parent)
        else:
            parent.pending += _encode(self.tokenizer, back)
            self.ready[parent.node.depth].append(parent)

    def _fail(self, c: _Context | None, failure: str) -> None:
        root = None
        while c is not None:  # the waiting ancestors hold no other live context of this problem
            self._close(c)
            c.kv, root, c = None, c, c.parent
        self._done(root.problem, root.node, failure)

    def _done(self, problem: int, tree: CallNode, failure: str | None) -> None:
        self.results[problem] = _result(self.task, self.prompts[problem], tree, failure)
        self.bar.update(1)


def retune_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    task: Any,
    max_depth: int = 64,
    max_calls: int = 256,
    max_new_tokens: int = 1024,
    batch_size: int = 16,
    return_logits: bool = False,
    progress: bool = True,
) -> list[RetuneResult]:
    """Greedy Re-Tuning inference of ``prompts`` with KV reuse across calls and batching (see the module docstring).

    Args:
        model: a Hugging Face causal LM (any attention implementation, ``"fastattn_icl"`` included) that takes
            ``input_ids [B, T]``, a 2D ``attention_mask [B, cached + T]`` (1 = keep), ``position_ids [B, T]`` and a
            ``DynamicCache``; it runs in eval mode without weight gradients, both restored on return.
        tokenizer: its tokenizer (``eos_token_id`` required; ``pad_token_id`` defaults to EOS), e.g.
            :func:`~fastattn_icl.methods.retuning.tokenizer.char_tokenizer`.
        prompts: top-level prompts of ``task`` (``task.check_prompt``).
        task: a task name (``fastattn_icl.methods.retuning.tasks.TASKS``) or a task object.
        max_depth, max_calls, max_new_tokens: the per-problem budgets (module docstring), ints >= 1.
        batch_size: most contexts in one forward; 1 for sliding-window models (:func:`sliding_window`).
        return_logits: keep every step's logits in the call tree (``CallNode.logits``).
        progress: a progress bar over finished problems.

    Returns:
        one :class:`RetuneResult` per prompt, in order. A problem that fails (a budget, an unparsable call or
        answer) has ``failure`` set; it never stops the others. Bad arguments raise ``ValueError``/``TypeError``.
    """
    budgets = dict(max_depth=max_depth, max_calls=max_calls, max_new_tokens=max_new_tokens)
    task = _check_arguments(tokenizer, prompts, task, {**budgets, "batch_size": batch_size})
    window = sliding_window(model)
    if window is not None and batch_size > 1:
        raise ValueError(
            f"the model attends within a sliding window ({window}), which transformers' masks count in cache slots, "
            "padding included: a padded row would see fewer tokens than alone. Run it with batch_size=1 (still "
            "with KV reuse)"
        )
    with frozen_weights(model), torch.no_grad():
        return _Driver(model, tokenizer, task, budgets, batch_size, return_logits).run(list(prompts), progress)


# -- the reference loop ----------------------------------------------------------------------------------------------


def reprefill_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    task: Any,
    max_depth: int = 64,
    max_calls: int = 256,
    max_new_tokens: int = 1024,
    batch_size: int = 16,
    return_logits: bool = False,
    progress: bool = True,
) -> list[RetuneResult]:
    """The reference loop of Re-Tuning's evaluation, with :func:`retune_generate`'s arguments and results: one
    problem at a time (``batch_size`` is checked, not used), and after every return the whole parent text is
    prefilled again from scratch."""
    budgets = dict(max_depth=max_depth, max_calls=max_calls, max_new_tokens=max_new_tokens)
    task = _check_arguments(tokenizer, prompts, task, {**budgets, "batch_size": batch_size})
    device, eos = model_device(model), tokenizer.eos_token_id

    def solve(node: CallNode, budget: _Budget) -> None:
        ids, node.text, returns, steps = _encode(tokenizer, node.prompt), node.prompt, 0, []
        try:
            while True:
                node.prefilled_tokens += len(ids)
                row = torch.tensor([ids], device=device)
                logits, cache = _forward(model, row, torch.ones_like(row), DynamicCache())
                segment, call = [], None
                while True:
                    token = int(logits[0].argmax())
                    node.generated_tokens += 1
                    if return_logits:
                        steps.append(logits[0].clone())
                    if token == eos:
                        break
                    segment.append(token)
                    call = _find_call(_decode(tokenizer, segment))
                    if call is not None or node.generated_tokens >= budget.max_new_tokens:
                        break
                    ids.append(token)
                    mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
                    logits, cache = _forward(model, torch.tensor([[token]], device=device), mask, cache)
                node.text += _decode(tokenizer, segment)
                if token == eos:
                    node.answer = budget.answer_of(node.text)
                    return
                if call is None:
                    budget.check_length(node)
                ids.append(token)
                child = CallNode(budget.open_call(call, node.depth), node.depth + 1)
                node.children.append(child)
                solve(child, budget)
                back = task.return_text(child.answer)
                node.text += back
                ids += _encode(tokenizer, back)
                returns += 1
                if task.finished_after_return(node.text, returns):
                    node.answer = budget.answer_of(node.text)
                    return
        finally:
            if steps:
                node.logits = torch.stack(steps)

    results = []
    with frozen_weights(model), torch.no_grad():
        for prompt in tqdm(prompts, desc="re-tuning (re-prefill)", disable=not progress):
            tree, failure = CallNode(prompt, 0), None
            try:
                solve(tree, _Budget(task, **budgets))
            except _Failure as e:
                failure = str(e)
            results.append(_result(task, prompt, tree, failure))
    return results
