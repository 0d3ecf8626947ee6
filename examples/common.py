"""Shared pieces of the examples and the convergence benchmark: corpora, tokenizer, model, metrics, plots.

Everything here works offline. Without `--model` a run uses a byte-level tokenizer
(256 bytes + 3 specials) and a Llama-architecture model built from a `LlamaConfig`
of a named size; the text comes from files every machine with Python and PyTorch
already has:

| corpus       | files                                                                          |
| ------------ | ------------------------------------------------------------------------------ |
| `python`     | the Python standard library's `.py` sources                                    |
| `cpp`        | PyTorch's C++ headers (`torch/include`)                                        |
| `pypackages` | the `.py` sources of installed packages (site-packages: torch, numpy, ...)     |
| `docs`       | prose: /usr/share/common-licenses, /usr/share/doc, installed packages' READMEs |
| PATH         | a text file, or every .txt/.md/.rst/.py file under a folder                    |

Files are split into train and eval by a hash of their path (1 in 20 is eval), so
held-out loss is measured on documents the model never saw.
"""

from __future__ import annotations

import glob
import gzip
import json
import math
import os
import sysconfig
import zlib
from typing import Iterable

import numpy as np
import torch

CORPORA = ("python", "cpp", "pypackages", "docs")

# Model sizes (byte vocabulary). Parameter counts: tiny ~0.9 M, small ~7 M, 25m ~26 M, 125m ~128 M,
# 350m ~307 M.
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=4),
    "25m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=12,
                 num_key_value_heads=12),
    "350m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=16),
}


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus BOS=256, EOS=257, PAD=258 (vocab 259). Needs no files."""

    bos_token_id, eos_token_id, pad_token_id = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str | bytes) -> np.ndarray:
        data = text.encode("utf-8", errors="ignore") if isinstance(text, str) else text
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer (for --model) behind the same encode() as ByteTokenizer."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(name)
        self.vocab_size = len(self.tok)
        self.eos_token_id = self.tok.eos_token_id if self.tok.eos_token_id is not None else 0

    def encode(self, text: str | bytes) -> np.ndarray:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="ignore")
        return np.asarray(self.tok(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def make_tokenizer(model: str | None):
    return HFTokenizer(model) if model else ByteTokenizer()


# -- corpora -------------------------------------------------------------------------------

def _site_packages() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def corpus_files(name: str) -> list[str]:
    """The sorted file list of a named corpus (see the module docstring) or of a path."""
    if os.path.isfile(name):
        return [name]
    if os.path.isdir(name):
        files = [f for ext in ("txt", "md", "rst", "py") for f in glob.glob(os.path.join(name, "**", f"*.{ext}"),
                                                                           recursive=True)]
    elif name == "python":
        files = []
        for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
            # installed packages live inside the stdlib folder: not part of this corpus
            dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
            files += [os.path.join(root, n) for n in names if n.endswith(".py")]
    elif name == "cpp":
        inc = os.path.join(os.path.dirname(torch.__file__), "include")
        files = [f for ext in ("h", "hpp", "cuh") for f in glob.glob(os.path.join(inc, "**", f"*.{ext}"),
                                                                     recursive=True)]
    elif name == "pypackages":
        files = [f for sp in _site_packages() for f in glob.glob(os.path.join(sp, "**", "*.py"), recursive=True)]
    elif name == "docs":
        files = glob.glob("/usr/share/common-licenses/*")
        for root, _, names in os.walk("/usr/share/doc"):
            files += [os.path.join(root, n) for n in names if not n.endswith((".html", ".htm", ".png", ".svg"))]
        for sp in _site_packages():
            for pat in ("*.dist-info/METADATA", "*.dist-info/LICENSE*", "*.dist-info/licenses/*"):
                files += glob.glob(os.path.join(sp, pat))
    else:
        raise SystemExit(f"unknown corpus {name!r}: expected one of {', '.join(CORPORA)} or an existing path")
    files = sorted({f for f in files if os.path.isfile(f)})
    if not files:
        raise SystemExit(f"corpus {name!r}: no files found")
    return files


def _read(path: str) -> bytes | None:
    try:
        with (gzip.open(path) if path.endswith(".gz") else open(path, "rb")) as f:
            data = f.read(4 << 20)
    except (OSError, EOFError, zlib.error):
        return None
    return None if b"\0" in data[:4096] else data  # binary file


def is_eval_file(path: str) -> bool:
    """1 file in 20 is held out, chosen by a hash of its path (stable across runs and machines)."""
    return zlib.crc32(path.encode()) % 20 == 0


def load_corpus(name: str, tokenizer, max_tokens: int, eval_tokens: int | None = None):
    """(train, eval): 1-D int64 token streams of at most max_tokens / eval_tokens, EOS between files.

    Raises SystemExit when a stream is too short to hold a single 2-token window.
    """
    eval_tokens = max_tokens // 10 if eval_tokens is None else eval_tokens
    limits = {False: max_tokens, True: eval_tokens}
    parts: dict[bool, list[np.ndarray]] = {False: [], True: []}
    count = {False: 0, True: 0}
    eos = np.asarray([tokenizer.eos_token_id], dtype=np.int32)
    for path in corpus_files(name):
        split = is_eval_file(path)
        if count[split] >= limits[split]:
            if count[not split] >= limits[not split]:
                break
            continue
        data = _read(path)
        if not data:
            continue
        ids = tokenizer.encode(data)
        parts[split] += [ids, eos]
        count[split] += ids.size + 1
    out = []
    for split in (False, True):
        stream = np.concatenate(parts[split]) if parts[split] else np.zeros(0, np.int32)
        stream = torch.from_numpy(stream[:limits[split]].astype(np.int64))
        if stream.numel() < 64:
            raise SystemExit(f"corpus {name!r}: only {stream.numel()} {'eval' if split else 'train'} tokens")
        out.append(stream)
    return out[0], out[1]


def batch_at(tokens: torch.Tensor, step: int, seed: int, batch: int, seq: int,
             rank: int = 0, world: int = 1) -> torch.Tensor:
    """(batch, seq) windows for (seed, step, rank), a pure function of them: every optimizer
    compared sees the same data, and a resumed run sees what the uninterrupted one did."""
    seq = min(seq, tokens.numel() - 1)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * world + rank)
    starts = torch.randint(0, tokens.numel() - seq, (batch,), generator=g)
    return torch.stack([tokens[s:s + seq] for s in starts.tolist()])


def eval_windows(tokens: torch.Tensor, count: int, seq: int) -> torch.Tensor:
    """`count` evenly spaced (count, seq) windows of the eval stream: the same every time."""
    seq = min(seq, tokens.numel() - 1)
    starts = torch.linspace(0, tokens.numel() - seq - 1, count).long()
    return torch.stack([tokens[s:s + seq] for s in starts.tolist()])


# -- model ------------------------------------------------------------------------------

def build_model(model: str | None = None, size: str = "tiny", vocab: int = ByteTokenizer.vocab_size,
                seed: int = 0, max_len: int = 2048, dtype: torch.dtype = torch.float32):
    """A Hugging Face causal LM: `model` loaded (hub id or path), else a fresh Llama of `size`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    if model:
        return AutoModelForCausalLM.from_pretrained(model, torch_dtype=dtype)
    if size not in SIZES:
        raise SystemExit(f"unknown --size {size!r}: expected one of {', '.join(SIZES)}")
    config = LlamaConfig(vocab_size=vocab, max_position_embeddings=max_len, tie_word_embeddings=False,
                         bos_token_id=ByteTokenizer.bos_token_id, eos_token_id=ByteTokenizer.eos_token_id,
                         pad_token_id=ByteTokenizer.pad_token_id, **SIZES[size])
    return LlamaForCausalLM(config).to(dtype)


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Activation checkpointing per decoder layer (non-reentrant: one backward, so hooks on the
    params run in it), through the name this transformers version has."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms and biases), as usual for Llama training."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `floor` at `total` (step is 1-based)."""
    if step <= warmup:
        return step / max(1, warmup)
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in optimizer.state (this rank's share under ZeRO/FSDP)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total


# -- metrics and plots -------------------------------------------------------------------

class Metrics:
    """Appends one JSON object per line to `path` (rank 0 only; other ranks pass path=None)."""

    def __init__(self, path: str | None):
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "w")

    def write(self, **row) -> None:
        if self.f:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def read_metrics(path: str) -> tuple[list[dict], dict]:
    """(per-step rows, summary) of a metrics JSONL written by the examples."""
    rows, summary = [], {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if "summary" in row:
                summary = row["summary"]
            else:
                rows.append(row)
    return rows, summary


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (window >= 1)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_runs(runs: dict[str, list[dict]], path: str, title: str = "", smooth_window: int = 0) -> str:
    """Training loss (and eval loss where rows carry "eval_loss") vs step, one line per run; writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    has_eval = any("eval_loss" in r for rows in runs.values() for r in rows)
    fig, axes = plt.subplots(1, 2 if has_eval else 1, figsize=(12 if has_eval else 7, 4.5), squeeze=False)
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if train:
            steps, losses = zip(*train)
            window = smooth_window or max(1, len(losses) // 50)
            axes[0][0].plot(steps, smooth(list(losses), window), color=color, label=label)
        ev = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if has_eval and ev:
            axes[0][1].plot(*zip(*ev), color=color, marker="o", ms=3, label=label)
    axes[0][0].set(xlabel="step", ylabel="training loss (smoothed)", title="training loss")
    if has_eval:
        axes[0][1].set(xlabel="step", ylabel="held-out loss", title="held-out loss")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def adapt_ds_config_for_cpu(cfg: dict) -> list[str]:
    """Make a DeepSpeed JSON meant for GPUs run on CPU processes, in place; returns what changed.

    DeepSpeed's fused Adam and its bf16/fp16 paths are built for GPUs: mixed precision is
    turned off and Adam/AdamW use torch's implementation (`torch_adam`).
    """
    notes = []
    for key in ("bf16", "fp16"):
        if cfg.get(key, {}).get("enabled") is True:
            cfg[key]["enabled"] = False
            notes.append(f"{key} off")
    opt = cfg.get("optimizer", {})
    if opt.get("type", "").lower() in ("adam", "adamw"):
        opt.setdefault("params", {})["torch_adam"] = True
        notes.append("torch_adam")
    return notes
