"""Models, data and clusters the tests share, and single-process training to compare against.

Training on CPU ranks (tests/test_end_to_end.py, tests/runtime/): two-layer GPT and Llama small
enough for 8 gloo ranks on 2 cores, `STEPS` SGD steps on fixed batches, and `reference_losses`,
the same training in one process. Planning (tests/planning/, tests/test_simulate.py,
tests/test_manual_plan.py): `gpt_on_four_h100s`, a four-block GPT planned for one node of four
H100s, which no test runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

import autopar
from autopar.cluster import Cluster, DeviceSpec, Link
from autopar.models.gpt import GPT, GPTConfig
from autopar.models.llama import Llama, LlamaConfig
from autopar.models.losses import lm_loss

CONFIG = GPTConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, d_model=64)
LLAMA = LlamaConfig(vocab_size=64, seq_len=8, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                    ffn_hidden=128)
MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "gpt": lambda: GPT(CONFIG), "llama": lambda: Llama(LLAMA)}
STEPS = 4
LR = 0.5


def fast_cpu_cluster(world_size: int) -> Cluster:
    """CPU processes described with GPU-like links, so that splitting work pays in the cost
    model and the planner really shards (the figures only steer the plan, not correctness)."""
    return Cluster(
        name="test-cpu",
        device=DeviceSpec(
            name="cpu",
            memory_bytes=16 * 2**30,
            peak_flops={"float32": 1e11},
            hbm_bandwidth_bytes_per_s=2e10,
        ),
        devices_per_node=world_size,
        nodes=1,
        intra_node=Link(bandwidth_bytes_per_s=1e11, latency_s=1e-6),
        inter_node=Link(bandwidth_bytes_per_s=1e10, latency_s=1e-5),
        device_type="cpu",
    )


def batches(batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`STEPS` (tokens, next tokens) batches of `CONFIG`'s vocabulary and length, always the same."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randint(0, CONFIG.vocab_size, (batch_size, CONFIG.seq_len), generator=g),
            torch.randint(0, CONFIG.vocab_size, (batch_size, CONFIG.seq_len), generator=g),
        )
        for _ in range(STEPS)
    ]


def sgd_losses(parameters, train_step, data, lr: float = LR) -> list[float]:
    """Loss of every SGD step; `train_step(x, y)` runs forward and backward, returns the loss."""
    opt = torch.optim.SGD(parameters, lr=lr)
    losses = []
    for x, y in data:
        losses.append(float(train_step(x, y)))
        opt.step()
        opt.zero_grad()
    return losses


def reference_losses(model_name: str, batch_size: int = 4,
                     models: dict[str, Callable[[], torch.nn.Module]] = MODELS) -> list[float]:
    """The same model (`models[model_name]()` after seed 0), batches and SGD, in this one
    process."""
    torch.manual_seed(0)
    model = models[model_name]()

    def step(x, y):
        loss = lm_loss(model(x), y)
        loss.backward()
        return loss.item()

    return sgd_losses(model.parameters(), step, batches(batch_size))


SEARCH_BATCH = 8  # the planning GPT's global batch


def gpt_on_four_h100s():
    """(model, (tokens, targets), cluster): a 4-block GPT (4 heads) and a batch of
    `SEARCH_BATCH` x 16 tokens, on one node of four H100s."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=128, seq_len=16, n_layer=4, n_head=4, d_model=64))
    x = torch.randint(0, 128, (SEARCH_BATCH, 16))
    cluster = autopar.Cluster.preset("h100-80g", devices_per_node=4)
    return model, (x, x.clone()), cluster


def free_host(cluster: Cluster) -> Cluster:
    """`cluster` with its device's host time per op dropped, the rest of its calibration kept
    (op efficiencies, the floor of one op): a layer costs its device's time, never the host's.
    The calibrated H100 issues a graph op in 71 us (replay; 262 us op by op, as a split
    backward runs): longer than the tests' small layers take on the device, so the host's time
    would hide what they check."""
    cal = cluster.device.calibration
    return dataclasses.replace(cluster, device=dataclasses.replace(
        cluster.device, calibration=dataclasses.replace(cal, host_s_per_op={})))


def datasheet(cluster: Cluster) -> Cluster:
    """`cluster` with its device's calibration dropped: datasheet peaks and a free host."""
    return dataclasses.replace(cluster, device=dataclasses.replace(cluster.device,
                                                                   calibration=None))
