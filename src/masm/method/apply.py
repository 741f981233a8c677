"""Put MASM layers into a model and take them out again (PEFT-style ``apply`` / ``merge``)."""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..errors import ConfigError
from .config import MASMConfig
from .decomposition import decompose
from .groups import LayerGroup
from .layer import MASMLinear, layer_groups

logger = logging.getLogger(__name__)


def find_targets(model: nn.Module, pattern: str) -> list[tuple[str, nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` whose qualified name matches ``pattern`` (``re.search``)."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"target_modules {pattern!r} is not a valid regex: {err}") from None
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and regex.search(n)]
    if not targets:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ConfigError(
            f"target_modules {pattern!r} matches no Linear layer; some Linear names: {', '.join(linears[:6])}"
        )
    return targets


def apply_masm(model: nn.Module, config: MASMConfig | None = None, cache_dir: Path | None | bool = None):
    """Replace the targeted Linears of ``model`` in place by :class:`MASMLinear` and freeze the rest.

    Afterwards only the artifact subspaces (``U_k``, ``s_k``, ``V_k``) require gradients. Returns ``model``.
    With ``config.select.layers`` set (FMSD's selection) only those targets are adapted; the other targets
    stay plain, frozen ``nn.Linear`` layers.
    ``cache_dir`` is where SVDs are cached (``None``: ``$MASM_CACHE_DIR`` or ``~/.cache/masm``; ``False``:
    no disk cache).
    """
    config = config or MASMConfig()
    targets = selected_targets(find_targets(model, config.target_modules), config.select.layers)
    for param in model.parameters():
        param.requires_grad_(False)
    layers = []
    for name, linear in targets:
        svd = decompose(linear.weight, config.svd_dtype, cache_dir)
        layers.append(MASMLinear(linear, svd, config))
        replace_module(model, name, layers[-1])
    group_layers(model, layers)
    logger.debug(
        "MASM: adapted %d Linear layers (K=%d, m=%d)",
        len(targets),
        config.num_subspaces,
        config.subspace_rank,
    )
    return model


def selected_targets(
    targets: list[tuple[str, nn.Linear]], layers: list[str] | None
) -> list[tuple[str, nn.Linear]]:
    """The targets named in ``layers`` (all of them when ``layers`` is None), in model order."""
    if layers is None:
        return targets
    names = {name for name, _ in targets}
    unknown = [name for name in layers if name not in names]
    if unknown:
        raise ConfigError(
            f"select.layers names {unknown[0]!r}, which is not a targeted Linear; targets: "
            f"{', '.join(name for name, _ in targets[:6])}"
        )
    chosen = set(layers)
    return [(name, linear) for name, linear in targets if name in chosen]


class MASMGroups(nn.Module):
    """The :class:`LayerGroup` s of a model's MASM layers, held by the model as ``masm_groups`` (so that
    ``.to()``, DDP and optimizers see their Parameters), with the hooks that build every group's operands
    when the model's forward starts and drop them when it ends."""

    def __init__(self, groups: list[LayerGroup]):
        super().__init__()
        self.groups = nn.ModuleList(groups)

    def forward(self, x):
        """Nothing: passes its input through (a model that calls each child in turn, like ``nn.Sequential``,
        calls this one too)."""
        return x

    def begin_pass(self, module, args) -> None:
        for group in self.groups:
            group.begin_pass()

    def end_pass(self, module, args, output) -> None:
        for group in self.groups:
            group.end_pass()

    def attach(self, model: nn.Module) -> None:
        model.masm_groups = self
        model.register_forward_pre_hook(self.begin_pass)
        model.register_forward_hook(self.end_pass, always_call=True)  # even when the forward raises

    def detach_from(self, model: nn.Module) -> None:
        for hooks in (model._forward_pre_hooks, model._forward_hooks):
            for key in [k for k, hook in hooks.items() if getattr(hook, "__self__", None) is self]:
                del hooks[key]
                model._forward_hooks_always_called.pop(key, None)
        del model.masm_groups


def group_layers(model: nn.Module, layers: list[MASMLinear]) -> list[LayerGroup]:
    """Put ``layers`` (new MASM layers of ``model``) into one :class:`LayerGroup` per layout, held by
    ``model``; each layer becomes a row of its group."""
    if isinstance(getattr(model, "masm_groups", None), MASMGroups):
        raise ConfigError("apply_masm: the model has MASM layers already; merge them first (merge_masm)")
    by_layout: dict[tuple, list[MASMLinear]] = {}
    for layer in layers:
        by_layout.setdefault(tuple(sorted(layer.group.layout.items())), []).append(layer)
    groups = []
    for members in by_layout.values():
        group = LayerGroup.stack([layer.group for layer in members])
        for row, layer in enumerate(members):
            layer.join(group, row)
        groups.append(group)
    MASMGroups(groups).attach(model)
    return groups


def merge_masm(model: nn.Module) -> nn.Module:
    """Fold every :class:`MASMLinear` of ``model`` back into a plain ``nn.Linear`` (in place)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, MASMLinear):
            replace_module(model, name, layer.merge())
    for module in list(model.modules()):
        container = getattr(module, "masm_groups", None)
        if isinstance(container, MASMGroups):
            container.detach_from(module)
    return model


def project_gradients(model: nn.Module, groups: list | None = None) -> None:
    """Between backward and the optimizer step: project every artifact gradient out of its guarded
    directions (``semantic_guard: project`` layers only), batched per shape group. ``groups``: from
    :func:`~masm.method.layer_groups`, if the caller keeps them (a flat list of layers is grouped here)."""
    for group in _as_groups(model, groups):
        group.project_gradients_()


def reproject_guarded(model: nn.Module, groups: list | None = None, skip=None) -> None:
    """After an optimizer step: project every updated artifact factor out of its guarded directions.

    Only ``semantic_guard: project`` layers do anything; paused subspaces are put back bit for bit by the
    mask afterwards. ``groups`` as for :func:`project_gradients`.
    """
    for group in _as_groups(model, groups):
        group.reproject_(skip)


@contextmanager
def subspace_update(
    model: nn.Module, optimizer, controller=None, groups: list | None = None, skip=None, advance: bool = True
):
    """Wrap the optimizer step of a MASM model: the semantic guard and the selective mask around it.

    ::

        loss.backward()
        with subspace_update(model, optimizer, controller, groups):
            optimizer.step()

    Before the step: gradients projected out of the guarded directions, then the mask controller (if any)
    observes them and sets the paused subspaces aside. After it: the updated factors re-projected (Adam's
    scaling and weight decay leave the complement), then the paused subspaces' values and moments put back.
    The guard is exact this way, and it lives in plain functions of the layer's buffers, so any copy of the
    model keeps it. ``groups``: :func:`~masm.method.layer_groups` of the model, computed once by the caller
    (default: found here, at a module walk per call); a flat list of layers is grouped here. ``skip``: a
    device flag set when the step must change nothing (the trainer's non-finite check, :mod:`masm.training.
    health`; the optimizer skips on it too): the guard and the mask's statistics then leave their tensors
    as they were, without a host sync. ``advance``: see :meth:`~masm.method.SelectiveMaskController.step`
    (``False`` inside a step captured as a CUDA graph).
    """
    groups = _as_groups(model, groups)
    project_gradients(model, groups)
    if controller is not None:
        controller.step(optimizer, skip, advance)
    yield
    reproject_guarded(model, groups, skip)
    if controller is not None:
        controller.restore()


def _as_groups(model: nn.Module, groups: list | None) -> list[LayerGroup]:
    if groups is None:
        return layer_groups(model)
    if all(isinstance(g, LayerGroup) for g in groups):
        return groups
    return layer_groups(groups)  # a flat list of layers


def masm_layers(model: nn.Module) -> list[tuple[str, MASMLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MASMLinear)]


def count_masm_parameters(model: nn.Module, config: MASMConfig) -> int:
    """Trainable parameters MASM would add: ``Σ_layers K·m·(d_out + d_in + 1)``.

    Works on a model built on the ``meta`` device, so the count of ViT-L/14 needs no weights.
    """
    targets = selected_targets(find_targets(model, config.target_modules), config.select.layers)
    per_rank = sum(m.out_features + m.in_features + 1 for _, m in targets)
    return config.artifact_rank * per_rank


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted path ``name`` of ``model`` (what ``nn.Module.set_submodule`` does in
    newer torch releases than the oldest this package supports)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
