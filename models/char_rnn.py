"""Character-level language model with a recurrent core (RNN, LSTM or GRU).

The vocabulary is the set of characters of the training text, stored in the config so a
checkpoint alone can sample. Index `len(vocab)` is a begin-of-text token: every training
window starts with it and a zero state, so sampling from an empty prefix is well defined
(Karpathy's char-rnn, minus the stateful batches). Prefix characters outside the
vocabulary raise ValueError naming them; there is no unknown token, because the model
never saw one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import configs
from models.backends import classic
from models.configs import CharRNNConfig


class CharRNN(nn.Module):
    """Embedding -> recurrent core -> linear head over the vocabulary."""

    def __init__(self, config: CharRNNConfig) -> None:
        super().__init__()
        self.config = config
        vocab_size = len(config.vocab)
        rnn_class = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        # One extra embedding row: the begin-of-text token.
        self.embedding = nn.Embedding(vocab_size + 1, config.embedding_size)
        self.core = rnn_class(
            config.embedding_size,
            config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, vocab_size)

    def forward(self, ids: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """ids (B, T) -> logits (B, T, V) and the final recurrent state."""
        hidden, state = self.core(self.embedding(ids), state)
        return self.head(self.dropout(hidden)), state


def encode(text: str, vocab: str) -> torch.Tensor:
    """Character indices of `text`; ValueError names the characters outside `vocab`.

    Args:
        text: Any string.
        vocab: The model's characters.

    Returns:
        int64 tensor (len(text),).
    """
    index = {char: i for i, char in enumerate(vocab)}
    unknown = sorted({char for char in text if char not in index})
    if unknown:
        raise ValueError(f"prefix holds characters outside the vocabulary: {unknown}")
    return torch.tensor([index[char] for char in text], dtype=torch.long)


def _with_bos(targets: torch.Tensor, bos: int) -> torch.Tensor:
    """Inputs for `targets` (B, T): the begin-of-text token, then targets shifted right."""
    start = torch.full_like(targets[:, :1], bos)
    return torch.cat([start, targets[:, :-1]], dim=1)


def training_step(
    model: CharRNN, optimizer: torch.optim.Optimizer, targets: torch.Tensor, grad_clip: float
) -> float:
    """One optimiser step on a batch of windows.

    Args:
        model: The model, in train mode.
        optimizer: Its optimiser.
        targets: int64 (B, T) windows of the training text.
        grad_clip: Max gradient norm (0 disables clipping).

    Returns:
        The batch's mean cross-entropy in nats per character.
    """
    logits, _ = model(_with_bos(targets, len(model.config.vocab)))
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def evaluate(model: CharRNN, ids: torch.Tensor, seq_len: int) -> float:
    """Mean cross-entropy (nats per character) over all of `ids`, cut into windows of
    `seq_len` that start from a zero state, exactly as in training.

    Args:
        model: The model.
        ids: int64 (N,) encoded text on the model's device.
        seq_len: Window length.

    Returns:
        Nats per character.
    """
    was_training = model.training
    model.eval()
    full = ids.numel() // seq_len * seq_len
    windows = list(ids[:full].view(-1, seq_len).split(256)) if full else []
    if full < ids.numel():
        windows.append(ids[full:].view(1, -1))
    total = 0.0
    for window in windows:
        logits, _ = model(_with_bos(window, len(model.config.vocab)))
        total += float(F.cross_entropy(logits.flatten(0, 1), window.flatten(), reduction="sum"))
    model.train(was_training)
    return total / ids.numel()


@torch.inference_mode()
def sample(
    model: CharRNN,
    prefix: str,
    *,
    max_length: int,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator,
) -> str:
    """Continue `prefix` by `max_length` characters.

    Args:
        model: The model (its device is used).
        prefix: Text to condition on, possibly empty; only vocabulary characters.
        max_length: New characters to generate.
        temperature: Softmax temperature; 0 picks the most likely character.
        top_k: Keep only the k most likely characters before sampling (None: all).
        generator: CPU generator for the draws.

    Returns:
        The generated characters only, without the prefix.
    """
    model.eval()
    vocab = model.config.vocab
    device = next(model.parameters()).device
    ids = torch.cat([torch.tensor([len(vocab)]), encode(prefix, vocab)]).to(device)
    logits, state = model(ids.view(1, -1))
    out = []
    for _ in range(max_length):
        # Draws happen on the CPU so a seed gives the same text on any device.
        step_logits = logits[0, -1].float().cpu()
        if temperature == 0:
            choice = int(step_logits.argmax())
        else:
            step_logits = step_logits / temperature
            if top_k is not None and top_k < step_logits.numel():
                kth = torch.topk(step_logits, top_k).values[-1]
                step_logits = step_logits.masked_fill(step_logits < kth, -math.inf)
            probs = torch.softmax(step_logits, dim=-1)
            choice = int(torch.multinomial(probs, 1, generator=generator))
        out.append(vocab[choice])
        logits, state = model(torch.tensor([[choice]], device=device), state)
    return "".join(out)


def _get(request: Mapping[str, Any], key: str, default: Any) -> Any:
    """A request field; missing and None both mean the default."""
    value = request.get(key)
    return default if value is None else value


class CharRNNFamily:
    """The `classic.Family` of character-level recurrent language models."""

    name = "char_rnn"
    data_kind: classic.DataKind = "text"
    tasks = frozenset({"text"})

    def make_config(self, overrides: Mapping[str, Any], data: classic.Data) -> CharRNNConfig:
        if not isinstance(data, str):
            raise ValueError(f"char_rnn trains on text, got {type(data).__name__}")
        if len(data) < 20:
            raise ValueError(f"char_rnn needs at least 20 characters of text, got {len(data)}")
        values = configs.check(self.name, overrides)
        return CharRNNConfig(**values, vocab="".join(sorted(set(data))))

    def config_from_dict(self, values: Mapping[str, Any]) -> CharRNNConfig:
        return CharRNNConfig(**values)

    def build(self, config: CharRNNConfig) -> CharRNN:
        return CharRNN(config)

    def fit(
        self,
        model: nn.Module,
        config: Any,
        train: classic.Data,
        val: classic.Data,
        *,
        device: str,
        generator: torch.Generator,
        report: Callable[[classic.Progress], None],
        should_stop: Callable[[], bool],
    ) -> dict[str, float]:
        assert isinstance(model, CharRNN) and isinstance(train, str) and isinstance(val, str)
        # The text is encoded once; windows are sliced on the device.
        train_ids = encode(train, config.vocab).to(device)
        val_ids = encode(val, config.vocab).to(device)
        seq_len = min(config.seq_len, train_ids.numel())
        offsets = torch.arange(seq_len, device=device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
        total_steps = config.epochs * config.steps_per_epoch
        # Cosine decay to 10% of the peak: short budgets gain most from a low final rate.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.1 + 0.45 * (1 + math.cos(math.pi * step / total_steps))
        )
        # No bf16 autocast on CUDA: recurrent kernels accumulate over long windows.
        model.train()
        step, train_loss, val_loss = 0, math.nan, math.nan
        for epoch in range(1, config.epochs + 1):
            losses = []
            for _ in range(config.steps_per_epoch):
                if should_stop():
                    raise classic.Stopped
                high = train_ids.numel() - seq_len + 1
                starts = torch.randint(0, high, (config.batch_size,), generator=generator)
                targets = train_ids[starts.to(device)[:, None] + offsets]
                losses.append(training_step(model, optimizer, targets, config.grad_clip))
                schedule.step()
                step += 1
            train_loss = sum(losses) / len(losses)
            val_loss = evaluate(model, val_ids, seq_len)
            report(classic.Progress(epoch, step, {"train_loss": train_loss}, val_loss))
        model.eval()
        return {"train_loss": train_loss, "val_loss": val_loss}

    def sample(
        self,
        model: nn.Module,
        config: Any,
        request: Mapping[str, Any],
        *,
        device: str,
        generator: torch.Generator,
    ) -> classic.Sampled:
        assert isinstance(model, CharRNN)
        if request.get("task", "text") != "text":
            raise ValueError(f"char_rnn request 'task' must be 'text', got {request['task']!r}")
        prefix = _get(request, "prefix", "")
        if not isinstance(prefix, str):
            raise ValueError(f"request 'prefix' must be a string, got {type(prefix).__name__}")
        max_length = _get(request, "max_length", 200)
        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise ValueError(f"request 'max_length' must be an integer, got {max_length!r}")
        if not 1 <= max_length <= 10_000:
            raise ValueError(f"request 'max_length'={max_length} is out of range [1, 10000]")
        temperature = _get(request, "temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise ValueError(f"request 'temperature' must be a number, got {temperature!r}")
        if not 0 <= temperature <= 2:
            raise ValueError(f"request 'temperature'={temperature} is out of range [0, 2]")
        top_k = request.get("top_k")
        if top_k is not None and (
            isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1
        ):
            raise ValueError(f"request 'top_k' must be an integer >= 1 or None, got {top_k!r}")
        text = sample(
            model,
            prefix,
            max_length=max_length,
            temperature=float(temperature),
            top_k=top_k,
            generator=generator,
        )
        return classic.Sampled(text=text, meta={"prefix": prefix})


FAMILY = CharRNNFamily()
