"""The look-ahead's copy of the model: it scores what the live model would score at the version it holds.

``sbsampler.lookahead`` scores batches beside the training step on a ``Replica``, a
copy of the hooked model. The optimizer changes the live parameters' values in
place, and copying the values between steps keeps the copy at one version. A
training loop can change more than values, though, and a copy that kept only the
values would score a model that no longer exists, silently. So each ``refresh``
first compares a fingerprint of the live model with the one taken when the copy
was made:

- the module tree: each module's name, object and class, its children (``None``
  included) and its forward hooks and pre-hooks (the ``ScoringHook``'s own aside);
- every parameter and buffer, and every tensor kept as a plain attribute or inside
  one: the object, its dtype, device and shape (``load_state_dict(assign=True)``,
  ``model.double()``, ``.to(device)``, a new ``nn.Parameter``);
- every other attribute the forward may read: plain data (numbers, strings, dtypes,
  devices, enums, and lists, tuples, dicts and sets of them) by value, so that a
  temperature re-assigned or a list changed in place is seen; other objects by
  identity and, where the copy holds its own copy of them, by their own attributes
  in turn (a config object changed in place), four levels deep.

When anything differs, the copy is made again from the live model (``copy.deepcopy``,
counted in ``Replica.copies``; a ``RuntimeWarning`` names what changed if that
happens at every step). Otherwise the modules' ``training`` flags are copied (a
``model.eval()`` reaches the copy) and every tensor's values, with one
``torch._foreach_copy_``.

What it does not see: an attribute object with no ``__dict__`` (a C extension's
state) changed in place, or an object shared by the copy and the model (one that
``copy.deepcopy`` returns as itself) changing while the thread scores. This module
knows nothing of loaders, epochs or threads: ``sbsampler.lookahead`` calls
``refresh`` when the thread waits at its gate.
"""

from __future__ import annotations

import copy
import enum
import types
import warnings
from collections.abc import Container
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .hook import ScoringHook

__all__ = ["Replica", "fingerprint"]

#: what every ``nn.Module`` keeps in its ``__dict__`` (walked separately: parameters, buffers, children, hooks)
_INTERNALS = frozenset(nn.Module().__dict__)
_EXACT = frozenset({int, str, bool, bytes, type(None)})
_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device, enum.Enum)
_DEPTH = 4
#: remade at this many refreshes in a row: say what keeps changing
_REMADE_IN_A_ROW = 5


def _hooks(module: nn.Module) -> tuple:
    """The module's forward hooks and pre-hooks (ids), a ``ScoringHook``'s own aside (the copy has its own)."""
    return tuple((key, id(fn)) for hooks in (module._forward_hooks, module._forward_pre_hooks)
                 for key, fn in hooks.items() if not isinstance(getattr(fn, "__self__", None), ScoringHook))


class _Walk:
    """One fingerprint of a model, and the tensors and objects met on the way (to pair them with the copy's).

    Args:
        shared: ids of the attribute objects the copy shares with the model (``copy.deepcopy`` returned them
            as themselves): recorded by identity only, since the copy sees their changes anyway.
    """

    def __init__(self, shared: Container[int] = ()) -> None:
        self.shared = shared
        self.tensors: dict[int, Tensor] = {}
        self.objects: dict[int, Any] = {}  # objects with attributes of their own, by id (each walked once)

    def tensor(self, t: Tensor) -> tuple:
        self.tensors.setdefault(id(t), t)
        return ("tensor", id(t), t.dtype, t.device, tuple(t.shape))

    def value(self, v: Any, depth: int = 0) -> Any:
        """What ``v`` is, as a comparable record: plain data by value, tensors and objects as ``tensor``/``object``."""
        kind = type(v)
        if kind in _EXACT:  # the common case first: compared as they are
            return kind, v
        if kind is float:
            return kind, v if v == v else "nan"  # a NaN equals itself
        if kind is tuple and all(type(x) in _EXACT for x in v):  # a kernel size, a padding
            return kind, v
        if isinstance(v, Tensor):
            return self.tensor(v)
        if isinstance(v, _SCALARS):
            return type(v).__name__, repr(v)  # repr: a NaN equals itself
        if isinstance(v, nn.Module) or isinstance(v, (type, types.ModuleType, types.FunctionType,
                                                      types.BuiltinFunctionType, types.MethodType)):
            return "object", id(v)  # a module is walked in the tree; functions, classes and modules by identity
        if depth >= _DEPTH:
            return "object", id(v)
        if isinstance(v, (list, tuple)):
            return type(v).__name__, tuple(self.value(x, depth + 1) for x in v)
        if isinstance(v, (set, frozenset)):
            return type(v).__name__, frozenset(self.value(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return type(v).__name__, tuple((repr(k), self.value(x, depth + 1)) for k, x in v.items())
        attrs = getattr(v, "__dict__", None)
        if not isinstance(attrs, dict):
            return "object", id(v)
        if id(v) in self.objects or id(v) in self.shared:  # walked already (a config every layer holds), or shared
            return "object", id(v)
        self.objects[id(v)] = v
        return "object", id(v), tuple((k, self.value(x, depth + 1)) for k, x in attrs.items())


def fingerprint(model: nn.Module, walk: Optional[_Walk] = None) -> tuple:
    """``((what, record), ...)`` of ``model``: its module tree, tensors and attributes (see the module docstring).

    Two fingerprints are equal exactly when a copy made at the first still stands for the model at the second
    (values of tensors aside).
    """
    walk = walk if walk is not None else _Walk()
    out = []
    for name, module in model.named_modules():
        at = name or "the model"
        out.append((at, ("module", id(module), type(module), _hooks(module),
                         tuple((k, id(c) if c is not None else None) for k, c in module._modules.items()))))
        for kind in ("_parameters", "_buffers"):
            for key, t in getattr(module, kind).items():
                out.append((f"{name}.{key}" if name else key, walk.tensor(t) if t is not None else None))
        for key, v in module.__dict__.items():
            if key not in _INTERNALS:
                out.append((f"{name}.{key}" if name else key, walk.value(v)))
    return tuple(out)


def _first_difference(old: tuple, new: tuple) -> str:
    """What changed between two fingerprints, for a message: the first entry that differs."""
    for (name, a), (name_b, b) in zip(old, new):
        if name != name_b:
            return f"the module tree (at {name!r})"
        if a != b:
            return repr(name)
    return "the module tree"


def _copy_model(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy(model, memo)`` without the ``ScoringHook`` forward hooks on it (a copy would copy them)."""
    removed = []
    for module in model.modules():
        for key, fn in list(module._forward_hooks.items()):
            if isinstance(getattr(fn, "__self__", None), ScoringHook):
                removed.append((module, key, fn))
                del module._forward_hooks[key]
    try:
        twin = copy.deepcopy(model, memo)
    except Exception as err:  # noqa: BLE001 - said plainly, with what to do
        raise TypeError(f"lookahead scores a copy of the model beside the training step, but copy.deepcopy of "
                        f"{type(model).__name__} failed ({type(err).__name__}: {err}); make the model copyable "
                        "(no locks, files or generators as attributes), or use lookahead=0") from err
    finally:
        for module, key, fn in removed:
            module._forward_hooks[key] = fn
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


class Replica:
    """A copy of the hooked model and a ``ScoringHook`` on it, brought to the live model's version by ``refresh``.

    Args:
        hook: the ``ScoringHook`` on the live model.

    Attributes:
        model: the copy.
        hook: the ``ScoringHook`` on the copy (a new one each time the copy is made again; its
            ``checks`` are the same object throughout).
        copies: how many times the copy was made (1 after construction).
    """

    def __init__(self, hook: ScoringHook) -> None:
        self.live_hook = hook
        self.copies = 0
        self._in_a_row = 0
        self._warned = False
        self.hook: Optional[ScoringHook] = None
        self._make()

    @property
    def live(self) -> nn.Module:
        """The model being trained."""
        return self.live_hook.model

    def _make(self) -> None:
        """Copy the live model; record its fingerprint and pair every tensor and module with its copy."""
        memo: dict[int, Any] = {}
        model = _copy_model(self.live, memo)
        walk = _Walk()
        fingerprint(self.live, walk)  # every object met; those the copy did not copy are shared with it
        self._shared = {key for key, v in walk.objects.items() if memo.get(key) is None or memo[key] is v}
        walk = _Walk(self._shared)
        self._fingerprint = fingerprint(self.live, walk)
        self.model, self.hook = model, self.live_hook.replicate(model, previous=self.hook)
        pairs: dict[int, tuple[Tensor, Tensor]] = {}
        for key, t in walk.tensors.items():
            twin = memo.get(key)
            if isinstance(twin, Tensor) and twin is not t:  # a tensor the copy shares with the model needs no copy
                pairs[key] = (twin, t)
        self._mine = [twin for twin, _ in pairs.values()]
        self._theirs = [t for _, t in pairs.values()]
        self._modules = [(memo[id(m)], m) for m in self.live.modules()]
        self.copies += 1

    def refresh(self) -> None:
        """Bring the copy to the live model's version: made again if the model changed beyond its values (the
        module docstring), else its training flags and tensor values copied (on CUDA: queued on the current
        stream)."""
        now = fingerprint(self.live, _Walk(self._shared))
        if now != self._fingerprint:
            changed = _first_difference(self._fingerprint, now)
            self._make()
            self._in_a_row += 1
            if self._in_a_row >= _REMADE_IN_A_ROW and not self._warned:
                self._warned = True
                warnings.warn(
                    f"the look-ahead's copy of the model was made again at each of the last {self._in_a_row} steps, "
                    f"because {changed} changes between steps (a copy costs a deepcopy of the model). Keep what the "
                    "forward reads fixed between steps (assign such values as tensors' contents, or outside the "
                    "model), or use lookahead=0", RuntimeWarning, stacklevel=2)
            return
        self._in_a_row = 0
        for mine, theirs in self._modules:
            if mine.training != theirs.training:
                mine.__dict__["training"] = theirs.training
        if not self._mine:
            return
        with torch.no_grad():
            if hasattr(torch, "_foreach_copy_"):
                torch._foreach_copy_(self._mine, self._theirs)
            else:  # pragma: no cover - older torch
                for dst, src in zip(self._mine, self._theirs):
                    dst.copy_(src)
