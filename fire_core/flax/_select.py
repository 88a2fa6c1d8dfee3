"""Which leaves of a Flax tree :mod:`fire_core.flax` projects, and in which layout.

A ``kernel`` of two axes is a Dense ``(in, out)``. A kernel of three or more
axes is ambiguous by shape: a 1-D convolution ``(w, in, out)``, a Dense
scanned over layers ``(L, in, out)``, an ``nn.vmap`` ensemble and a
DenseGeneral contracting two axes ``(heads, head_dim, out)`` all have three.
So a layout is taken only from what says what the kernel is, in this order:

1. ``layouts={pattern: layout}`` (the user's word; uppercase letters are
   stacked layers) and ``stacked={pattern: n}`` (the first ``n`` axes of
   each kernel under the pattern are stacked layers; the rest is read as
   below);
2. the module (``model=``): its type, from the table below, and the axes
   ``nn.scan``/``nn.vmap``/``nnx.vmap``/``nnx.scan`` stacked. For nnx the
   Module holds both (each module's type and its own attributes, so the
   kernel's unstacked shape). For linen, ``model=(module, *inputs)`` (or
   ``(fn, *inputs)`` with ``fn(variables, *inputs)``, e.g. a
   ``functools.partial`` of ``module.apply``) is traced once, abstractly
   (``jax.eval_shape``: no arithmetic), with every parameter boxed in a
   ``flax.core.meta.AxisMetadata`` that records the axes each lifted
   transform removes, the public hook linen's transforms call for
   ``nn.Partitioned``; module types are read with ``nn.intercept_methods``;
3. partition names recorded with the weight (``nn.Partitioned`` /
   ``nn.LogicallyPartitioned`` boxes, an nnx Variable's ``out_sharding``,
   as ``nn.with_partitioning`` and ``metadata_params`` /
   ``transform_metadata={nnx.PARTITION_NAME: ...}`` leave them): an axis
   named one of :data:`STACK_NAMES` is a stack axis;
4. Flax's own names (:func:`fire_core.core.name_rules._flax_kernel_rule`): two
   axes, the attention structure, linen's auto-names ``Conv_N``,
   ``ConvTranspose_N``, ``DenseGeneral_N`` (with their bias as evidence).

A kernel of three or more axes that none of these settles is an error naming
it and the ways to say what it is; nothing is guessed.

=============================================  ====================================================
module type                                    kernel layout (before any stack axes)
=============================================  ====================================================
``nn.Dense``, ``nnx.Linear``                   ``"io"``
``nn.DenseGeneral``, ``nnx.LinearGeneral``     a stack axis per batch axis, ``"i"`` per contracted
                                               axis, ``"o"`` per feature axis (attention q/k/v:
                                               ``"ioo"``, out: ``"iio"``)
``nn.Conv``, ``nn.ConvTranspose``, nnx's       a tap axis per spatial axis, then ``"io"``
``nn.Einsum``, ``nnx.Einsum``                  from the equation: contracted letters ``"i"``, the
                                               kernel's output letters ``"o"``, letters also in the
                                               input and output a stack axis
``nn.ConvLocal``                               left alone (a matrix per output position; no rule)
=============================================  ====================================================
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx, struct
from flax.core import meta

from ..core.name_rules import _flax_kernel_rule, _FlaxTree
from ..core.patterns import Patterns, _candidates, glob_match
from ..core.layout import parse_layout

__all__ = ["STACK_NAMES", "Leaf", "plan"]

#: Partition names that mark an axis as stacked layers (``nn.scan`` over layers, an ensemble).
STACK_NAMES = frozenset({"layers", "layer", "stack", "stacked", "ensemble", "members", "stages"})

_STACK_LETTERS = "LMNPQRSTUVWXYZABCDEFGHJK"
_TAP_LETTERS = {1: "w", 2: "hw", 3: "dhw"}
_MORE_TAPS = "abcdefghjklmnpqrstuvwxyz"

HOW = (
    "say what it is with model= (the nnx Module, or (linen_module, *example_inputs)): the module types and the "
    "axes nn.scan/nn.vmap stacked are read from it; stacked={'ScanBlock_0': 1} for leading stack axes; "
    "layouts={'path': 'Lio'} for a layout (uppercase letters are stacked layers, each projected and scaled on "
    f"its own); a partition name in {sorted(STACK_NAMES)} recorded with the weight; or exclude it"
)


class Leaf:
    """One selected weight: its position in the flattened tree, name, array and layout."""

    __slots__ = ("index", "path", "array", "layout")

    def __init__(self, index, path, array, layout):
        self.index, self.path, self.array, self.layout = index, path, array, layout


# --- the tree ------------------------------------------------------------------------------------------


def is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _is_leaf(x) -> bool:
    """nnx Variables and linen metadata boxes (``nn.Partitioned``) are kept whole."""
    return isinstance(x, (nnx.Variable, meta.AxisMetadata))


def flatten(tree):
    """``[(key path, leaf)]`` with nnx Variables and metadata boxes kept whole, and the tree definition."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)


def value(leaf):
    """The array a leaf holds (an nnx Variable's value, a metadata box's content)."""
    if isinstance(leaf, nnx.Variable):
        return leaf.get_value()
    while isinstance(leaf, meta.AxisMetadata):
        try:  # nn.Partitioned: the content itself, without a sharding constraint
            leaf = leaf.unbox(apply_constraint=False)
        except TypeError:
            leaf = leaf.unbox()
    return leaf


def rewrap(old, new):
    """``new`` in the place of the leaf ``old``: a Variable stays a Variable, a box a box."""
    if isinstance(old, nnx.Variable):
        return old.replace(new)
    if isinstance(old, meta.AxisMetadata):
        inner = old.unbox()
        return old.replace_boxed(rewrap(inner, new) if isinstance(inner, meta.AxisMetadata) else new)
    return new


def _axis_names(leaf):
    """Per-axis partition names recorded with a leaf, or None."""
    names = None
    if isinstance(leaf, meta.AxisMetadata):
        names = getattr(leaf, "names", None)
    elif isinstance(leaf, nnx.Variable):
        md = leaf.get_metadata()
        names = md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")
    if isinstance(names, (tuple, list)) and all(n is None or isinstance(n, str) for n in names):
        return tuple(names)
    return None


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _raw_key(key):
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def is_variables_dict(tree) -> bool:
    return isinstance(tree, Mapping) and not isinstance(tree, nnx.State) and "params" in tree


def param_names(pairs, tree) -> list[tuple[str, ...] | None]:
    """Per flattened leaf: its path as names (relative to ``params``), or None if it is not a parameter."""
    variables = is_variables_dict(tree)
    out = []
    for path, leaf in pairs:
        names = tuple(_key_name(k) for k in path)
        if isinstance(leaf, nnx.Variable) and not isinstance(leaf, nnx.Param):
            names = None
        elif variables:
            names = names[1:] if names[:1] == ("params",) else None
        if names and isinstance(path[-1], jax.tree_util.GetAttrKey) and names[-1] == "value":
            names = names[:-1]  # old nnx VariableState leaves end in `.value`
        out.append(names or None)
    return out


# --- what the model says ----------------------------------------------------------------------------------


class _Log:
    """The axes linen's lifted transforms removed from each boxed parameter: ``{path: {(ndim, axis)}}``."""

    def __init__(self):
        self.removed: dict[str, set] = {}

    def __hash__(self):  # static pytree data: compared by identity
        return id(self)

    def __eq__(self, other):
        return self is other


class _Probe(struct.PyTreeNode, meta.AxisMetadata):
    """A parameter box that records the axes ``nn.scan``/``nn.vmap`` take out of it (``remove_axis``)."""

    value: object
    path: str = struct.field(pytree_node=False)
    log: _Log = struct.field(pytree_node=False)

    def unbox(self):
        return self.value

    def replace_boxed(self, val):
        return self.replace(value=val)

    def add_axis(self, index, params):
        return self

    def remove_axis(self, index, params):
        ndim = len(jnp.shape(self.value))
        self.log.removed.setdefault(self.path, set()).add((ndim, index % ndim))
        return self


class _Model:
    """Module information: the module owning each path, and (linen) the stack axes of each parameter."""

    def __init__(self, kind: str, modules: dict, stacks: dict | None = None):
        self.kind, self.modules, self.stacks = kind, modules, stacks or {}


def _model_info(model, tree, pairs, names) -> _Model | None:
    if model is None:
        return None
    if isinstance(model, nnx.Module):
        modules = {}
        for path, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module):
                modules.setdefault(tuple(str(k) for k in path), node)
        return _Model("nnx", modules)
    if isinstance(model, nn.Module):
        raise TypeError(
            "model=: a linen Module records its submodules only when called; pass it with example inputs, "
            "model=(module, *inputs) (or (functools.partial(module.apply, ...), *inputs) for keyword arguments)"
        )
    if not isinstance(model, tuple) or not model or not callable(model[0]):
        raise TypeError(
            "model= expects an nnx Module, or (linen_module, *example_inputs), or (fn, *example_inputs) with "
            f"fn(variables, *inputs) calling the model; got {type(model).__name__}"
        )
    if isinstance(tree, nnx.State):
        raise TypeError("model=(linen module, *inputs) describes a linen tree; for an nnx State pass the nnx Module")
    return _linen_info(model, tree, pairs, names)


def _linen_info(model, tree, pairs, names) -> _Model:
    """Trace the model abstractly on boxed parameters; record module types and the axes lifting removed."""
    fn, *args = model
    log = _Log()
    boxed = []
    for (_, leaf), n in zip(pairs, names):
        x = value(leaf)
        abstract = jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))
        boxed.append(_Probe(abstract, "/".join(n), log) if n else abstract)
    variables = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(tree, is_leaf=_is_leaf), boxed)
    if not is_variables_dict(tree):
        variables = {"params": variables}
    if isinstance(fn, nn.Module):
        module = fn
        key = jax.random.key(0)  # for streams the call may draw from (dropout); nothing here is computed

        def call(v):
            return module.apply(v, *args, mutable=True, rngs={"params": key, "dropout": key})
    else:

        def call(v):
            return fn(v, *args)

    modules: dict[tuple, object] = {}

    def record(next_fun, call_args, call_kwargs, context):
        out = next_fun(*call_args, **call_kwargs)
        try:
            path = tuple(context.module.path)
        except Exception:  # an unbound module: nothing to record
            return out
        modules.setdefault(path, context.module)  # the innermost (unlifted) module of a path completes first
        return out

    try:
        with nn.intercept_methods(record):
            jax.eval_shape(call, variables)
    except Exception as e:
        raise ValueError(
            f"model=: calling the model on the tree (abstractly, to read its module types) failed: "
            f"{type(e).__name__}: {e}. Pass the model and example inputs it takes with these variables: "
            "model=(module, *inputs), or (functools.partial(module.apply, ...), *inputs)"
        ) from e
    stacks = {}
    for path, removed in log.removed.items():
        # Nested transforms remove one axis each, outermost first (the most axes): map back to the stored axes.
        ndim0 = max(n for n, _ in removed)
        axes, positions = list(range(ndim0)), []
        for _, index in sorted(removed, key=lambda e: -e[0]):
            positions.append(axes.pop(index))
        stacks[path] = tuple(sorted(positions))
    return _Model("linen", modules, stacks)


# --- module types -> kernel roles ------------------------------------------------------------------------
# A rule maps (module, the kernel's unstacked shape) to roles, one letter per axis: "i", "o", "t" (a
# spatial tap), "S" (stacked: independent matrices); or raises _Unknown(why) / _Skip(reason).


class _Unknown(Exception):
    pass


class _Skip(Exception):
    pass


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _dense(module, shape):
    if len(shape) != 2:
        raise _Unknown(f"a {type(module).__name__} kernel has 2 axes, this one {shape}")
    return "io"


def _general(batch: int, inputs: int, outputs: int, module, shape):
    if batch + inputs + outputs != len(shape):
        raise _Unknown(
            f"{type(module).__name__} with {batch} batch, {inputs} input and {outputs} output axes, but a kernel of "
            f"shape {shape}"
        )
    return "S" * batch + "i" * inputs + "o" * outputs


def _dense_general(module, shape):
    return _general(len(_tuple(module.batch_dims)), len(_tuple(module.axis)), len(_tuple(module.features)), module, shape)


def _linear_general(module, shape):
    return _general(len(module.batch_axis), len(module.in_features), len(module.out_features), module, shape)


def _conv(module, shape):
    if len(shape) < 3:
        raise _Unknown(f"a {type(module).__name__} kernel has spatial axes, then in and out; got {shape}")
    return "t" * (len(shape) - 2) + "io"


def _einsum(module, shape):
    equation = getattr(module, "einsum_str", None)
    if not isinstance(equation, str):
        raise _Unknown(f"{type(module).__name__} without an einsum_str attribute (given at call time)")
    lhs, _, out = equation.replace(" ", "").partition("->")
    operands = lhs.split(",")
    if len(operands) != 2 or not out or "." in operands[1]:
        raise _Unknown(f"an einsum {equation!r} not of the form 'input,kernel->output' with a lettered kernel")
    x, k = operands
    roles = []
    for c in k:
        if c in x and c in out:
            roles.append("S")  # one matrix per index, as a batch of independent layers
        elif c in x:
            roles.append("i")
        elif c in out:
            roles.append("o")
        else:
            raise _Unknown(f"kernel letter {c!r} of {equation!r} is summed over")
    if "i" not in roles or "o" not in roles or len(roles) != len(shape):
        raise _Unknown(f"the kernel of {equation!r} has no input or no output axis, or not {len(shape)} axes")
    return "".join(roles)


def _conv_local(module, shape):
    raise _Skip("ConvLocal: a separate matrix per output position, for which FIRE has no rule; layouts= projects it")


_TABLE = {
    nn.Dense: _dense,
    nnx.Linear: _dense,
    nn.DenseGeneral: _dense_general,
    nnx.LinearGeneral: _linear_general,
    nn.Conv: _conv,
    nn.ConvTranspose: _conv,
    nnx.Conv: _conv,
    nnx.ConvTranspose: _conv,
    nn.Einsum: _einsum,
    nnx.Einsum: _einsum,
    nn.ConvLocal: _conv_local,
}


def _rule_for(module):
    for cls in type(module).__mro__:
        if cls in _TABLE:
            return _TABLE[cls]
    return None


def _nnx_kernel_shape(module):
    """The unstacked kernel shape an nnx module's attributes give, or None."""
    if isinstance(module, nnx.Linear):
        return (module.in_features, module.out_features)
    if isinstance(module, nnx.LinearGeneral):
        return (*module.batch_axis.values(), *module.in_features, *module.out_features)
    shape = getattr(module, "kernel_shape", None)
    return tuple(shape) if isinstance(shape, (tuple, list)) else None


def _embeddings(shape, inner) -> list[tuple[int, ...]]:
    """Every set of axes of ``shape`` whose removal leaves ``inner``."""
    k = len(shape) - len(inner)
    if k < 0:
        return []
    out = []
    for stack in itertools.combinations(range(len(shape)), k):
        if tuple(s for a, s in enumerate(shape) if a not in stack) == tuple(inner):
            out.append(stack)
    return out


def _letters(roles: str) -> str:
    """Roles ("S", "t", "o", "i") -> a layout: stack axes L, M, N, ..., tap axes w / hw / dhw / a, b, ..."""
    taps = roles.count("t")
    tap_letters = iter(_TAP_LETTERS.get(taps) or _MORE_TAPS[:taps])
    stack_letters = iter(_STACK_LETTERS)
    return "".join(next(stack_letters) if r == "S" else next(tap_letters) if r == "t" else r for r in roles)


def _roles(layout: str) -> str:
    return "".join("S" if c.isupper() else c if c in "oi" else "t" for c in layout)


def _insert(roles: str, stack: tuple[int, ...], ndim: int) -> str:
    inner = iter(roles)
    return "".join("S" if a in stack else next(inner) for a in range(ndim))


# --- selection -----------------------------------------------------------------------------------------------


def _mapping(spec, what: str, check) -> dict:
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        raise TypeError(f"{what} must be a mapping of glob patterns to {check}, got {type(spec).__name__}")
    return dict(spec)


def _check_options(layouts, stacked):
    layouts = _mapping(layouts, "layouts", "layout strings (or None)")
    for pattern, lay in layouts.items():
        if not isinstance(pattern, str) or not (lay is None or isinstance(lay, str)):
            raise TypeError(f"layouts must map glob patterns to layout strings (or None), got {pattern!r}: {lay!r}")
    stacked = _mapping(stacked, "stacked", "numbers of leading stack axes")
    for pattern, n in stacked.items():
        if not isinstance(pattern, str) or isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"stacked must map glob patterns to numbers of leading stack axes, got {pattern!r}: {n!r}")
        if n < 1:
            raise ValueError(f"stacked: {pattern!r} must map to at least 1 stack axis, got {n}")
    return layouts, stacked


def _first(mapping: Mapping, names: tuple[str, ...]):
    """The first pattern of ``mapping`` naming the leaf (its full path, or a module path for a kernel)."""
    path = "/".join(names)
    for pattern, val in mapping.items():
        if glob_match(path, pattern):
            return pattern, val
        if names[-1] == "kernel" and any(glob_match(c, pattern) for c in _candidates("/".join(names[:-1]), "/")):
            return pattern, val
    return None, None


def _why_left(names: tuple[str, ...]) -> str:
    leaf = names[-1]
    if leaf == "embedding" or "embed" in leaf.lower():
        return "an embedding"
    if leaf == "bias":
        return "a bias"
    if leaf == "scale":
        return "a normalization scale"
    return "not a kernel (layouts= adds it)"


class Trained:
    """A ``trainable=`` that fire_core read itself: one flag per leaf of :func:`flatten`, and why the others are frozen.

    ``fire_core.optax.with_fire`` passes one for the leaves its optimizer never moves with a gradient.
    """

    def __init__(self, flags, reason: str):
        self.flags, self.reason = [bool(f) for f in flags], reason


_FROZEN = "frozen: trainable= marks it not trained (leave trainable= out to project it)"


def _trainable(trainable, tree, pairs, names) -> list[bool]:
    """Per flattened leaf: whether ``trainable`` says it is trained (True for non-parameters)."""
    n = len(pairs)
    if trainable is None:
        return [True] * n
    if isinstance(trainable, Trained):
        if len(trainable.flags) != n:
            raise ValueError(f"trainable=: {len(trainable.flags)} flags for a tree of {n} leaves")
        return [f or nm is None for f, nm in zip(trainable.flags, names)]
    if isinstance(trainable, bool):  # an optax mask of one leaf: every parameter, or none
        return [trainable or nm is None for nm in names]
    if isinstance(trainable, nnx.Optimizer):
        trainable = trainable.wrt
    if _is_nnx_filter(trainable):
        predicate = nnx.filterlib.to_predicate(trainable)
        flags = []
        for (path, leaf), nm in zip(pairs, names):
            if nm is None:
                flags.append(True)
                continue
            if not isinstance(leaf, nnx.Variable):
                raise TypeError(
                    "trainable=: an nnx filter needs an nnx State (Variables to test); for a linen tree pass a "
                    "pytree of bools like the parameters (an optax mask)"
                )
            flags.append(bool(predicate(tuple(_raw_key(k) for k in path), leaf)))
        return flags
    params = tree["params"] if is_variables_dict(tree) else tree
    mask = trainable(params) if callable(trainable) and not isinstance(trainable, Mapping) else trainable
    try:
        full = jax.tree_util.tree_map(
            lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub, is_leaf=_is_leaf), mask, params,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
        values = [bool(m.get_value() if isinstance(m, nnx.Variable) else m)
                  for m in jax.tree_util.tree_leaves(full, is_leaf=_is_leaf)]
    except (ValueError, TypeError) as e:
        raise ValueError(
            "trainable= must be a pytree of bools with the parameters' structure (or a prefix of it), a function "
            f"params -> such a tree (an optax mask), an nnx filter or an nnx.Optimizer: {e}"
        ) from e
    except jax.errors.ConcretizationTypeError as e:
        raise TypeError("trainable=: the mask must hold concrete bools, not traced values") from e
    flags, it = [], iter(values)
    for nm in names:
        flags.append(next(it) if nm is not None else True)
    return flags


def _is_nnx_filter(f) -> bool:
    if isinstance(f, (type, str)) or f is Ellipsis or isinstance(f, bool):
        return True
    if isinstance(f, (tuple, list)):
        return all(_is_nnx_filter(x) for x in f)
    return type(f).__module__.startswith("flax.nnx.filterlib")


def plan(tree, *, include=None, exclude=None, layouts=None, stacked=None, model=None, trainable=None):
    """Flatten ``tree`` and decide every parameter leaf: ``(pairs, treedef, chosen, skipped)``.

    ``chosen``: a :class:`Leaf` per weight to project, in tree order;
    ``skipped``: ``(path, shape, reason)`` per floating parameter of two or
    more axes that is not. Raises, before anything is done: a TypeError for
    arguments of the wrong type, a ValueError for an include, exclude,
    ``layouts`` or ``stacked`` pattern that matches nothing (with the closest
    paths), for kernels nothing says how to read (all of them named), and
    when no weight is selected at all.
    """
    include, exclude = Patterns(include, "include"), Patterns(exclude, "exclude")
    layouts, stacked = _check_options(layouts, stacked)
    pairs, treedef = flatten(tree)
    names = param_names(pairs, tree)
    info = _model_info(model, tree, pairs, names)
    flags = _trainable(trainable, tree, pairs, names)
    shapes = _FlaxTree()
    for (_, leaf), nm in zip(pairs, names):
        if nm is not None and hasattr(value(leaf), "shape"):
            shapes.add(nm, jnp.shape(value(leaf)))
    used: set[str] = set()
    chosen, skipped, problems, known = [], [], [], []
    for index, ((_, leaf), nm, trained) in enumerate(zip(pairs, names, flags)):
        if nm is None:
            continue
        array = value(leaf)
        if not hasattr(array, "ndim"):
            continue
        path, shape = "/".join(nm), tuple(int(s) for s in jnp.shape(array))
        floating = jnp.issubdtype(jnp.result_type(array), jnp.floating)
        pattern, override = _first(layouts, nm)
        if pattern is not None and override is not None and len(override) != len(shape) and nm[-1] != "kernel":
            pattern = None  # a pattern adds a leaf only where its layout fits (`proj/*` skips `proj/bias`)
        if pattern is None and (nm[-1] != "kernel" or len(shape) < 2):
            if floating and len(shape) >= 2:
                skipped.append((path, shape, _why_left(nm)))
            continue
        if pattern is not None:
            used.add(pattern)
        known.append(path)
        # Both are tested on every candidate, so each pattern's use is known (one matching nothing is an error).
        keep = include.func(path, array) if include.func else (include.hit(path, "/") if include.patterns else True)
        drop = exclude.func(path, array) if exclude.func else exclude.hit(path, "/")
        if not keep or drop:
            skipped.append((path, shape, "excluded by exclude=" if keep else "not matched by include="))
            continue
        if pattern is not None and override is None:
            skipped.append((path, shape, f"layouts pattern {pattern!r} maps it to None"))
            continue
        if 0 in shape:
            skipped.append((path, shape, "empty"))
            continue
        if not trained:
            skipped.append((path, shape, trainable.reason if isinstance(trainable, Trained) else _FROZEN))
            continue
        if pattern is not None:
            parse_layout(override, shape, path)
            chosen.append(Leaf(index, path, array, override))
            continue
        try:
            layout = _classify(nm, shape, leaf, info, stacked, used, shapes)
        except _Skip as why:
            skipped.append((path, shape, str(why)))
            continue
        except _Unknown as why:
            problems.append(f"{path} {shape}: {why}")
            continue
        chosen.append(Leaf(index, path, array, layout))
    _check_used(layouts, stacked, used, ["/".join(n) for n in names if n])
    include.check_used(known, "kernel FIRE would consider")
    exclude.check_used(known, "kernel FIRE would consider")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise ValueError(
            f"fire_core.flax: no layout for {len(problems)} kernel(s), nothing was changed:\n  {shown}\n"
            f"For each, {HOW}."
        )
    if not chosen:
        reasons = sorted({reason for _, _, reason in skipped})
        raise ValueError(
            "fire_core.flax: no weight selected, nothing to project"
            + (f" (left alone: {'; '.join(reasons)})" if reasons else " (the tree has no kernel of 2 or more axes)")
        )
    return pairs, treedef, chosen, skipped


def _classify(nm, shape, leaf, info, stacked, used, tree) -> str:
    """The layout of a kernel from the module, ``stacked=``, recorded partition names or Flax's names."""
    module = info.modules.get(nm[:-1]) if info is not None else None
    rule = _rule_for(module) if module is not None else None
    stack = None  # positions of the stack axes, once known
    pattern, count = _first(stacked, nm)
    if pattern is not None:
        used.add(pattern)
        if count >= len(shape):
            raise _Unknown(f"stacked pattern {pattern!r} gives {count} stack axes, more than the kernel has")
        stack = tuple(range(count))
    elif info is not None and info.kind == "linen" and (module is not None or "/".join(nm) in info.stacks):
        stack = info.stacks.get("/".join(nm), ())  # the trace saw this parameter: no axis removed, none stacked
    elif info is not None and module is not None:
        inner = _nnx_kernel_shape(module)
        if inner is not None:
            stack = _nnx_stack(shape, inner, leaf, module)
    if stack is None:
        names = _axis_names(leaf)
        if names is not None and len(names) == len(shape):
            marked = tuple(a for a, n in enumerate(names) if n in STACK_NAMES)
            stack = marked or None
    inner_shape = tuple(s for a, s in enumerate(shape) if a not in (stack or ()))
    if rule is not None:
        roles = rule(module, inner_shape)
    else:
        layout, why = _flax_kernel_rule(nm, inner_shape, tree, None if stack is None else len(stack))
        if layout is None:
            raise _Unknown(why)
        roles = _roles(layout)
    return _letters(_insert(roles, stack or (), len(shape)))


def _nnx_stack(shape, inner, leaf, module) -> tuple[int, ...]:
    """Where nnx.vmap/nnx.scan put the stack axes of a kernel whose unstacked shape the module gives."""
    fits = _embeddings(shape, inner)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise _Unknown(f"the shape {shape} does not hold {type(module).__name__}'s kernel shape {inner}")
    names = _axis_names(leaf)
    if names is not None and len(names) == len(shape):
        marked = [s for s in fits if all(names[a] in STACK_NAMES for a in s)]
        if len(marked) == 1:
            return marked[0]
    rule = _rule_for(module)
    roles = rule(module, inner) if rule is not None else None
    layouts = [repr(_letters(_insert(roles, s, len(shape)))) for s in fits] if roles else ["..."]
    raise _Unknown(
        f"{type(module).__name__}'s kernel {inner} sits in {shape} with its stack axes at {' or '.join(map(str, fits))}"
        f" (the sizes coincide and no partition name records which): layouts= settles it ({' or '.join(layouts)})"
    )


def _check_used(layouts, stacked, used, all_paths) -> None:
    for what, mapping in (("layouts", layouts), ("stacked", stacked)):
        for pattern in mapping:
            if pattern not in used:
                close = difflib.get_close_matches(pattern, all_paths, n=3, cutoff=0.5)
                hint = f"; closest: {', '.join(close)}" if close else ""
                raise ValueError(f"{what} pattern {pattern!r} matches no kernel{hint}")
