"""Draw docs/information_flow_tiny.png: information_flow on a tiny random-weight GPT-2 (the README's plot).

    python scripts/plot_information_flow.py [--out docs/information_flow_tiny.png]

Random weights carry no ICL ability, so the curves show the workflow's output format, not the paper's finding
(S_wp shallow, S_pq deep), which needs a trained model such as GPT2-XL.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastattn_icl.methods import PromptBuilder, information_flow  # noqa: E402
from tests.data.icl_sentiment import LABEL_WORDS, TEMPLATE, dataset, word_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "information_flow_tiny.png"))
    args = ap.parse_args()
    builder = PromptBuilder(word_tokenizer(), TEMPLATE, LABEL_WORDS, dataset(4, seed=1))
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64,
        n_layer=8,
        n_head=4,
        vocab_size=100,
        n_positions=128,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        initializer_range=0.1,
    )
    model = GPT2LMHeadModel(config).eval()
    examples = [builder.example(x, y) for x, y in dataset(16, seed=2)]
    flow = information_flow(model, examples, builder.label_token_ids, batch_size=4)
    flow.plot(args.out, title="information flow, tiny random GPT-2 (8 layers, 16 prompts)")
    print(f"wrote {args.out}")
    for layer, (wp, pq, ww) in enumerate(flow.normalised_mean.tolist()):
        print(f"layer {layer}: S_wp {wp:.3f}  S_pq {pq:.3f}  S_ww {ww:.3f}")


if __name__ == "__main__":
    main()
