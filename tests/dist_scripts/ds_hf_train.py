"""An ordinary HF Trainer script (never imports microadam_dist): a tiny randomly
initialised Llama trained with `--deepspeed ds.json`, whose JSON names MicroAdam.

Launched by tests/test_launch.py through launch/deepspeed.sh. Rank 0 writes a
JSON report to OUTPUT_DIR/report.json: the optimizer DeepSpeed built, the logged
losses, and how far the weights moved.
"""

import json
import os

import deepspeed
import deepspeed.ops
import torch
from transformers import HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

VOCAB, SEQ = 128, 16


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    # Test speed only: skip the JIT build of DeepSpeed's CPU shared-memory all-reduce (~80 s).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64))
    trainer.train()
    engine = trainer.model_wrapped
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=hasattr(params[0][1], "ds_id")):
        moved = sum(int(not torch.equal(p.detach().float().cpu(), before[n].float())) for n, p in params)
    report = {"optimizer": type(engine.basic_optimizer).__name__, "zero_stage": engine.zero_optimization_stage(),
              "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
              "lrs": [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h],
              "moved": moved, "params": len(params), "global_step": trainer.state.global_step,
              "world": int(os.environ.get("WORLD_SIZE", 1))}
    if args.process_index == 0:
        with open(os.path.join(args.output_dir, "report.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
