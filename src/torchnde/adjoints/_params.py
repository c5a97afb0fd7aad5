"""Finding what a vector field should be differentiated with respect to."""

from __future__ import annotations

import torch

from .._tree import Flattener, tree_leaves, tree_map

__all__ = ["discover", "check_reached", "_scalar"]


def _scalar(x) -> float:
    """A time given as a number or a 0-d tensor (possibly requiring grad), as a float."""
    return float(x.detach()) if isinstance(x, torch.Tensor) else float(x)


def _graph_leaves(outputs, exclude) -> list:
    """Leaf tensors requiring grad that ``outputs`` depend on (module parameters, captured
    tensors), found by walking the autograd graph; ``exclude`` holds ids to skip."""
    found, seen = [], set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # set on AccumulateGrad nodes only
        if isinstance(variable, torch.Tensor):
            if id(variable) not in exclude:
                found.append(variable)
            continue
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


def discover(problem):
    """Everything gradients must reach, for adjoints with a custom backward pass.

    Returns ``(flat, y0, args_proxy, proxies, arg_leaves, params)``: the state's flattener and
    flat ``y0``; ``args`` with every tensor that requires grad replaced by a detached leaf
    stand-in (``proxies`` maps ``id(original) -> stand-in``; ``arg_leaves`` lists the originals, which
    enter the ``autograd.Function`` so the gradient continues into the caller's graph); and the
    leaf tensors the vector field uses (module parameters, captured tensors), found by walking the
    autograd graph of one evaluation at ``t0``.
    """
    flat = Flattener(problem.y0, batch=False)
    y0 = flat.flatten(problem.y0)
    arg_leaves = [x for x in tree_leaves(problem.args) if isinstance(x, torch.Tensor) and x.requires_grad]
    proxies = {id(x): x.detach().requires_grad_() for x in arg_leaves}
    args_proxy = tree_map(lambda x: proxies.get(id(x), x) if isinstance(x, torch.Tensor) else x, problem.args)
    with torch.enable_grad():
        probe = y0.detach().requires_grad_()
        out = problem.terms.vf(_scalar(problem.t0), flat.unflatten(probe), args_proxy)
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        exclude = {id(probe), *(id(p) for p in proxies.values()), *(id(x) for x in arg_leaves)}
        params = _graph_leaves(outs, exclude)
    for p in params:
        if p.device != flat.device:
            raise ValueError(f"a parameter of the vector field is on {p.device} but y0 is on {flat.device}")
    return flat, y0, args_proxy, proxies, arg_leaves, params


def check_reached(params: list, reached: list) -> None:
    """Raise if a parameter found in the forward pass got no gradient in the backward pass: the
    vector field no longer uses it, which happens when the parameters were swapped in only for
    the forward call (``torch.func.functional_call``)."""
    missing = [tuple(p.shape) if isinstance(p, torch.Tensor) else "?" for p, r in zip(params, reached) if not r]
    if missing:
        raise RuntimeError(
            f"{len(missing)} parameter(s) the vector field used in the forward pass (shapes {missing[:5]}) "
            "were not used by it during the backward pass, so their gradients would be wrong. This "
            "happens when parameters are substituted only for the forward call, e.g. with "
            "torch.func.functional_call. Use adjoint=DirectAdjoint() there."
        )
