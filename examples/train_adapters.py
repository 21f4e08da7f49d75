"""Train the lesson's three LoRA adapters (style, summary, entities) with PEFT, on a CPU, in minutes each.

    python examples/train_adapters.py                      # loraserve's default model -> examples/adapters/<task>/
    python examples/train_adapters.py --model DIR_OR_GGUF --out /tmp/adapters --steps 20

Each adapter folder holds what loraserve loads with `adapter_source=local` (`adapter_config.json`,
`adapter_model.safetensors`) and `training.json`, the run's settings, losses and time, which score_adapters.py reports.

Why the loop is shaped as it is:
- The default model is read by transformers from the same GGUF file loraserve serves, dequantized to float32
  (tests/test_default_model.py checks that both loaders give bit-identical weights), and tokenized by loraserve's own
  conversion of the file's tokenizer: training sees what serving will.
- Only the LoRA weights train. The loss covers the target tokens only, and the output layer (Gemma 3's 262k-row
  vocabulary, most of a step's work) runs only at the positions that predict them.
- Matrix products run under bfloat16 autocast, faster than float32 on CPUs with AMX or AVX-512 BF16, and the
  precision loraserve serves in; the LoRA weights and Adam's state stay float32.
- LoRA on all seven projections (attention and MLP) at rank 8: QLoRA found that adapting every linear layer is what
  matches full fine-tuning, which matters most when a few minutes of steps must teach a new output format; the
  adapter is still a few MB. Serving it costs more per token than q/v-only LoRA (benchmarks/RESULTS.md), a trade the
  lesson shows rather than hides.
- Targets end with the tokenizer's EOS, so a served adapter stops by itself where the answer ends.
- Each step also holds the adapter to the base model on text that is not its task: the other two tasks' training
  texts, where the loss is the KL divergence from the base model's next-token distribution to the adapter's (the
  base model with the adapter switched off is the teacher; the other tasks' reference answers are never a target).
  Without it an adapter taught to answer in one format takes probability from everything else (a summary adapter
  raised the base model's perplexity on telegrams 2.8-fold); with it the adapter learns to act only where its
  instruction is. score_adapters.py checks the effect on held-out rows and on prose no adapter saw.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from loraserve.config import EngineConfig
from loraserve.models.default_model import DEFAULT_MODEL_NAME, default_model_path
from loraserve.models.gguf import gguf_tokenizer

from lesson_data import HELDOUT_SIZE, TASKS, Example, split

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_OUT = Path(__file__).parent / "adapters"


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, longest], right-padded
    attention_mask: torch.Tensor
    target_rows: torch.Tensor  # (row, column) of every target token, flattened
    target_cols: torch.Tensor


def load_base(model: str | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """(float32 transformers model, tokenizer, name for adapter_config.json) of a .gguf file or an HF folder;
    None is loraserve's default model."""
    cache_dir = EngineConfig().cache_dir
    if model is None or model.endswith(".gguf"):
        path = default_model_path(cache_dir) if model is None else Path(model)
        network = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = gguf_tokenizer(path, cache_dir / "tokenizers")
        return network, tokenizer, DEFAULT_MODEL_NAME if model is None else path.name
    return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32), AutoTokenizer.from_pretrained(model), model


def encode(tokenizer: PreTrainedTokenizerBase, example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids + EOS). The prompt is tokenized alone, as a server tokenizes a request's prompt."""
    prompt = tokenizer(example.prompt)["input_ids"]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, target


def make_batch(encoded: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right padding, so every sequence's positions (and so its rotary angles) are those it has when served alone."""
    longest = max(len(prompt) + len(target) for prompt, target in encoded)
    input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    rows, cols = [], []
    for row, (prompt, target) in enumerate(encoded):
        length = len(prompt) + len(target)
        input_ids[row, :length] = torch.tensor(prompt + target)
        attention_mask[row, :length] = 1
        rows += [row] * len(target)
        cols += range(len(prompt), length)
    return Batch(input_ids, attention_mask, torch.tensor(rows), torch.tensor(cols))


def logits_at(model: PeftModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor) -> torch.Tensor:
    """float32 next-token logits at positions (rows, cols) only: the output layer never sees the other positions."""
    network = model.get_base_model()
    hidden = network.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    logits = network.get_output_embeddings()(hidden[rows, cols]).float()
    softcap = getattr(network.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def target_loss(model: PeftModel, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the target tokens, the output layer applied to their predicting positions only."""
    logits = logits_at(model, batch.input_ids, batch.attention_mask, batch.target_rows, batch.target_cols - 1)
    return torch.nn.functional.cross_entropy(logits, batch.input_ids[batch.target_rows, batch.target_cols])


def keep_loss(model: PeftModel, batch: Batch) -> torch.Tensor:
    """KL(base || adapted) of the next-token distributions at the batch's positions: zero when the adapter leaves
    the base model's predictions there as they were."""
    with torch.no_grad(), model.disable_adapter():
        teacher = logits_at(model, batch.input_ids, batch.attention_mask, batch.target_rows, batch.target_cols)
    student = logits_at(model, batch.input_ids, batch.attention_mask, batch.target_rows, batch.target_cols)
    return torch.nn.functional.kl_div(student.log_softmax(-1), teacher.log_softmax(-1), log_target=True,
                                      reduction="batchmean")


def keep_batch(texts: Sequence[list[int]], pad_id: int, positions: int, generator: torch.Generator) -> Batch:
    """Whole texts, right-padded; `positions` of their tokens drawn at random as the positions the KL covers."""
    longest = max(map(len, texts))
    input_ids = torch.full((len(texts), longest), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(texts):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    rows, cols = attention_mask.nonzero(as_tuple=True)
    chosen = torch.randperm(rows.numel(), generator=generator)[:positions]
    return Batch(input_ids, attention_mask, rows[chosen], cols[chosen])


def train_adapter(network: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                  keep: list[Example], args: argparse.Namespace) -> tuple[PeftModel, list[float], list[float]]:
    """LoRA on `network` trained one pass over `examples` (linear warm-up, then linear decay), held to the base
    model on `keep`; returns it, the task loss and the keep loss of every step."""
    torch.manual_seed(args.seed)
    model = get_peft_model(network, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                               target_modules=TARGET_MODULES))
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (args.steps - step) / (args.steps - warmup + 1)))
    encoded = [encode(tokenizer, example) for example in examples]
    keep_texts = [sum(encode(tokenizer, example), []) for example in keep]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    losses: list[float] = []
    keep_losses: list[float] = []
    started = time.perf_counter()
    for step in range(args.steps):
        batch = make_batch(encoded[step * args.batch_size : (step + 1) * args.batch_size], pad_id)
        held = keep_batch(keep_texts[step * args.keep_batch_size : (step + 1) * args.keep_batch_size], pad_id,
                          args.keep_positions, generator) if args.keep_weight else None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
            loss = target_loss(model, batch)
            held_loss = keep_loss(model, held) if held is not None else torch.zeros(())
        (loss + args.keep_weight * held_loss).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        keep_losses.append(held_loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step + 1}/{args.steps}  loss {losses[-1]:.3f}  keep KL {keep_losses[-1]:.4f}  "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    model.eval()
    return model, losses, keep_losses


def keep_examples(task: str, count: int, seed: int) -> list[Example]:
    """`count` training-split examples of the other tasks, alternating between them: what the adapter for `task`
    is held to the base model on. Never a held-out example."""
    others = [split(other, count, HELDOUT_SIZE, seed=seed)[0] for other in TASKS if other != task]
    return [example for group in zip(*others) for example in group][:count]


def save_adapter(model: PeftModel, folder: Path, base_name: str, record: dict) -> None:
    """The PEFT files loraserve reads, plus training.json; PEFT's blank model card is left out. No embedding layer
    is adapted, so PEFT need not look the base model up (on the Hub, for a name) to decide whether to save one."""
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(folder, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a .gguf file or an HF model folder (default: loraserve's default model)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="adapters go to OUT/<task>/")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--keep-weight", type=float, default=1.0,
                        help="weight of the KL to the base model on the other tasks' texts (0: off)")
    parser.add_argument("--keep-batch-size", type=int, default=4, help="other tasks' texts per step")
    parser.add_argument("--keep-positions", type=int, default=64, help="of their tokens, how many the KL covers")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the LoRA initialisation")
    parser.add_argument("--precision", choices=("bfloat16", "float32"), default="bfloat16",
                        help="autocast dtype of the matrix products")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    command = shlex.join(["python", "examples/train_adapters.py", *(sys.argv[1:] if argv is None else argv)])
    network, tokenizer, base_name = load_base(args.model)
    for task in args.tasks:
        # the held-out examples are always the scorer's full set, whatever share of it a scoring run uses
        train, _ = split(task, args.steps * args.batch_size, HELDOUT_SIZE, seed=args.seed)
        print(f"{task}: {len(train)} examples, {args.steps} steps of {args.batch_size}", flush=True)
        started = time.perf_counter()
        keep = keep_examples(task, args.steps * args.keep_batch_size, args.seed)
        model, losses, keep_losses = train_adapter(network, tokenizer, train, keep, args)
        seconds = time.perf_counter() - started
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{task}: the loss diverged; try a lower --lr")
        tail, keep_tail = losses[-10:], keep_losses[-10:]
        record = {
            "task": task, "base_model": base_name, "command": command, "steps": args.steps,
            "batch_size": args.batch_size, "examples": len(train), "lr": args.lr, "rank": args.rank,
            "alpha": args.alpha, "target_modules": TARGET_MODULES, "precision": args.precision, "seed": args.seed,
            "seconds": round(seconds, 1), "first_loss": round(losses[0], 4),
            "final_loss": round(sum(tail) / len(tail), 4), "threads": torch.get_num_threads(),
            "keep_weight": args.keep_weight, "keep_batch_size": args.keep_batch_size,
            "keep_positions": args.keep_positions, "keep_tasks": [other for other in TASKS if other != task],
            "first_keep_kl": round(keep_losses[0], 4), "final_keep_kl": round(sum(keep_tail) / len(keep_tail), 4),
        }
        save_adapter(model, args.out / task, base_name, record)
        print(f"{task}: {seconds:.0f} s, loss {losses[0]:.3f} -> {record['final_loss']:.3f}, saved to "
              f"{args.out / task}", flush=True)
        network = model.unload()  # the base model again, LoRA removed, for the next task


if __name__ == "__main__":
    main()
