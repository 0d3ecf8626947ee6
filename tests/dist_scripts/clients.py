"""Worker for tests/test_clients.py: MicroAdam checkpointed by the training frameworks'
own calls under FSDP2, on the CPU with gloo: `torchrun --nproc_per_node 2 clients.py --out DIR`.

The method of dcp_stock.py: model A trains, the framework checkpoints it, A trains on (the
uninterrupted run). Model B, from another seed (after steps on other batches where the
framework loads into a live optimizer), is resumed from the checkpoint by the framework and
trains the same steps. Each rank compares its own local params and MicroAdam state with
A's, bitwise, after the load and after every later step.

The frameworks run as their users call them. Where one refuses the CPU, the scenario makes
the smallest change that lets it run, and this list names it:
  torchtune: the full-finetune recipe's calls. Synchronous: `CheckpointClient.save_checkpoint`
      (`training.get_full_optimizer_state_dict`, rank 0 writes recipe_state.pt), every rank
      reads it (`load_base_checkpoint`) and `training.load_from_full_optimizer_state_dict`.
      Asynchronous: `DistributedCheckpointer` (`optimizer.state_dict()`, `dcp.async_save`),
      `load_distributed_checkpoint` (`_init_optim_state`, `dcp.load`, `set_state_dict`).
      With gloo alone the async save's collectives and FSDP's share one communicator, so A
      waits for the save before it trains on. The recipe catches an exception of
      `load_distributed_checkpoint` and trains on from the base weights with a warning;
      called directly here, any failure surfaces.
  Lightning Fabric: `ModelParallelStrategy` (FSDP2) `fabric.save` / `fabric.load`, distributed
      and full checkpoints. `FSDPStrategy` (FSDP1): `fabric.save` raises the error that
      names microadam_dist.integrations.fsdp.save_checkpoint, which round-trips. Fabric's
      connector refuses the exact class FSDPStrategy with accelerator="cpu", and FSDP1 wraps
      on a CPU only with device_id=cpu: an unchanged subclass, and the model wrapped by hand
      (which Fabric accepts).
  Accelerate: `Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))`,
      `prepare`, `save_state` / `load_state`, SHARDED_STATE_DICT and FULL_STATE_DICT (the
      plugin's offload_to_cpu / rank0_only), fp32 and bf16 mixed precision. Accelerate selects
      FSDP only on an accelerator (on the CPU its state stays MULTI_CPU and ignores the
      plugin): `CpuFsdpAccelerator` sets FSDP the way Accelerate's state does on a GPU.
  HF Trainer: FSDP2 through that Accelerator (the Trainer refuses `optimizers=` under FSDP),
      a tiny Llama, `optimizer_cls_and_kwargs=(MicroAdam, ...)`, checkpoint at step 5 of 8,
      `train(resume_from_checkpoint=...)`; a callback snapshots every step.
Each rank writes OUT/clients_rank<R>.json: {scenario: result}, or {framework: {"missing": ...}}
for a framework that is not installed.
"""

import argparse
import datetime
import functools
import json
import os

import torch
import torch.distributed as dist

from dcp_stock import HYPER, differences, expect_failure, guarded, make_model, snapshot
from microadam_dist import MicroAdam
from microadam_dist.optim import local_tensor
from microadam_dist.teardown import finish

STEPS_BEFORE, STEPS_AFTER = 4, 3
FRAMEWORKS = ("torchtune", "fabric", "accelerate", "trainer")
VOCAB = 65  # odd: the embedding and output rows split unevenly over 2 ranks


class Run:
    """A model and its optimizer under one framework, with the framework's training step."""

    def __init__(self, model, opt, step):
        self.model, self.opt, self._step = model, opt, step

    def step(self, s: int, salt: int = 0) -> None:
        self._step(self.model, self.opt, s, salt)


def train_step(model, opt, s: int, salt: int, loss_fn, backward) -> None:
    """One step on batch (s, salt) of this rank, through the framework's backward."""
    g = torch.Generator().manual_seed(1000 * salt + 17 * s + dist.get_rank())
    backward(loss_fn(model, g))
    opt.step()
    opt.zero_grad(set_to_none=True)


def mlp_loss(model, g) -> torch.Tensor:
    x, y = torch.randn(8, 9, generator=g), torch.randn(8, 1, generator=g)
    return torch.nn.functional.mse_loss(model(x).float(), y)


def token_loss(model, g) -> torch.Tensor:
    tokens = torch.randint(0, VOCAB, (2, 16), generator=g)
    logits = model(tokens)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), tokens[:, 1:].reshape(-1))


def weight_decay_groups(model) -> list:
    """Two param groups (weights, biases), as trainers build them for weight decay."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n.endswith("weight")]},
            {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0}]


def resume_check(build, save, load, history: int = 0, wait=None) -> dict:
    """A = build(0): STEPS_BEFORE steps, `save` (then `wait`), STEPS_AFTER steps. B = build(1):
    `history` steps on other batches, B = load(B), the same STEPS_AFTER steps. Returns what
    the test asserts."""
    a = build(0)
    for s in range(STEPS_BEFORE):
        a.step(s)
    saved = snapshot(a.model, a.opt)
    save(a)
    if wait is not None:
        wait(a)
    res = {"after_save": differences(saved, snapshot(a.model, a.opt))}  # saving must not touch anything
    reference = []
    for s in range(STEPS_AFTER):
        a.step(STEPS_BEFORE + s)
        reference.append(snapshot(a.model, a.opt))
    b = build(1)
    for s in range(history):
        b.step(s, salt=7)
    res["differs_before_load"] = len(differences(saved, snapshot(b.model, b.opt)))
    b = load(b)
    res["after_load"] = differences(saved, snapshot(b.model, b.opt))
    res["after_steps"] = []
    for s in range(STEPS_AFTER):
        b.step(STEPS_BEFORE + s)
        res["after_steps"].append(differences(reference[s], snapshot(b.model, b.opt)))
    res.update(describe(b.model, b.opt))
    dist.barrier()
    return res


def describe(model, opt) -> dict:
    """What ran: MicroAdam (inside the framework's wrapper), the param types, each param's
    local size, the states and their keys."""
    params = list(model.parameters())
    return {"microadam": isinstance(getattr(opt, "optimizer", opt), MicroAdam),
            "param_types": sorted({type(p).__name__ for p in params}),
            "local_numels": [local_tensor(p).numel() for p in params],
            "state_entries": len(opt.state),
            "state_keys": sorted({k for st in opt.state.values() for k in st})}


# -- torchtune ---------------------------------------------------------------------------
TUNE_MODEL = {"_component_": "torchtune.models.llama3_2.llama3_2", "vocab_size": VOCAB, "num_layers": 2,
              "num_heads": 4, "num_kv_heads": 2, "embed_dim": 32, "max_seq_len": 32, "intermediate_dim": 64}


def torchtune_scenario(asynchronous: bool, tmp: str) -> dict:
    from omegaconf import OmegaConf
    from torch.distributed.device_mesh import init_device_mesh
    from torchtune import config, training
    from torchtune.training.checkpointing._checkpoint_client import CheckpointClient, TrainingProgress

    root = os.path.join(tmp, "torchtune-" + ("async" if asynchronous else "sync"))
    device = torch.device("cpu")
    if dist.get_rank() == 0:  # the base checkpoint a recipe starts from
        os.makedirs(os.path.join(root, "base"))
        torch.manual_seed(0)
        torch.save(config.instantiate(OmegaConf.create(TUNE_MODEL)).state_dict(), os.path.join(root, "base", "model.pt"))
    dist.barrier()
    mesh = init_device_mesh("cpu", (dist.get_world_size(), 1), mesh_dim_names=("dp", "tp"))
    optimizer = {"_component_": "microadam_dist.MicroAdam",
                 **{k: list(v) if isinstance(v, tuple) else v for k, v in HYPER.items()}}

    def setup(resume: bool) -> Run:
        """full_finetune_distributed's setup: base checkpoint, meta init, shard, full weights,
        the optimizer with its full state; with async checkpoints, the DCP checkpoint."""
        # Resuming a synchronous checkpoint, the recipe reads the saved epoch's weights.
        files = ["epoch_0/model-00001-of-00001.bin" if resume and not asynchronous else "model.pt"]
        cfg = OmegaConf.create({
            "device": "cpu", "resume_from_checkpoint": resume, "enable_async_checkpointing": asynchronous,
            "model": TUNE_MODEL, "optimizer": optimizer,
            "checkpointer": {"_component_": "torchtune.training.FullModelTorchTuneCheckpointer",
                             "checkpoint_dir": os.path.join(root, "base"), "checkpoint_files": files,
                             "model_type": "LLAMA3", "output_dir": os.path.join(root, "out")}})
        client = CheckpointClient(cfg)
        ckpt = client.load_base_checkpoint()
        with training.set_default_dtype(torch.float32), torch.device("meta"):
            model = config.instantiate(cfg.model)
        training.shard_model(model=model, cpu_offload=False, reshard_after_forward=True, dp_mesh=mesh["dp"],
                             shard_conditions=[functools.partial(training.get_shard_conditions, names_to_match=None)])
        with training.set_default_dtype(torch.float32), device:
            for m in model.modules():
                if hasattr(m, "rope_init"):
                    m.rope_init()
        training.load_from_full_model_state_dict(model, ckpt[training.MODEL_KEY], device, strict=True, cpu_offload=False)
        opt = config.instantiate(cfg.optimizer, model.parameters())
        if training.OPT_KEY in ckpt:
            training.load_from_full_optimizer_state_dict(model, opt, ckpt[training.OPT_KEY], device)
        if resume and asynchronous:
            client.load_distributed_checkpoint(model, opt)
        run = Run(model, opt, functools.partial(train_step, loss_fn=token_loss, backward=torch.Tensor.backward))
        run.client = client
        return run

    def save(run: Run) -> None:
        progress = TrainingProgress(seed=0, epochs_run=1, total_epochs=2, max_steps_per_epoch=STEPS_BEFORE)
        run.client.save_checkpoint(run.model, run.opt, progress, epoch=0)  # epoch 0 of 2: with the optimizer

    def wait(run: Run) -> None:
        # With gloo alone, the save's collectives (in its thread) and FSDP's share one
        # communicator: A trains on once the save is done. (The recipe waits at its next save.)
        future = run.client._get_dcp_checkpointer()._checkpoint_future
        if future is not None:
            future.result()
        dist.barrier()

    return resume_check(lambda seed: setup(False), save, lambda run: setup(True),
                        wait=wait if asynchronous else None)


# -- Lightning Fabric ----------------------------------------------------------------------
def fabric_model_parallel(distributed: bool, rows: int, history: int, tmp: str) -> dict:
    """ModelParallelStrategy (FSDP2): fabric.save / fabric.load of model, optimizer and metadata."""
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard

    def parallelize(model, mesh):
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh["data_parallel"])
        return fully_shard(model, mesh=mesh["data_parallel"])

    world = dist.get_world_size()
    fabric = Fabric(accelerator="cpu", devices=world, strategy=ModelParallelStrategy(
        parallelize, data_parallel_size=world, tensor_parallel_size=1, save_distributed_checkpoint=distributed))
    fabric.launch()
    step = functools.partial(train_step, loss_fn=mlp_loss, backward=fabric.backward)

    def build(seed: int) -> Run:
        model = fabric.setup_module(make_model(rows, seed))
        return Run(model, fabric.setup_optimizers(MicroAdam(weight_decay_groups(model), **HYPER)), step)

    path = os.path.join(tmp, "fabric-distributed" if distributed else "fabric-full.ckpt")
    restored = {}

    def load(run: Run) -> Run:
        state = {"model": run.model, "optimizer": run.opt, "steps": -1}
        fabric.load(path, state)
        restored["steps"] = state["steps"]
        return run

    res = resume_check(build, lambda run: fabric.save(path, {"model": run.model, "optimizer": run.opt,
                                                              "steps": STEPS_BEFORE}), load, history)
    res["metadata_steps"] = restored["steps"]
    res["checkpoint_is_dir"] = os.path.isdir(path)
    return res


def fabric_fsdp1(state_dict_type: str, tmp: str, helper_round_trip: bool) -> dict:
    """FSDPStrategy (FSDP1): fabric.save refuses by name and changes nothing; the named
    helper round-trips under Fabric."""
    from lightning_fabric import Fabric
    from lightning_fabric.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from microadam_dist.integrations import fsdp as helper

    class CpuFSDPStrategy(FSDPStrategy):
        """FSDPStrategy unchanged (Fabric's connector refuses the class itself on a CPU)."""

    fabric = Fabric(accelerator="cpu", devices=dist.get_world_size(),
                    strategy=CpuFSDPStrategy(state_dict_type=state_dict_type))
    fabric.launch()
    step = functools.partial(train_step, loss_fn=mlp_loss, backward=fabric.backward)

    def build(seed: int) -> Run:
        model = fabric.setup_module(FSDP(make_model(33, seed), device_id=torch.device("cpu")))
        return Run(model, fabric.setup_optimizers(MicroAdam(model.parameters(), **HYPER)), step)

    run = build(0)
    for s in range(2):
        run.step(s)
    before = snapshot(run.model, run.opt)
    # Fabric converts the entries in the dict's order. FSDP1's full model state dict fails
    # on a CPU inside torch with any optimizer (a freed flat-param storage on rank 0), so
    # there the optimizer comes first.
    state = ({"optimizer": run.opt, "model": run.model} if state_dict_type == "full"
             else {"model": run.model, "optimizer": run.opt})
    res = {"save": expect_failure(fabric.save, os.path.join(tmp, f"fabric-fsdp1-{state_dict_type}"), state),
           "untouched": differences(before, snapshot(run.model, run.opt))}
    if helper_round_trip:
        path = os.path.join(tmp, "fabric-fsdp1-helper")

        def load(b: Run) -> Run:
            helper.load_checkpoint(path, b.model, b.opt)
            return b

        res["helper"] = resume_check(build, lambda a: helper.save_checkpoint(path, a.model, a.opt), load, history=2)
    return res


# -- Accelerate and the HF Trainer -----------------------------------------------------------
def cpu_fsdp_accelerator():
    """accelerate.Accelerator that keeps its FSDP plugin on the CPU, where AcceleratorState
    would fall back to MULTI_CPU and drop it: it then does what AcceleratorState does for
    the plugin on a GPU (state.py); prepare, backward, save_state and load_state are
    Accelerate's own."""
    from accelerate import Accelerator
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    class CpuFsdpAccelerator(Accelerator):
        def __init__(self, *args, fsdp_plugin=None, **kwargs):
            super().__init__(*args, fsdp_plugin=fsdp_plugin, **kwargs)
            state = self.state
            if fsdp_plugin is not None and state.distributed_type == DistributedType.MULTI_CPU:
                state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
                if state.mixed_precision != "no":
                    fsdp_plugin.set_mixed_precision(state.mixed_precision)
                state.fsdp_plugin = fsdp_plugin

    return CpuFsdpAccelerator


def fresh_accelerate_state() -> None:
    """One Accelerator per process, as in a script: forget the last one's state."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def accelerate_scenario(state_dict_type: str, mixed_precision: str, rows: int, history: int, tmp: str) -> dict:
    from accelerate.utils import FullyShardedDataParallelPlugin

    accelerator_cls = cpu_fsdp_accelerator()
    path = os.path.join(tmp, f"accelerate-{state_dict_type}-{mixed_precision}")

    def build(seed: int) -> Run:
        fresh_accelerate_state()
        plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type=state_dict_type,
                                                reshard_after_forward=True)
        accelerator = accelerator_cls(cpu=True, mixed_precision=mixed_precision, fsdp_plugin=plugin)
        model = make_model(rows, seed)
        model, opt = accelerator.prepare(model, MicroAdam(weight_decay_groups(model), **HYPER))
        run = Run(model, opt, functools.partial(train_step, loss_fn=mlp_loss, backward=accelerator.backward))
        run.accelerator = accelerator
        return run

    def load(run: Run) -> Run:
        run.accelerator.load_state(path)
        return run

    res = resume_check(build, lambda run: run.accelerator.save_state(path), load, history)
    res["files"] = sorted(os.listdir(path))
    res.update(accelerate_facts())
    return res


def accelerate_facts() -> dict:
    """What the last Accelerator ran with: the distributed type and the plugin's state-dict
    options (offload_to_cpu, rank0_only: the StateDictOptions Accelerate derives)."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState()
    config = state.fsdp_plugin.state_dict_config
    return {"distributed_type": str(state.distributed_type), "fsdp_version": state.fsdp_plugin.fsdp_version,
            "offload_to_cpu": getattr(config, "offload_to_cpu", None), "rank0_only": getattr(config, "rank0_only", None)}


class TokenData(torch.utils.data.Dataset):
    """Random token windows, the same on every rank (the Trainer's sampler splits them)."""

    def __init__(self, n: int = 64, length: int = 16):
        self.tokens = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def trainer_scenario(state_dict_type: str, tmp: str) -> dict:
    """Run A trains 8 steps and checkpoints at step 5; run B, another model, resumes from that
    checkpoint. A callback snapshots params and state after every step and save (and at the
    start of training: A fresh, B after the Trainer loaded the checkpoint)."""
    import transformers
    import transformers.trainer

    transformers.trainer.Accelerator = cpu_fsdp_accelerator()  # the name the Trainer builds its Accelerator by
    checkpoint_step, steps = 5, 8

    class Snapshots(transformers.TrainerCallback):
        def __init__(self):
            self.trainer, self.taken = None, {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.taken["begin"] = snapshot(self.trainer.model, self.trainer.optimizer)

        def on_step_end(self, args, state, control, **kwargs):
            self.taken[state.global_step] = snapshot(self.trainer.model, self.trainer.optimizer)

        def on_save(self, args, state, control, **kwargs):
            self.taken[f"saved{state.global_step}"] = snapshot(self.trainer.model, self.trainer.optimizer)

    def train(seed: int, out: str, resume: str | None):
        fresh_accelerate_state()
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=32))
        args = transformers.TrainingArguments(
            output_dir=out, max_steps=steps, save_strategy="steps", save_steps=checkpoint_step,
            per_device_train_batch_size=2, use_cpu=True, report_to=[], logging_strategy="no", disable_tqdm=True,
            learning_rate=HYPER["lr"], weight_decay=HYPER["weight_decay"], seed=seed, data_seed=3,
            fsdp=True, fsdp_config={"version": 2, "state_dict_type": state_dict_type,
                                    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
        hyper = {k: v for k, v in HYPER.items() if k != "weight_decay"}  # the Trainer's groups set it
        callback = Snapshots()
        trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback],
                                       optimizer_cls_and_kwargs=(MicroAdam, hyper))
        callback.trainer = trainer
        trainer.train(resume_from_checkpoint=resume)
        return trainer, callback.taken

    out_a = os.path.join(tmp, f"trainer-{state_dict_type}-a")
    _, a = train(0, out_a, None)
    checkpoint = os.path.join(out_a, f"checkpoint-{checkpoint_step}")
    trainer, b = train(1, os.path.join(tmp, f"trainer-{state_dict_type}-b"), checkpoint)
    res = {"after_save": differences(a[checkpoint_step], a[f"saved{checkpoint_step}"]),
           "differs_before_load": len(differences(a[checkpoint_step], a["begin"])),
           "after_load": differences(a[checkpoint_step], b["begin"]),
           "after_steps": [differences(a[s], b[s]) for s in range(checkpoint_step + 1, steps + 1)],
           "checkpoint_files": sorted(os.listdir(checkpoint))}
    res.update(describe(trainer.model, trainer.optimizer))
    res.update(accelerate_facts())
    dist.barrier()
    return res


# -- the launch ------------------------------------------------------------------------------
def scenarios(tmp: str) -> dict:
    """framework -> {scenario: zero-argument call}."""
    p = functools.partial
    return {
        "torchtune": {"torchtune/full_sync": p(torchtune_scenario, False, tmp),
                      "torchtune/dcp_async": p(torchtune_scenario, True, tmp)},
        # 64 rows split evenly over 2 ranks, 65 unevenly.
        "fabric": {"fabric/distributed/64/0": p(fabric_model_parallel, True, 64, 0, tmp),
                   "fabric/distributed/65/2": p(fabric_model_parallel, True, 65, 2, tmp),
                   "fabric/full/65/0": p(fabric_model_parallel, False, 65, 0, tmp),
                   "fabric_fsdp1/sharded": p(fabric_fsdp1, "sharded", tmp, True),
                   "fabric_fsdp1/full": p(fabric_fsdp1, "full", tmp, False)},
        "accelerate": {"accelerate/SHARDED_STATE_DICT/no/65/0": p(accelerate_scenario, "SHARDED_STATE_DICT", "no", 65, 0, tmp),
                       "accelerate/FULL_STATE_DICT/no/65/2": p(accelerate_scenario, "FULL_STATE_DICT", "no", 65, 2, tmp),
                       "accelerate/SHARDED_STATE_DICT/bf16/64/2": p(accelerate_scenario, "SHARDED_STATE_DICT", "bf16", 64, 2, tmp)},
        "trainer": {"trainer/SHARDED_STATE_DICT": p(trainer_scenario, "SHARDED_STATE_DICT", tmp),
                    "trainer/FULL_STATE_DICT": p(trainer_scenario, "FULL_STATE_DICT", tmp)},
    }


MODULES = {"torchtune": "torchtune.training", "fabric": "lightning_fabric", "accelerate": "accelerate",
           "trainer": "transformers"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    args = ap.parse_args()
    # A rank that fails inside a collective must not leave the others waiting forever.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    tmp = os.path.join(args.out, "ckpt_clients")  # removed by the test
    results: dict = {}
    for framework, calls in scenarios(tmp).items():
        if framework not in args.only:
            continue
        try:
            __import__(MODULES[framework])
        except ImportError as exc:
            results[framework] = {"missing": f"{type(exc).__name__}: {exc}"}
            continue
        for key, call in calls.items():
            results[key] = guarded(call)
            dist.barrier()
    with open(os.path.join(args.out, f"clients_rank{rank}.json"), "w") as f:
        json.dump(results, f, indent=1)
    finish()  # the test removes the checkpoints


if __name__ == "__main__":
    main()
