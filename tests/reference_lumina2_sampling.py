"""An independent re-implementation of the ORIGINAL Lumina-Image-2.0 sampling loop (github:Alpha-VLLM/Lumina-Image-2.0:
sample.py / demo.py, transport/__init__.py + transport.py + integrators.py (torchdiffeq fixed-grid odeint),
transport/dpm_solver.py (SANA's flow DPM-Solver++), and NextDiT.forward_with_cfg in models/model.py), as pure
functions over a velocity callable.

Velocity convention: `velocity(x, t, which) -> v`, x [B, C, H, W], t a float32 tensor [B] (0 = noise, 1 = data; all
entries equal), which = "cond" or "uncond"; v is the velocity toward data (data - noise), same shape as x. The
original runs the pair as one batch [cond, uncond] on the same latent; here that is two calls with the same x and t
(a batched model: `lambda x, t, which: model(x, t, *(cond if which == "cond" else uncond))`).
Step counts keep the ORIGINAL meaning: for euler / midpoint / rk4 `num_sampling_steps` is the number of grid points P
(P - 1 solver steps); for dpm it is the number of intervals N (= N model evaluations, grid of N + 1 sigmas).
Guidance (forward_with_cfg): guide while the model-input t[0] < cfg_trunc (strict; the time at which that evaluation
happens, e.g. the half-step time for midpoint's second evaluation, 1 - sigma in dpm); otherwise only "cond" is
evaluated. Guided v = u + s (c - u) on all 16 channels (no shortcut at s = 1); then, if float(renorm_cfg) > 0,
with n_c = ||c|| over (C, H, W) per sample: if ||v|| >= renorm_cfg * n_c, v <- v * renorm_cfg * n_c / ||v||;
renorm_cfg <= 0 (or False) is off. The original's own defaults (sample.py passes neither): cfg_trunc 100 (always
guide), renorm_cfg 1 (on). The original tests the norm with a Python `if` on a tensor, valid only for one sample per
pair; here it is applied per sample.
"""

import torch

DEMO_DEFAULTS = dict(solver="midpoint", num_sampling_steps=18, shift=6.0, cfg_scale=4.0, cfg_trunc=0.25,
                     renorm_cfg=1.0)  # demo.py gradio defaults; its renorm "True" string would raise, see module doc


def guided_velocity(velocity, x, t, cfg_scale, cfg_trunc=100.0, renorm_cfg=1.0):
    """NextDiT.forward_with_cfg for one latent batch x at model-input time t [B]."""
    if t[0] < cfg_trunc:
        c, u = velocity(x, t, "cond"), velocity(x, t, "uncond")
        v = u + cfg_scale * (c - u)
        if float(renorm_cfg) > 0.0:
            dims = tuple(range(1, v.dim()))
            max_norm = torch.sqrt((c * c).sum(dim=dims, keepdim=True)) * float(renorm_cfg)
            v_norm = torch.sqrt((v * v).sum(dim=dims, keepdim=True))
            v = torch.where(v_norm >= max_norm, v * (max_norm / v_norm), v)
        return v
    return velocity(x, t, "cond")


# ------------------------------------------------------------------------------------- ODE (euler, midpoint, rk4)

def ode_time_grid(num_points, shift):
    """float32 [P]: t_i = i/(P-1) (torch.linspace(0, 1, P)), then, if shift is truthy, t / (t + s - s*t)."""
    t = torch.linspace(0, 1, num_points)
    if shift:
        t = t / (t + shift - shift * t)
    return t


def sample_ode(velocity, z, num_points, shift=6.0, cfg_scale=4.0, cfg_trunc=100.0, renorm_cfg=1.0,
               method="euler"):
    """Integrate dx/dt = guided v from t = 0 (z) to t = 1 on the shifted grid; returns x at t = 1 (fp32).

    torchdiffeq fixed-grid semantics on the given grid, t and x in float32, dt = t1 - t0:
      euler:    x1 = x0 + dt * f(t0, x0)
      midpoint: x_mid = x0 + f(t0, x0) * (0.5 * dt);  x1 = x0 + dt * f(t0 + 0.5 * dt, x_mid)
      rk4 (torchdiffeq "rk4", the 3/8 rule): k1 = f(t0, x0); k2 = f(t0 + dt/3, x0 + dt*k1/3);
                k3 = f(t0 + 2dt/3, x0 + dt*(k2 - k1/3)); k4 = f(t1, x0 + dt*(k1 - k2 + k3));
                x1 = x0 + (k1 + 3 (k2 + k3) + k4) * dt / 8
    """
    x = z.float()
    ts = ode_time_grid(num_points, shift)

    def f(t, y):
        t_vec = torch.ones(y.shape[0]) * t
        return guided_velocity(velocity, y, t_vec, cfg_scale, cfg_trunc, renorm_cfg).float()

    for i in range(num_points - 1):
        t0, t1 = ts[i], ts[i + 1]
        dt = t1 - t0
        if method == "euler":
            x = x + dt * f(t0, x)
        elif method == "midpoint":
            half = 0.5 * dt
            x_mid = x + f(t0, x) * half
            x = x + dt * f(t0 + half, x_mid)
        elif method == "rk4":
            k1 = f(t0, x)
            k2 = f(t0 + dt * (1 / 3), x + dt * k1 * (1 / 3))
            k3 = f(t0 + dt * (2 / 3), x + dt * (k2 - k1 * (1 / 3)))
            k4 = f(t1, x + dt * (k1 - k2 + k3))
            x = x + (k1 + 3 * (k2 + k3) + k4) * dt * 0.125
        else:
            raise ValueError(method)
    return x


# ------------------------------------------------------------------------------------- dpm (flow DPM-Solver++ 2M)

def dpm_sigma_grid(steps, shift):
    """float32 [N+1], decreasing sigma (noise level): u = linspace(1, 0.001, N+1), sigma = 1 - u (0 .. 0.999),
    shifted s*sigma / (1 + (s-1)*sigma), then flipped: from shift(0.999) down to exactly 0."""
    u = torch.linspace(1, 0.001, steps + 1)
    sigma = 1.0 - u
    return (shift * sigma / (1 + (shift - 1) * sigma)).flip(dims=[0])


def _lam(s):
    """half log-SNR of the flow schedule (alpha = 1 - s, sigma = s)."""
    return torch.log(1 - s) - torch.log(s)


def sample_dpm(velocity, z, steps, shift=6.0, cfg_scale=4.0, cfg_trunc=100.0, renorm_cfg=1.0):
    """Transport.Sampler.sample_dpm + DPM_Solver.sample(steps, order=2, skip_type="time_uniform_flow",
    method="multistep", flow_shift=shift), with its defaults lower_order_final=True, solver_type="dpmsolver",
    denoise_to_zero=False, algorithm_type="dpmsolver++". Returns x at sigma = 0 (t = 1), in z's dtype.

    Model conversion: at sigma s the model gets t = 1 - s (float32 [B]); noise = x - (1 - s) * v; data prediction
    x0 = (x - s * noise) / (1 - s) (kept in this form, not simplified to x + s v). Updates with h = lam_t - lam_s,
    phi = expm1(-h), alpha_t = exp(log(1 - t)): first order x_t = (t/s) x - alpha_t phi m_s; second order (multistep,
    r0 = h_prev / h, D = (m0 - m1) / r0): x_t = (t/s0) x - alpha_t phi m0 - 0.5 alpha_t phi D. Step 1 is first order,
    steps 2 .. N-1 second order, the last step (to sigma = 0) first order, which returns x0 of the last evaluation.
    """
    sig = dpm_sigma_grid(steps, shift)
    assert steps >= 2, "the original asserts steps >= order (2)"

    def data_pred(x, s):
        s_vec = s.expand(x.shape[0])
        v = guided_velocity(velocity, x, 1 - s_vec, cfg_scale, cfg_trunc, renorm_cfg)
        noise = x - (1 - s_vec.reshape(-1, *([1] * (x.dim() - 1)))).to(x) * v
        return (x - s * noise) / (1 - s)

    def first_order(x, s, t, m_s):
        h = _lam(t) - _lam(s)
        phi, alpha_t = torch.expm1(-h), torch.exp(torch.log(1 - t))
        return t / s * x - alpha_t * phi * m_s

    def second_order(x, m1, m0, s1, s0, t):
        h0, h = _lam(s0) - _lam(s1), _lam(t) - _lam(s0)
        d1 = (1.0 / (h0 / h)) * (m0 - m1)
        phi, alpha_t = torch.expm1(-h), torch.exp(torch.log(1 - t))
        return (t / s0) * x - (alpha_t * phi) * m0 - 0.5 * (alpha_t * phi) * d1

    x = z
    m_prev, s_prev = data_pred(x, sig[0]), sig[0]
    x = first_order(x, sig[0], sig[1], m_prev)
    m_cur, s_cur = data_pred(x, sig[1]), sig[1]
    for k in range(2, steps + 1):
        if k < steps:
            x = second_order(x, m_prev, m_cur, s_prev, s_cur, sig[k])
            m_prev, s_prev = m_cur, s_cur
            m_cur, s_cur = data_pred(x, sig[k]), sig[k]
        else:  # lower_order_final: min(2, steps + 1 - k) == 1; no evaluation after the last step
            x = first_order(x, s_cur, sig[k], m_cur)
    return x


# ------------------------------------------------------------------------------------- dispatch and counting

def sample_original(velocity, z, solver, num_sampling_steps, shift=6.0, cfg_scale=4.0, cfg_trunc=100.0,
                    renorm_cfg=1.0):
    """solver in euler / midpoint / rk4 (num_sampling_steps = grid points) or dpm (= intervals)."""
    if solver == "dpm":
        return sample_dpm(velocity, z, num_sampling_steps, shift, cfg_scale, cfg_trunc, renorm_cfg)
    return sample_ode(velocity, z, num_sampling_steps, shift, cfg_scale, cfg_trunc, renorm_cfg, method=solver)


class CountingVelocity:
    """Wraps a velocity(x, t, which); counts calls per branch and records each call's t[0]."""

    def __init__(self, velocity):
        self.velocity = velocity
        self.counts = {"cond": 0, "uncond": 0}
        self.times = {"cond": [], "uncond": []}

    def __call__(self, x, t, which):
        self.counts[which] += 1
        self.times[which].append(float(t[0]))
        return self.velocity(x, t, which)


def count_evaluations(solver, num_sampling_steps, shift=6.0, cfg_trunc=100.0):
    """{"cond": n, "uncond": m}: model evaluations per branch of the original loop (decisions depend on t only)."""
    counter = CountingVelocity(lambda x, t, which: torch.zeros_like(x))
    sample_original(counter, torch.zeros(1, 1, 1, 1), solver, num_sampling_steps, shift, 1.0, cfg_trunc, 0.0)
    return dict(counter.counts)


if __name__ == "__main__":
    # Point-mass targets: v(x, t) = (a - x) / (1 - t) has straight trajectories, so with cfg 1 every solver lands
    # on a_cond (euler exactly).
    torch.manual_seed(0)
    a = {"cond": torch.randn(1, 16, 4, 6), "uncond": torch.randn(1, 16, 4, 6)}
    vel = lambda x, t, which: (a[which] - x) / (1 - t.reshape(-1, 1, 1, 1))
    z = torch.randn(1, 16, 4, 6)
    for solver, n in (("euler", 18), ("midpoint", 18), ("dpm", 20)):
        out = sample_original(vel, z, solver, n, 6.0, cfg_scale=1.0, renorm_cfg=0.0)
        print(f"{solver:8s} P/N={n}: max |x - a_cond| = {(out - a['cond']).abs().max():.2e}")
    print("ode grid (P=5, s=6):", [round(v, 5) for v in ode_time_grid(5, 6.0).tolist()])
    print("dpm sigmas (N=4, s=6):", [round(v, 5) for v in dpm_sigma_grid(4, 6.0).tolist()])
    for solver, n in (("euler", 18), ("midpoint", 18), ("dpm", 18)):
        print(f"evaluations {solver} {n}, cfg_trunc 0.25:", count_evaluations(solver, n, 6.0, 0.25))
