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


def target_loss(model: PeftModel, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of the target tokens, the output layer applied to their predicting positions only."""
    network = model.get_base_model()
    hidden = network.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logits = network.get_output_embeddings()(hidden[batch.target_rows, batch.target_cols - 1]).float()
    softcap = getattr(network.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.nn.functional.cross_entropy(logits, batch.input_ids[batch.target_rows, batch.target_cols])


def train_adapter(network: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                  args: argparse.Namespace) -> tuple[PeftModel, list[float]]:
    """LoRA on `network` trained one pass over `examples` (linear warm-up, then linear decay); returns it and the
    loss of every step."""
    torch.manual_seed(args.seed)
    model = get_peft_model(network, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                               target_modules=TARGET_MODULES))
    trainable = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (args.steps - step) / (args.steps - warmup + 1)))
    encoded = [encode(tokenizer, example) for example in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.train()
    losses: list[float] = []
    started = time.perf_counter()
    for step in range(args.steps):
        batch = make_batch(encoded[step * args.batch_size : (step + 1) * args.batch_size], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
            loss = target_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step + 1}/{args.steps}  loss {losses[-1]:.3f}  {time.perf_counter() - started:.0f} s",
                  flush=True)
    model.eval()
    return model, losses


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
        model, losses = train_adapter(network, tokenizer, train, args)
        seconds = time.perf_counter() - started
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"{task}: the loss diverged; try a lower --lr")
        tail = losses[-10:]
        record = {
            "task": task, "base_model": base_name, "command": command, "steps": args.steps,
            "batch_size": args.batch_size, "examples": len(train), "lr": args.lr, "rank": args.rank,
            "alpha": args.alpha, "target_modules": TARGET_MODULES, "precision": args.precision, "seed": args.seed,
            "seconds": round(seconds, 1), "first_loss": round(losses[0], 4),
            "final_loss": round(sum(tail) / len(tail), 4), "threads": torch.get_num_threads(),
        }
        save_adapter(model, args.out / task, base_name, record)
        print(f"{task}: {seconds:.0f} s, loss {losses[0]:.3f} -> {record['final_loss']:.3f}, saved to "
              f"{args.out / task}", flush=True)
        network = model.unload()  # the base model again, LoRA removed, for the next task


if __name__ == "__main__":
    main()
