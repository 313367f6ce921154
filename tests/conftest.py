"""Shared pytest set-up: keep the parent process to two intra-op threads (small CI machines)."""

import torch

torch.set_num_threads(2)
