"""Matmul flops of a traced program, counted from its jaxpr (an independent check of the analytic
flop formulas): ``2 · |output| · |contracted dims|`` per ``dot_general``, multiplied through
``scan`` lengths and Pallas grids (a kernel body runs once per grid point, on whole blocks)."""
import math

import jax
import jax.extend  # noqa: F401  (jax.extend.core.Jaxpr, ClosedJaxpr)


def matmul_flops(fn, *args) -> int:
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def dot_generals(fn, *args) -> list:
    """The ``dot_general`` equations of the traced program, each loop or kernel body once."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn)
            elif eqn.primitive.name == "while":  # no trip count needed here
                walk(eqn.params["cond_jaxpr"].jaxpr)
                walk(eqn.params["body_jaxpr"].jaxpr)
            else:
                for sub, _ in _sub_jaxprs(eqn):
                    walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _sub_jaxprs(eqn):
    """(jaxpr, multiplicity) of the programs an equation runs."""
    name, params = eqn.primitive.name, eqn.params
    if name == "scan":
        return [(params["jaxpr"].jaxpr, params["length"])]
    if name == "pallas_call":
        return [(params["jaxpr"], math.prod(params["grid_mapping"].grid))]
    if name == "while":
        raise ValueError("a while loop has no static trip count")
    if name == "cond":
        counts = [_count(b.jaxpr) for b in params["branches"]]
        if len(set(counts)) > 1:
            raise ValueError(f"cond branches differ in matmul flops: {counts}")
        return [(params["branches"][0].jaxpr, 1)]
    found = []
    for value in params.values():
        if isinstance(value, jax.extend.core.ClosedJaxpr):
            found.append((value.jaxpr, 1))
        elif isinstance(value, jax.extend.core.Jaxpr):
            found.append((value, 1))
    return found


def _count(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
            continue
        for sub, times in _sub_jaxprs(eqn):
            total += times * _count(sub)
    return total
