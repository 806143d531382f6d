"""Held-out accuracy of a split model, through the simulated link or through real wire bytes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from . import wire
from .splitnets import SplitNet


@torch.no_grad()
def evaluate(net: SplitNet, x: torch.Tensor, y: torch.Tensor, budget: int | None, wire_dtype: str,
             batch_size: int = 256) -> float:
    """Accuracy (percent) with the link simulated (bit for bit what the wire would give).

    Args:
        net: split model (switched to eval mode and back).
        x: images (N, ...).
        y: labels (N,).
        budget: channels kept at the cut (None = full width).
        wire_dtype: "fp32", "fp16" or "int8".
        batch_size: evaluation batch.
    Returns:
        Percentage of correct predictions.
    """
    was_training = net.training
    net.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        correct += int((net(x[i:i + batch_size], budget, wire_dtype).argmax(1) == y[i:i + batch_size]).sum())
    net.train(was_training)
    return 100.0 * correct / len(y)


@dataclass(frozen=True)
class WireEval:
    """Accuracy measured through real ``encode``/``decode`` and the bytes those made."""

    budget: int | None
    wire_dtype: str
    accuracy: float  # percent
    samples: int
    messages: int
    payload_bytes: int  # frame bytes, all messages
    header_bytes: int  # msgpack header bytes, all messages
    single_payload_bytes: int  # frames of one message holding one sample
    single_header_bytes: int  # its header

    @property
    def bytes_per_sample(self) -> int:
        """Header plus frames of a one-sample message: the batch-1 cost of one transfer."""
        return self.single_payload_bytes + self.single_header_bytes


@torch.no_grad()
def evaluate_wire(net: SplitNet, x: torch.Tensor, y: torch.Tensor, budget: int | None, wire_dtype: str,
                  batch_size: int = 256) -> WireEval:
    """Accuracy with every batch actually encoded to bytes and decoded back.

    Args:
        net: split model.
        x: images.
        y: labels.
        budget: channels kept (None = full width).
        wire_dtype: "fp32", "fp16" or "int8".
        batch_size: samples per message.
    Returns:
        Accuracy and byte counts.
    """
    was_training = net.training
    net.eval()
    correct = payload = headers = messages = 0
    for i in range(0, len(y), batch_size):
        header, frames = net.codec.encode(net.client(x[i:i + batch_size]), budget, wire_dtype)
        payload += sum(f.nbytes for f in frames)
        headers += wire.header_nbytes(header)
        messages += 1
        logits = net.server(net.codec.decode(header, frames))
        correct += int((logits.argmax(1) == y[i:i + batch_size]).sum())
    h1, f1 = net.codec.encode(net.client(x[:1]), budget, wire_dtype)
    net.train(was_training)
    return WireEval(budget, wire_dtype, 100.0 * correct / len(y), len(y), messages, payload, headers,
                    sum(f.nbytes for f in f1), wire.header_nbytes(h1))


def budget_table(net: SplitNet, x: torch.Tensor, y: torch.Tensor, budgets: Sequence[int | None],
                 wire_dtypes: Sequence[str] = ("fp32", "fp16", "int8"), batch_size: int = 256) -> list[WireEval]:
    """``evaluate_wire`` for every budget x wire dtype."""
    return [evaluate_wire(net, x, y, b, d, batch_size) for b in budgets for d in wire_dtypes]
