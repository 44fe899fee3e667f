"""What a training checkpoint takes from a DeepSpeed engine and gives back to one.

Per parameter: the fp32 weight, Adam's two moments and its step, keyed by the parameter's name in
the unsharded model, so the same entries serve any number of processes, any expert-parallel size
and any ZeRO stage. Shared parameters are read directly by name; experts go through
`expert_entries` (`expert_checkpoint_entries` / `restore_expert_entries`), the one place that
knows how a rank's experts sit in the unsharded layer.

Where the state lives depends on the optimizer DeepSpeed built:
  - ZeRO 0 keeps our torch AdamW as it is: weights are the parameters, moments its `state`;
  - ZeRO 1 and 2 (and DeepSpeed's bf16 optimizer) keep fp32 master weights and moments in flat
    partitions spread over the data-parallel ranks; DeepSpeed's fragment API
    (`safe_get_full_fp32_param`, `safe_set_full_optimizer_state`, …) assembles and scatters them.
    Those calls are collectives, so every process makes them for every parameter in the same
    order, and only the processes that write an entry keep it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Callable

import torch
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import Tensor, nn

from limoe.checkpoints.expert_entries import expert_checkpoint_entries, restore_expert_entries
from limoe.errors import LimoeError
from limoe.model.moe import MoeMlp

MOMENTS = ("exp_avg", "exp_avg_sq")
STEP = "step"
OPTIMIZER_KEYS = (*MOMENTS, STEP)  # optimizer entries are named "<key>/<parameter name>"


class _TorchOptimizerState:
    """ZeRO 0: the parameters themselves and a torch optimizer's per-parameter `state`."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.loaded: dict[nn.Parameter, dict[str, Tensor]] = {}

    def weight(self, parameter: nn.Parameter) -> Tensor:
        return parameter.detach().float().cpu()

    def optimizer_value(self, parameter: nn.Parameter, key: str) -> Tensor:
        """A moment or the step; a parameter not stepped yet has zeros and step 0 (a fresh state)."""
        state = self.optimizer.state.get(parameter)
        if not state:
            return torch.zeros(()) if key == STEP else torch.zeros(parameter.shape)
        return torch.as_tensor(state[key], dtype=torch.float32).reshape(()) if key == STEP else state[key].float().cpu()

    def set_weight(self, parameter: nn.Parameter, value: Tensor) -> None:
        with torch.no_grad():
            parameter.copy_(value)

    def set_optimizer_value(self, parameter: nn.Parameter, key: str, value: Tensor) -> None:
        self.loaded.setdefault(parameter, {})[key] = value

    def finish(self) -> None:
        """One `load_state_dict`, which puts each value on its parameter's device and dtype."""
        state_dict = self.optimizer.state_dict()
        index = 0
        for group in self.optimizer.param_groups:
            for parameter in group["params"]:
                if parameter in self.loaded:
                    state_dict["state"][index] = self.loaded[parameter]
                index += 1
        self.optimizer.load_state_dict(state_dict)


class _FragmentState:
    """ZeRO 1/2 and the bf16 optimizer: fp32 master weights and moments in flat partitions,
    reached through DeepSpeed's fragment API. Every call here is a collective over the
    parameter's data-parallel group (the expert-data-parallel group for experts)."""

    def __init__(self, wrapper):
        self.wrapper = wrapper  # DeepSpeedZeroOptimizer or BF16_Optimizer
        self.inner: torch.optim.Optimizer = wrapper.optimizer  # the torch AdamW over the flat partitions
        self.loaded_steps: list[float] = []
        if self._stepped():
            self._link_fragments()

    def _stepped(self) -> bool:
        return any(self.inner.state.values())

    def _link_fragments(self) -> None:
        """Point every parameter's fragment at the flat moments. DeepSpeed does this once, after
        the first optimizer step; ZeRO 1/2 steps its parameter groups one at a time, so the groups
        after the first have no moments yet at that point and their fragments stay empty
        (DeepSpeed 0.19.8). Linking again once every group has its moments fixes that."""
        if not hasattr(self.wrapper, "_lazy_init_hp_params_optimizer_state"):
            raise LimoeError(f"this DeepSpeed's {type(self.wrapper).__name__} does not expose its optimizer moments; "
                             f"use distributed.zero_stage 0.")
        self.wrapper._hp_optimizer_states_linked = False
        self.wrapper._lazy_init_hp_params_optimizer_state()

    def weight(self, parameter: nn.Parameter) -> Tensor:
        return safe_get_full_fp32_param(parameter).cpu()

    def optimizer_value(self, parameter: nn.Parameter, key: str) -> Tensor:
        if not self._stepped():  # before the first step there are no moments to assemble
            return torch.zeros(()) if key == STEP else torch.zeros(parameter.shape)
        if key == STEP:  # the flat partitions step together: one count for all
            return torch.tensor(max(float(state[STEP]) for state in self.inner.state.values() if state))
        return safe_get_full_optimizer_state(parameter, key).cpu()

    def set_weight(self, parameter: nn.Parameter, value: Tensor) -> None:
        with torch.no_grad():
            parameter.copy_(value)  # the low-precision copy the forward pass uses
        safe_set_full_fp32_param(parameter, value)

    def set_optimizer_value(self, parameter: nn.Parameter, key: str, value: Tensor) -> None:
        if key == STEP:
            self.loaded_steps.append(float(value))
            return
        if not self._stepped():  # a fresh optimizer: give it the state Adam's first step would create
            for group in self.inner.param_groups:
                for flat in group["params"]:
                    self.inner.state[flat] = {STEP: torch.zeros(()), **{k: torch.zeros_like(flat) for k in MOMENTS}}
            self._link_fragments()
        safe_set_full_optimizer_state(parameter, value, key)

    def finish(self) -> None:
        if self.loaded_steps:
            for state in self.inner.state.values():
                state[STEP] = torch.tensor(max(self.loaded_steps), dtype=state[STEP].dtype, device=state[STEP].device)


def _state_of(engine):
    parameters = list(engine.module.parameters())
    if any(hasattr(p, "ds_id") for p in parameters):
        raise LimoeError("ZeRO stage 3 is not supported with expert layers; set distributed.zero_stage to 0, 1 or 2.")
    if any(getattr(p, "_hp_mapping", None) is not None for p in parameters):
        return _FragmentState(engine.optimizer)
    if isinstance(engine.optimizer, torch.optim.Optimizer):
        return _TorchOptimizerState(engine.optimizer)
    raise LimoeError(f"training checkpoints do not support DeepSpeed's {type(engine.optimizer).__name__}; "
                     f"use bf16 or fp32 with ZeRO 0, 1 or 2.")


def _moe_layers(module: nn.Module) -> Iterator[tuple[str, MoeMlp]]:
    return ((name, layer) for name, layer in module.named_modules() if isinstance(layer, MoeMlp))


def _shared_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    return ((name, p) for name, p in module.named_parameters() if not is_moe_param(p))


def persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    """Persistent buffers (those a state dict holds), which belong with the weights."""
    parameters = {name for name, _ in module.named_parameters()}
    return {name: t for name, t in module.state_dict().items() if name not in parameters}


class Prefixed(Mapping):
    """The entries under `prefix`, keyed without it: one MoE layer's, or one optimizer key's,
    view of the checkpoint."""

    def __init__(self, entries: Mapping[str, Tensor], prefix: str):
        self.entries, self.prefix = entries, prefix

    def __getitem__(self, key: str) -> Tensor:
        return self.entries[self.prefix + key]

    def __iter__(self):
        return (key[len(self.prefix):] for key in self.entries if key.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


def engine_entries(engine, keep_shared: bool, keep_experts: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(model entries, optimizer entries) of this process: the shared parameters if `keep_shared`,
    this rank's experts if `keep_experts`. Every process calls this (the reads may be collectives)."""
    state = _state_of(engine)
    module = engine.module
    getters: dict[str, Callable[[nn.Parameter], Tensor]] = {"": state.weight}
    for key in OPTIMIZER_KEYS:
        getters[f"{key}/"] = lambda parameter, key=key: state.optimizer_value(parameter, key)
    model: dict[str, Tensor] = dict(persistent_buffers(module)) if keep_shared else {}
    optimizer: dict[str, Tensor] = {}
    for kind, get in getters.items():
        into = model if kind == "" else optimizer
        for name, parameter in _shared_parameters(module):
            value = get(parameter)
            if keep_shared:
                into[kind + name] = value
        for prefix, layer in _moe_layers(module):
            entries = expert_checkpoint_entries(layer, get)
            if keep_experts:
                into.update({f"{kind}{prefix}.{name}": value for name, value in entries.items()})
    return model, optimizer


def put_entries(module: nn.Module, entries: Mapping[str, Tensor], put: Callable[[nn.Parameter, Tensor], None]) -> None:
    """`put(parameter, tensor)` for every parameter of `module`: shared ones by name, this rank's
    experts through their MoE layer's mapping; `entries` keyed by the unsharded model's names."""
    for name, parameter in _shared_parameters(module):
        put(parameter, entries[name])
    for prefix, layer in _moe_layers(module):
        restore_expert_entries(layer, Prefixed(entries, f"{prefix}."), put)


def restore_engine_entries(engine, model: Mapping[str, Tensor], optimizer: Mapping[str, Tensor]) -> None:
    """Load weights, moments and steps from checkpoint entries (written by any process layout)
    into this process's parameters: the shared ones and this rank's experts."""
    state = _state_of(engine)
    module = engine.module
    names = {parameter: name for name, parameter in module.named_parameters()}

    def checked(put: Callable[[nn.Parameter, Tensor], None], what: str) -> Callable[[nn.Parameter, Tensor], None]:
        def put_checked(parameter: nn.Parameter, value: Tensor) -> None:
            expected = torch.Size(()) if what == STEP else parameter.shape
            if value.shape != expected:
                raise LimoeError(f"the checkpoint's {what} for {names[parameter]} has shape {list(value.shape)}, not "
                                 f"{list(expected)}; it was written for another model.")
            put(parameter, value)
        return put_checked

    for name, buffer in persistent_buffers(module).items():
        buffer.copy_(model[name])
    put_entries(module, model, checked(state.set_weight, "weight"))
    for key in OPTIMIZER_KEYS:
        put = checked(lambda parameter, value, key=key: state.set_optimizer_value(parameter, key, value), key)
        put_entries(module, Prefixed(optimizer, f"{key}/"), put)
    state.finish()


def rng_states() -> dict[str, Tensor]:
    """This process's random number generator states (the router noise draws from them)."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: Mapping[str, Tensor]) -> None:
    """Put back the states `rng_states` saved (those this process has a generator for)."""
    try:
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state(states["cuda"])
    except (RuntimeError, TypeError, ValueError) as error:
        raise LimoeError(f"the checkpoint's random number generator state is unusable ({error}); it is damaged.") from None
