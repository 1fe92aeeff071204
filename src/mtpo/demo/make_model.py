"""Make the demo's SFT model: tokenizer + tiny Llama, taught the tool format with `mtpo sft`.

    python -m mtpo.demo.make_model                       # writes src/mtpo/demo/model/ (2.9 MB)
    python -m mtpo.demo.make_model --out DIR --steps 300 # a quick, worse one elsewhere

Steps: (1) SFT trajectories for training-split problems (`task.sft_trajectory`: the correct plan or
the kind's misconception at its rate, plus rare slips); (2) the BPE tokenizer learnt from their
text (`tokenizer.build_tokenizer`); (3) a randomly initialised Llama (hidden 128, 2 layers, 0.72 M
parameters); (4) mtpo's own masked SFT trainer (`mtpo.trainers.sft.train_sft`) on those
trajectories — assistant turns trained, question and tool outputs context only; (5) the weights
(safetensors, float32), tokenizer and chat template copied into the output folder, plus
`make_model.json` (the settings and the final loss) so the model can be reproduced.
The demo ships this folder, so `mtpo demo` does not pay for SFT (31 minutes on 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from random import Random

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mtpo.config import load_config
from mtpo.demo import task
from mtpo.demo.tokenizer import build_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "model")
SHIPPED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
           "tokenizer_config.json", "chat_template.jinja")


def write_sft_data(path: str, n: int, seed: int) -> tuple[list[str], float]:
    """`n` SFT conversations as JSONL; returns their texts (tokenizer corpus) and the share correct."""
    r = Random(f"mtpo-demo/sft/{seed}")
    texts, correct = ["user\nmodel\n"], 0
    with open(path, "w", encoding="utf-8") as f:
        for p in task.make_problems(seed, n, "train"):
            messages, ok = task.sft_trajectory(p, r)
            correct += ok
            texts += [m["content"] for m in messages]
            f.write(json.dumps({"messages": messages}) + "\n")
    return texts, correct / n


def tiny_llama(tokenizer, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, dtype="float32")
    return LlamaForCausalLM(config)


def make_model(out: str, *, n: int, steps: int, seed: int, hidden: int, layers: int, lr: float,
               batch_size: int) -> dict:
    """Build, train and save the demo model into `out`; returns what `make_model.json` records."""
    with tempfile.TemporaryDirectory(prefix="mtpo-demo-model-") as work:
        data = os.path.join(work, "sft.jsonl")
        texts, share = write_sft_data(data, n, seed)
        tokenizer = build_tokenizer(texts)
        init = os.path.join(work, "init")
        model = tiny_llama(tokenizer, hidden, layers, seed)
        model.save_pretrained(init)
        tokenizer.save_pretrained(init)
        params = sum(p.numel() for p in model.parameters())
        from mtpo.trainers.sft import SFTConfig, train_sft

        config = load_config(SFTConfig, None, model_name_or_path=init, train_data=data,
                             output_dir=os.path.join(work, "sft"), max_length=512, max_steps=steps,
                             per_device_train_batch_size=batch_size, learning_rate=lr, lr_scheduler_type="cosine",
                             warmup_steps=0.05, weight_decay=0.0, logging_steps=50, save_strategy="no",
                             report_to="none", use_cpu=True, seed=seed, dtype="float32", dataloader_drop_last=True)
        summary = train_sft(config)
        os.makedirs(out, exist_ok=True)
        for name in SHIPPED:
            src = os.path.join(config.output_dir, name)
            if os.path.isfile(src):
                shutil.copy(src, os.path.join(out, name))
    record = {"seed": seed, "sft_rows": n, "sft_rows_correct": round(share, 4), "steps": steps, "hidden": hidden,
              "layers": layers, "learning_rate": lr, "batch_size": batch_size, "parameters": params,
              "vocab_size": len(tokenizer), "seconds": summary["seconds"],
              "final_loss": summary.get("last_log", {}).get("loss"),
              "misconception_rate": task.MISCONCEPTION_RATE, "slip_rate": task.SLIP_RATE}
    with open(os.path.join(out, "make_model.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mtpo.demo.make_model", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: the packaged model)")
    parser.add_argument("--n", type=int, default=20000, help="SFT trajectories")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    record = make_model(args.out, n=args.n, steps=args.steps, seed=args.seed, hidden=args.hidden,
                        layers=args.layers, lr=args.lr, batch_size=args.batch_size)
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
