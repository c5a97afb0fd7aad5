"""diffrax's stiff solvers on the problems of stiff_work_precision.py (run by that script in a
Python that has diffrax and jax; separate because the project's environment does not carry jax).

Reads ``{"rtols": [...], "problems": {name: {"t1": T, "y0": [...], "scale": s}}}`` on stdin and
prints one JSON line per solve: problem, solver, rtol, y(T), steps (accepted + rejected), wall
(best of ``reps``, after one compiling run).
"""

import json
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platform_name", "cpu")
import diffrax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

N_CELLS, D_COEF, R_COEF = 32, 0.02, 5.0


def rober(t, y, args):
    y1, y2, y3 = y
    return jnp.stack([-0.04 * y1 + 1e4 * y2 * y3, 0.04 * y1 - 1e4 * y2 * y3 - 3e7 * y2**2, 3e7 * y2**2])


def hires(t, y, args):
    y1, y2, y3, y4, y5, y6, y7, y8 = y
    return jnp.stack(
        [
            -1.71 * y1 + 0.43 * y2 + 8.32 * y3 + 0.0007,
            1.71 * y1 - 8.75 * y2,
            -10.03 * y3 + 0.43 * y4 + 0.035 * y5,
            8.32 * y2 + 1.71 * y3 - 1.12 * y4,
            -1.745 * y5 + 0.43 * y6 + 0.43 * y7,
            -280 * y6 * y8 + 0.69 * y4 + 1.71 * y5 - 0.43 * y6 + 0.69 * y7,
            280 * y6 * y8 - 1.81 * y7,
            -280 * y6 * y8 + 1.81 * y7,
        ]
    )


def vdp(t, y, args):
    return jnp.stack([y[1], 1e3 * (1 - y[0] ** 2) * y[1] - y[0]])


def kpp(t, u, args):
    dx = 1.0 / N_CELLS
    padded = jnp.concatenate([u[:1], u, u[-1:]])
    return R_COEF * u * (1 - u) + D_COEF * (padded[2:] - 2 * u + padded[:-2]) / dx**2


FIELDS = {"Robertson": rober, "HIRES": hires, "Van der Pol": vdp, "Fisher-KPP": kpp}


def main():
    spec = json.load(sys.stdin)
    reps = spec.get("reps", 3)
    for name, p in spec["problems"].items():
        f = FIELDS[next(k for k in FIELDS if name.startswith(k))]
        y0 = jnp.asarray(p["y0"], dtype=jnp.float64)
        for label, solver in (("Kvaerno5", diffrax.Kvaerno5()),):
            for rtol in spec["rtols"]:

                @jax.jit
                def run(y0, rtol=rtol, f=f, solver=solver, p=p):
                    return diffrax.diffeqsolve(
                        diffrax.ODETerm(f), solver, 0.0, p["t1"], None, y0,
                        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=rtol * p["scale"]),
                        max_steps=200000, throw=False,
                    )  # fmt: skip

                sol = run(y0)
                jax.block_until_ready(sol.ys)
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    sol = run(y0)
                    jax.block_until_ready(sol.ys)
                    best = min(best, time.perf_counter() - t0)
                ok = bool(sol.result == diffrax.RESULTS.successful)
                print(
                    json.dumps(
                        {
                            "problem": name,
                            "solver": label,
                            "rtol": rtol,
                            "ok": ok,
                            "y": [float(x) for x in sol.ys[-1]],
                            "steps": int(sol.stats["num_steps"]),
                            "rejected": int(sol.stats["num_rejected_steps"]),
                            "wall": best,
                        }
                    ),  # fmt: skip
                    flush=True,
                )


if __name__ == "__main__":
    main()
