"""Baselines: fine-tune the backbone itself (LoRA or full) on the same personalization data, with the summary
written as text in the system turn. This trains a *copy* saved elsewhere, only to compare against; softthought
never trains its backbone.

    python -m train_aux.finetune --mode lora --out runs/ft-lora
    python -m train_aux.finetune --mode full --out runs/ft-full
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from softthought.backbone import load_backbone
from softthought.splice import build_chat_prompt, with_system_text

from .data import read_jsonl
from .train import Examples, TrainConfig, lr_factor, target_loss


def finetune(mode: str, out: Path, steps: int, batch_size: int, lr: float, data_dir: Path, seed: int,
             backbone_name: str | None, dtype: str, max_target: int) -> Path:
    torch.manual_seed(seed)
    base = load_backbone(backbone_name, dtype=dtype)
    model, tok = base.model, base.tokenizer
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj", "up_proj", "down_proj", "gate_proj"]))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    cfg = TrainConfig(steps=steps, warmup_steps=min(20, steps // 5 + 1))
    examples = Examples(read_jsonl(data_dir / "train_users.jsonl"), read_jsonl(data_dir / "answers.jsonl"), seed)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc=f"finetune/{mode}", unit="step"):
        for g in optimizer.param_groups:
            g["lr"] = lr * lr_factor(step, cfg)
        batch = [examples.sample() for _ in range(batch_size)]
        prompts = [build_chat_prompt(tok, with_system_text(tok, [{"role": "user", "content": ex.prompt}], ex.summary))
                   for ex in batch]
        loss, _ = target_loss(model, model.get_input_embeddings(), tok, prompts, [ex.target for ex in batch], max_target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 10 == 0:
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps({"step": step + 1, "loss": loss.item(), "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
    if mode == "lora":
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["lora", "full"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, help="default: 2e-4 for LoRA, 2e-5 for full")
    ap.add_argument("--data-dir", default="train_aux/data")
    ap.add_argument("--backbone")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-target-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    lr = a.lr or (2e-4 if a.mode == "lora" else 2e-5)
    print(finetune(a.mode, Path(a.out), a.steps, a.batch_size, lr, Path(a.data_dir), a.seed, a.backbone, a.dtype,
                   a.max_target_tokens))


if __name__ == "__main__":
    main()
