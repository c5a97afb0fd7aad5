"""Finding what a vector field should be differentiated with respect to."""

from __future__ import annotations

import torch

from .._tree import Flattener, tree_leaves, tree_map

__all__ = ["discover"]


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
        out = problem.terms.vf(float(problem.t0), flat.unflatten(probe), args_proxy)
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        exclude = {id(probe), *(id(p) for p in proxies.values()), *(id(x) for x in arg_leaves)}
        params = _graph_leaves(outs, exclude)
    for p in params:
        if p.device != flat.device:
            raise ValueError(f"a parameter of the vector field is on {p.device} but y0 is on {flat.device}")
    return flat, y0, args_proxy, proxies, arg_leaves, params
