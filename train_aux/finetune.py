"""Baselines: fine-tune the backbone itself (LoRA or full) on the same personalization data, with the summary
written as text in the system turn, or on one user's examples alone with no summary (`--user`). This trains a *copy*
saved elsewhere, only to compare against; softthought never trains its backbone.

    python -m train_aux.finetune --mode lora --out runs/ft-lora      # 100 steps, as RESULTS.md's baseline
    python -m train_aux.finetune --mode full --out runs/ft-full      # 80 steps
    python -m train_aux.finetune --mode lora --user eval-0000 --out runs/ft-lora-eval-0000   # one user's copy
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from softthought.backbone import load_backbone
from softthought.splice import build_chat_prompt, with_system_text

from .data import read_jsonl
from .train import Examples, TrainConfig, data_hash, lr_factor, target_loss

DEFAULT_LR = {"lora": 2e-4, "full": 2e-5}
DEFAULT_STEPS = {"lora": 100, "full": 80}  # the budgets of the baselines in RESULTS.md


@dataclass(frozen=True)
class FinetuneConfig:
    """How a fine-tuned copy is trained; saved beside it as finetune.json, so a report reuses a copy only when it was
    trained as asked."""
    mode: str  # "lora" (r=16 on every projection, merged before saving) or "full"
    steps: int
    lr: float
    batch_size: int = 8
    seed: int = 0
    dtype: str = "float32"
    max_target_tokens: int = 96


def recipe(cfg: FinetuneConfig, data_dir: Path) -> dict:
    """What finetune.json records: the config and the data trained on, so a copy is not reused after the data changed."""
    return {**asdict(cfg), "data_hash": data_hash(data_dir)}


def finetune(cfg: FinetuneConfig, out: Path, data_dir: Path, backbone_name: str | None = None,
             user: dict | None = None, device: str = "cpu") -> Path:
    """Train and save a fine-tuned copy. With `user`, the copy learns that one user's examples alone, with no summary
    in the prompt: the per-user fine-tune that soft thoughts replace (its finetune.json names the user)."""
    torch.manual_seed(cfg.seed)
    base = load_backbone(backbone_name, dtype=cfg.dtype, device=device)
    model, tok = base.model, base.tokenizer
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj", "up_proj", "down_proj", "gate_proj"]))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = TrainConfig(steps=cfg.steps, warmup_steps=min(20, cfg.steps // 5 + 1))
    users = [user] if user else read_jsonl(data_dir / "train_users.jsonl")
    examples = Examples(users, read_jsonl(data_dir / "answers.jsonl"), cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "log.jsonl").write_text("")  # no resume: a new copy, a new log
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc=f"finetune/{cfg.mode}", unit="step"):
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, schedule)
        batch = [examples.sample() for _ in range(cfg.batch_size)]
        chats = [[{"role": "user", "content": ex.prompt}] for ex in batch]
        prompts = [build_chat_prompt(tok, chat if user else with_system_text(tok, chat, ex.summary))
                   for chat, ex in zip(chats, batch)]
        loss, _ = target_loss(model, model.get_input_embeddings(), tok, prompts, [ex.target for ex in batch],
                              cfg.max_target_tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (step + 1) % 10 == 0:
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps({"step": step + 1, "loss": loss.item(), "elapsed_s": round(time.perf_counter() - t0, 1)}) + "\n")
    if cfg.mode == "lora":
        model = model.merge_and_unload()
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "finetune.json").write_text(json.dumps({**recipe(cfg, data_dir), **({"user": user["user"]} if user else {})},
                                                  indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["lora", "full"], required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, help="default: 100 for LoRA, 80 for full")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, help="default: 2e-4 for LoRA, 2e-5 for full")
    ap.add_argument("--data-dir", default="train_aux/data")
    ap.add_argument("--backbone")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-target-tokens", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (a GPU if one is visible)")
    ap.add_argument("--user", help="fine-tune on this one user's examples only, with no summary in the prompt")
    ap.add_argument("--users", help="where --user is found (default: DATA_DIR/eval_users.jsonl)")
    a = ap.parse_args(argv)
    if a.users and not a.user:
        ap.error("--users names where --user is looked up: pass --user ID with it")
    user = None
    if a.user:
        users_file = Path(a.users or Path(a.data_dir) / "eval_users.jsonl")
        if not users_file.is_file():
            ap.error(f"--user {a.user}: no users file at {users_file}")
        user = next((u for u in read_jsonl(users_file) if u["user"] == a.user), None)
        if user is None:
            ap.error(f"--user {a.user}: no such user in {users_file}")
    cfg = FinetuneConfig(a.mode, a.steps or DEFAULT_STEPS[a.mode], a.lr or DEFAULT_LR[a.mode], a.batch_size, a.seed, a.dtype,
                         a.max_target_tokens)
    print(finetune(cfg, Path(a.out), Path(a.data_dir), a.backbone, user, a.device))


if __name__ == "__main__":
    main()
