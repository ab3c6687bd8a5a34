"""Multistep solvers with one model evaluation per step, for few-step sampling (SPEC.md §12): DPM-Solver++ (2M, 3M)
and UniPC (bh2) in the flow's data prediction, and variable-step Adams-Bashforth (2 and 3) on the velocity.

Same conventions as `solvers.py`: fn(x, t) -> v, t = 0 noise .. 1 data, any increasing grid. The flow path is
x_t = alpha_t * data + sigma_t * noise with alpha_t = t, sigma_t = 1 - t; the data prediction of an evaluation is
m = x + (1 - t) v, and lambda = log(alpha/sigma) = log(t / (1 - t)) is the half log-SNR (-inf at pure noise, inf at
data). With h = lambda_1 - lambda_0 every exponential-integrator step here starts from
    x_1 = (sigma_1/sigma_0) x_0 + t_1 (1 - e^-h) m_0
and adds corrections from earlier data predictions:
- DPM-Solver++ (Lu et al. 2022): 2M as diffusers' DPMSolverMultistepScheduler ("midpoint" form), from one earlier
  prediction; Lumina-Image-2.0's "dpm" is this 2M on its own grid (SANA's `dpm_solver.py`: order 2, multistep,
  lower-order final step). 3M from two earlier predictions: their divided differences give d1 = h m' and
  d2 = h^2 m''/2 at the current point, and each enters with its exact weight, h times the integral over [0, 1] of
  e^(-h(1-u)) u^k. (The 3M of diffusers and ComfyUI's dpmpp_3m_sde weighs d2 with h^3 phi_3 / h^2, the weight of
  m'' itself, half the right one: that 3M converges at order 2 only; this one at order 3.)
- UniPC (Zhao et al. 2023; diffusers' UniPCMultistepScheduler, variant bh2): the predictor UniP-p, then, once the
  next point has been evaluated, the corrector UniC-p replaces the predicted point using that same evaluation (no
  extra model call); the evaluation stays the one made at the predicted point. The corrector adds one order: UniPC-p
  converges at order p + 1.

Orders: the first steps are of lower order (an earlier point is used only where lambda is finite and increasing, so
the point at t = 0 never is), and by the rules of diffusers, which SPEC.md §12 follows: the last step is first order
(to t = 1 it gives x = m exactly, the data prediction of the last evaluation, since sigma = 0 and h = inf there);
below 15 steps DPM-Solver++ takes the step before it at order 2 at most; UniPC caps step i at steps - i. (By index,
as diffusers: on a grid that stops short of t = 1 the last step is first order too.)

AB2 and AB3 are the two- and three-step Adams-Bashforth methods for uneven steps on v in t (AB3 exact for a velocity
quadratic in t), after one Euler step (and one AB2 step); they have no singularity at t = 1, so their last step keeps
the full order.

Each loop calls report(step, steps, t, x, denoised, evals) after every step (finiteness check and callback).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

# diffusers' rule: below this many steps, DPM-Solver++'s step before the last is at most second order.
LOWER_ORDER_SECOND_BELOW = 15


def half_log_snr(t: float) -> float:
    """lambda = log(alpha / sigma) of the flow path (alpha = t, sigma = 1 - t); -inf at pure noise, inf at data."""
    if t <= 0.0:
        return -math.inf
    if t >= 1.0:
        return math.inf
    return math.log(t) - math.log1p(-t)


def _history(lams: list, i: int, depth: int) -> int:
    """How many of the points before point i (at most `depth`) can enter a difference: going back from i, each must
    have a finite lambda below the next one's (the point at t = 0, lambda = -inf, never can)."""
    n = 0
    while n < depth and i - n - 1 >= 0:
        a, b = lams[i - n - 1], lams[i - n]
        if not (math.isfinite(a) and math.isfinite(b) and a < b):
            break
        n += 1
    return n


def _taylor_weights(h: float) -> tuple:
    """(w1, w2) = h * integral over [0, 1] of e^(-h(1-u)) u^k du for k = 1, 2: the weights of the first and second
    Taylor terms of the data prediction in lambda over a step of h (w1 = 1 - (1 - e^-h)/h, w2 = 1 - 2/h +
    2(1 - e^-h)/h^2; their series below h = 0.01, where the closed forms cancel)."""
    if h < 1e-2:
        return (h / 2 - h * h / 6 + h**3 / 24 - h**4 / 120 + h**5 / 720,
                h / 3 - h * h / 12 + h**3 / 60 - h**4 / 360 + h**5 / 2520)
    e = -math.expm1(-h)  # 1 - e^-h
    return 1 - e / h, 1 - 2 / h + 2 * e / (h * h)


def dpmpp(fn: Callable, x: torch.Tensor, ts: list, order: int, report: Callable) -> torch.Tensor:
    """DPM-Solver++ multistep of order 2 or 3 over the grid ts."""
    steps = len(ts) - 1
    lams = [half_log_snr(t) for t in ts]
    ms = []  # the data predictions of the last `order` points, newest last
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        v = fn(x, t0)
        m = x + (1 - t0) * v  # the data prediction (the original's (x - sigma*noise)/alpha, simplified)
        ms = (ms + [m])[-order:]
        h = lams[i + 1] - lams[i]
        alpha_phi = -t1 * math.expm1(-h)  # alpha_1 (1 - e^-h): t1 at h = inf, 0 for an empty step
        k = 1 + _history(lams, i, order - 1)
        if i == steps - 1:
            k = 1
        elif i == steps - 2 and steps < LOWER_ORDER_SECOND_BELOW:
            k = min(k, 2)
        if k == 1:
            x_next = ((1 - t1) / (1 - t0)) * x + alpha_phi * m
        elif k == 2:
            m_prev, h_prev = ms[-2], lams[i] - lams[i - 1]
            d = m + (0.5 * h / h_prev) * (m - m_prev)
            x_next = ((1 - t1) / (1 - t0)) * x + alpha_phi * d
        else:
            m1, m2 = ms[-2], ms[-3]
            r0, r1 = (lams[i] - lams[i - 1]) / h, (lams[i - 1] - lams[i - 2]) / h
            d1_0, d1_1 = (m - m1) / r0, (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)  # h m'(lambda_0)
            d2 = (d1_0 - d1_1) / (r0 + r1)  # h^2 m''(lambda_0) / 2
            w1, w2 = _taylor_weights(h)
            x_next = ((1 - t1) / (1 - t0)) * x + alpha_phi * m + (t1 * w1) * d1 + (t1 * w2) * d2
        report(i, steps, t1, x_next, m, i + 1)
        x = x_next
    return x


def _unipc_weights(h: float, rks: list, order: int, corrector: bool) -> list:
    """UniPC's rho for bh2 (B(h) = e^-h - 1 in the data prediction): the solution of R rho = b with R[k][j] =
    rks[j]^k and b[k] = k! h phi_{k+1}(h) / B(h), over all `order` points for the corrector and all but the last
    for the predictor; diffusers' fixed 0.5 where that system has one unknown (the small-h limit)."""
    n = order if corrector else order - 1
    if n == 1:
        return [0.5]
    hh = -h
    h_phi_k = math.expm1(hh) / hh - 1
    b_h = math.expm1(hh)
    factorial, b = 1, []
    for k in range(1, n + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r = torch.tensor([[rk ** (k - 1) for rk in rks[:n]] for k in range(1, n + 1)], dtype=torch.float64)
    return torch.linalg.solve(r, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(x, t0, t1, lam0, lam1, m0, earlier, order, m_new=None):
    """One UniP step from (x, t0) to t1 (m_new None) or the UniC correction of the point at t1 given the evaluation
    m_new made there. earlier: [(lambda, m)] of the points before t0, newest first (order - 1 of them are used)."""
    h = lam1 - lam0
    ratio = (1 - t1) / (1 - t0)
    x_t = ratio * x + (-t1 * math.expm1(-h)) * m0  # the first-order step
    if order == 1 and m_new is None:
        return x_t
    b_h = math.expm1(-h)
    rks = [(lam - lam0) / h for lam, _ in earlier[: order - 1]] + [1.0]
    rhos = _unipc_weights(h, rks, order, corrector=m_new is not None)
    res = 0
    for rho, rk, (_, m) in zip(rhos, rks, earlier[: order - 1]):
        res = res + (rho / rk) * (m - m0)
    if m_new is not None:
        res = res + rhos[-1] * (m_new - m0)
    return x_t - (t1 * b_h) * res


def unipc(fn: Callable, x: torch.Tensor, ts: list, order: int, report: Callable) -> torch.Tensor:
    """UniPC (bh2) of order 2 or 3 over the grid ts: UniP-k to each point, corrected by UniC-k with the point's
    evaluation before the next step."""
    steps = len(ts) - 1
    lams = [half_log_snr(t) for t in ts]
    points = []  # (lambda, m) of the evaluated points, newest last
    x_prev, k_prev = None, 0
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        v = fn(x, t0)
        m = x + (1 - t0) * v
        if x_prev is not None:  # UniC: correct this point with its own evaluation (made at the predicted x)
            lam_p, m_p = points[-1]
            x = _unipc_update(x_prev, ts[i - 1], t0, lam_p, lams[i], m_p, points[-2::-1], k_prev, m_new=m)
        points = (points + [(lams[i], m)])[-order:]
        k = min(order, steps - i, 1 + _history(lams, i, order - 1))
        if not (lams[i] < lams[i + 1]):  # an empty step (or a step from data): the first-order step keeps x
            k = 1
        x_next = _unipc_update(x, t0, t1, lams[i], lams[i + 1], m, points[-2::-1], k)
        report(i, steps, t1, x_next, m, i + 1)
        x_prev, k_prev, x = x, k, x_next
    return x


def adams_bashforth(fn: Callable, x: torch.Tensor, ts: list, order: int, report: Callable) -> torch.Tensor:
    """Variable-step Adams-Bashforth of order 2 or 3 on v over the grid ts: x1 = x0 + the integral over [t0, t1] of
    the polynomial through the last `order` velocities (Euler, then AB2, while fewer are usable: an earlier point is
    used only across steps of positive length)."""
    steps = len(ts) - 1
    vs = []  # the last `order` velocities, newest last
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        h = t1 - t0
        v = fn(x, t0)
        vs = (vs + [v])[-order:]
        k = 1
        while k < len(vs) and ts[i - k + 1] > ts[i - k]:
            k += 1
        if k == 1:
            x_next = x + h * v
        elif k == 2:
            h1 = t0 - ts[i - 1]
            r = h / h1
            x_next = x + h * ((1 + r / 2) * v - (r / 2) * vs[-2])
        else:
            h1, h2 = t0 - ts[i - 1], ts[i - 1] - ts[i - 2]
            d1 = (v - vs[-2]) / h1
            d2 = (d1 - (vs[-2] - vs[-3]) / h2) / (h1 + h2)
            x_next = x + h * v + (h * h / 2) * d1 + (h**3 / 3 + h1 * h * h / 2) * d2
        report(i, steps, t1, x_next, x + (1 - t0) * v, i + 1)
        x = x_next
    return x
