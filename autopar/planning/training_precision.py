"""What a plan trains in: `TrainingPrecision`, the compute dtype and the bytes a parameter
element of parameters, gradients and optimizer state take (`parameter_state_bytes`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# --- parameter, gradient and optimizer state -------------------------------------------------


_OPTIMIZER_STATE_BYTES = {  # fp32 state per parameter element
    "adamw": 8,  # exp_avg + exp_avg_sq
    "adam": 8,
    "sgd_momentum": 4,  # momentum_buffer
    "sgd": 0,
}


# the dtypes a plan may compute in, by name (the names plan files and `TrainingPrecision` use)
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, kw_only=True)
class TrainingPrecision:
    """How a plan trains in: the dtype the graph computes in, and the bytes per parameter element
    of parameters, gradients and optimizer state.

    One knob: the compute dtype is the dtype the model is traced, priced and run in, whatever
    dtype it was built in (`autopar.plan` traces an fp32 model as if cast to bf16 for
    `"bf16-mixed"`), and the bytes are what the memory model counts and the runtime holds.
    Defaults are fp32 AdamW: 4 + 4 + 8 = 16 bytes per parameter. By name
    (`TrainingPrecision.named`): "fp32", "bf16-mixed".
    """

    param_bytes: int = 4  # the persistent (possibly sharded) parameter
    grad_bytes: int = 4  # the gradient
    optimizer_bytes: int = 8  # optimizer state, including any fp32 master copy of the weights
    compute_bytes: int = 4  # the copy matmuls read (bf16: 2); FSDP all-gathers in this dtype
    compute_dtype: str = "float32"  # a key of COMPUTE_DTYPES: what the graph computes in

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}: use one of "
                             f"{', '.join(COMPUTE_DTYPES)}")
        size = COMPUTE_DTYPES[self.compute_dtype].itemsize
        if self.compute_bytes != size:
            raise ValueError(f"compute_bytes={self.compute_bytes} but {self.compute_dtype} has "
                             f"{size} bytes an element: give both consistently")

    @classmethod
    def fp32(cls, optimizer: str = "adamw") -> TrainingPrecision:
        """fp32 params, grads and state: AdamW 16, SGD+momentum 12, SGD 8 bytes per param."""
        return cls(
            param_bytes=4,
            grad_bytes=4,
            optimizer_bytes=_optimizer_bytes(optimizer),
            compute_bytes=4,
        )

    @classmethod
    def mixed_bf16(cls, optimizer: str = "adamw") -> TrainingPrecision:
        """Mixed precision as in ZeRO (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations
        Toward Training Trillion Parameter Models", sec. 3.1): 16-bit params (2) and grads (2);
        the optimizer holds an fp32 master copy (4) plus its fp32 state (AdamW 8): 2 + 2 + 12 =
        16 bytes per parameter, the paper's 16 Psi. Gradients are reduced in bf16.

        This is what autopar's runtime runs (`autopar.optimizer`). FSDP2 with
        `MixedPrecisionPolicy(param_dtype=bf16)` instead keeps the sharded params and
        grads in fp32 and casts a bf16 copy per layer for compute: 4 + 4 + 8, the same 16 bytes
        in total; its bf16 unsharded copies are temporaries, sized with `compute_bytes`.
        """
        return cls(
            param_bytes=2,
            grad_bytes=2,
            optimizer_bytes=4 + _optimizer_bytes(optimizer),
            compute_bytes=2,
            compute_dtype="bfloat16",
        )

    @classmethod
    def named(cls, name: str, optimizer: str = "adamw") -> TrainingPrecision:
        """The precision called `name`: one of PRECISION_NAMES ("fp32", "bf16-mixed")."""
        if name not in PRECISION_NAMES:
            raise ValueError(f"unknown precision {name!r}: use one of "
                             f"{', '.join(PRECISION_NAMES)}, or a TrainingPrecision")
        return getattr(cls, PRECISION_NAMES[name])(optimizer)

    @property
    def name(self) -> str:
        """"fp32" or "bf16-mixed" (with any optimizer), else "custom"."""
        for name, make in PRECISION_NAMES.items():
            made = getattr(TrainingPrecision, make)()
            if (made.param_bytes, made.grad_bytes, made.compute_dtype) == (
                    self.param_bytes, self.grad_bytes, self.compute_dtype):
                return name
        return "custom"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype as a torch dtype."""
        return COMPUTE_DTYPES[self.compute_dtype]

    @property
    def keeps_masters(self) -> bool:
        """Parameters held below fp32 are stepped on fp32 master copies (in the optimizer's
        bytes): ZeRO's mixed precision."""
        return self.param_bytes < 4

    def describe(self) -> str:
        """One line for a plan's summary: "bf16-mixed: compute in bfloat16; 2 + 2 + 12 bytes a
        parameter (parameters + gradients + optimizer state)"."""
        return (f"{self.name}: compute in {self.compute_dtype}; {self.param_bytes} + "
                f"{self.grad_bytes} + {self.optimizer_bytes} bytes a parameter (parameters + "
                "gradients + optimizer state" + (", with fp32 masters)" if self.keeps_masters
                                                 else ")"))

    def to_dict(self) -> dict:
        """Plain JSON-able dict, keys sorted (a plan's `precision` field); `from_dict` reads it."""
        return {"compute_bytes": self.compute_bytes, "compute_dtype": self.compute_dtype,
                "grad_bytes": self.grad_bytes, "optimizer_bytes": self.optimizer_bytes,
                "param_bytes": self.param_bytes}

    @classmethod
    def from_dict(cls, d: dict) -> TrainingPrecision:
        """`to_dict`'s output back; an empty dict (a plan written before plans said their
        precision) is fp32."""
        return cls(**d)


# precision names -> the TrainingPrecision constructor that makes them
PRECISION_NAMES = {"fp32": "fp32", "bf16-mixed": "mixed_bf16"}


def _optimizer_bytes(optimizer: str) -> int:
    if optimizer not in _OPTIMIZER_STATE_BYTES:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose one of {sorted(_OPTIMIZER_STATE_BYTES)}."
        )
    return _OPTIMIZER_STATE_BYTES[optimizer]


def parameter_state_bytes(numel: int, precision: TrainingPrecision) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state for `numel` parameter elements.

    >>> parameter_state_bytes(10, TrainingPrecision.fp32())
    {'parameters': 40.0, 'gradients': 40.0, 'optimizer': 80.0}
    """
    return {
        "parameters": float(numel * precision.param_bytes),
        "gradients": float(numel * precision.grad_bytes),
        "optimizer": float(numel * precision.optimizer_bytes),
    }
