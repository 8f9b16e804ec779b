"""Check that Hugging Face PEFT, given an adapter from `cartridge export --to peft`, computes the
log-probabilities our runtime computes with the `.cart` it came from (a manual check of the layout,
positions and RoPE convention; CI does not need torch).

    cartridge generate --raw --json --cartridge F.cart --prompt TEXT --max-tokens 1 \
        --top-logprobs 5 > ours.json
    cartridge export --to peft F.cart ADAPTER
    python3 scripts/check_peft_export.py ours.json ADAPTER [MODEL.gguf]

Needs torch, transformers, gguf and peft (>= 0.18, which has the CARTRIDGE adapter type). MODEL
defaults to the SmolLM2 GGUF that scripts/fetch-model.sh fetches; transformers dequantises it to
f32 as our loader does. Measured on SmolLM2-135M with a 128-token composed cartridge: the largest
difference over the top 5 is 1.2e-5, while the model without the adapter is off by up to 1.7.
"""

import json
import os
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    ours_path, adapter = sys.argv[1], sys.argv[2]
    default = os.path.expanduser(
        "~/.cache/cartridge/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    gguf = sys.argv[3] if len(sys.argv) == 4 else default
    ours = json.load(open(ours_path))
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()
    ids = torch.tensor([ours["prompt_ids"]])
    with torch.no_grad():
        base = torch.log_softmax(model(input_ids=ids).logits[0, -1].double(), -1)
        peft_model = PeftModel.from_pretrained(model, adapter).eval()
        logits = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        with_adapter = torch.log_softmax(logits[0, -1].double(), -1)
    worst, base_worst = 0.0, 0.0
    for token, logprob in ours["top_logprobs"][0]:
        peft_lp, base_lp = with_adapter[token].item(), base[token].item()
        print(f"token {token:6d}: ours {logprob:9.5f}  peft {peft_lp:9.5f}  no adapter {base_lp:9.5f}")
        worst = max(worst, abs(peft_lp - logprob))
        base_worst = max(base_worst, abs(base_lp - logprob))
    print(f"max |ours - peft| = {worst:.2e} (without the adapter: {base_worst:.2e})")
    sys.exit(0 if worst < 1e-3 else 1)


if __name__ == "__main__":
    main()
