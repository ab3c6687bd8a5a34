"""An independent, deliberately plain forward of Lumina-Next's compositional generation, written from the original
(`lumina_next_compositional_generation/models/model.py` and `demo.py` of Alpha-VLLM/Lumina-T2X), for checking
`lumina_core.models.regions` and the samplers' text by region.

The facts it follows: the demo's batch is [z, z] (the conditional and the unconditional image) with one caption
list of the region captions, then the negative; the adaLN of both images is the timestep plus the pooled global
caption (the region captions joined by " ", encoded on their own); a region mask over the image tokens gives row
`region_id` of each grid cell its cell and the negative's row every token; in the caption attention the conditional
image's queries attend to every region caption under its row of the mask (a token outside the region: an all-masked
row, NaN, set to 0), the results summed over the regions, and the unconditional image's queries to the negative over
every token; each result gated per head by tanh(gate). A cell's region_id is the original's (h+1)*(w+1)-1 or the
intended row-major h*w_split + w.

Like `reference_next_dit.py` (whose ideas it copies, not its code): float64, one image at a time, padded caption
tokens dropped instead of masked, explicit softmax, a complex RoPE table built entry by entry, patches by index.
Slow; for tiny models only.
"""

import math

import torch
import torch.nn.functional as F


def _lin(sd, name, x, bias=True):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if bias and name + ".bias" in sd else y


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _ln(x, w=None, b=None, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    return y * w + b if w is not None else y


def _softmax_attend(q, k, v, scale):
    logits = (q @ k.T) * scale
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    return (weights / weights.sum(dim=-1, keepdim=True)) @ v


def original_region_id(h, w, h_split, w_split):
    return (h + 1) * (w + 1) - 1


def row_major_region_id(h, w, h_split, w_split):
    return h * w_split + w


def region_mask(n_regions, rows, cols, h_split, w_split, region_id):
    """[n_regions + 1, rows*cols] 0/1 as the original builds it: cell extents by integer division, the last row (the
    negative) all ones."""
    mask = torch.zeros(n_regions + 1, rows, cols)
    cell_h, cell_w = rows // h_split, cols // w_split
    for h in range(h_split):
        for w in range(w_split):
            mask[region_id(h, w, h_split, w_split), cell_h * h:cell_h * (h + 1), cell_w * w:cell_w * (w + 1)] = 1
    mask[-1] = 1
    return mask.reshape(n_regions + 1, rows * cols)


def compositional_forward(model, x, t, captions, negative, global_caption, h_split, w_split,
                          region_id=original_region_id, proportional_attn=False, base_seqlen=None):
    """The original's forward on x [2, C, H, W] (conditional, unconditional), t [2]: captions a list of
    (features [L, D], mask [L]) per region in caption order, negative and global_caption (features, mask).
    Returns the velocity [2, in_channels, H, W] in float64 (the original's forward, before guidance)."""
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    p, hd, eps = cfg.patch_size, cfg.head_dim, cfg.norm_eps
    n_rep = cfg.n_heads // cfg.kv_heads
    ys = [f[m.bool()].double() for f, m in list(captions) + [negative]]
    g = global_caption[0][global_caption[1].bool()].double()
    outs = []
    for b in range(2):
        img = x[b].double()
        C, H, W = img.shape
        rows, cols = H // p, W // p
        N = rows * cols
        h = torch.stack([_lin(sd, "x_embedder", img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1))
                         for i in range(rows) for j in range(cols)])
        quarter = hd // 4
        freqs = [1.0 / cfg.rope_theta ** (4 * i / hd) for i in range(quarter)]
        rot = torch.zeros(N, 2 * quarter, dtype=torch.complex128)
        for r in range(rows):
            for c in range(cols):
                for i in range(quarter):
                    rot[r * cols + c, 2 * i] = complex(math.cos(r * freqs[i]), math.sin(r * freqs[i]))
                    rot[r * cols + c, 2 * i + 1] = complex(math.cos(c * freqs[i]), math.sin(c * freqs[i]))

        def rope(m):
            mc = torch.complex(m[:, 0::2], m[:, 1::2]) * rot
            return torch.stack([mc.real, mc.imag], dim=-1).reshape(N, hd)

        freq_t = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float64) / 128) * float(t[b])
        temb = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", torch.cat([freq_t.cos(), freq_t.sin()]))))
        # Both images take the global caption's pooled features (the original passes one global caption row).
        c_vec = temb + _lin(sd, "cap_embedder.1", _ln(g.mean(0), sd["cap_embedder.0.weight"], sd["cap_embedder.0.bias"]))
        mask = region_mask(len(captions), rows, cols, h_split, w_split, region_id)
        # The conditional image reads every region caption; the unconditional one the negative (the last row).
        rows_read = range(len(captions)) if b == 0 else [len(captions)]
        scale = math.sqrt(math.log(N) / math.log(base_seqlen) / hd) if proportional_attn else 1 / math.sqrt(hd)
        for n in range(cfg.n_layers):
            pre = f"layers.{n}."
            at = pre + "attention."
            sc_a, g_a, sc_f, g_f = _lin(sd, pre + "adaLN_modulation.1", F.silu(c_vec)).chunk(4)
            a_in = _rms(h, sd[pre + "attention_norm1.weight"], eps) * (1 + sc_a)
            q = _ln(_lin(sd, at + "wq", a_in, bias=False), sd[at + "q_norm.weight"], sd[at + "q_norm.bias"])
            k = _ln(_lin(sd, at + "wk", a_in, bias=False), sd[at + "k_norm.weight"], sd[at + "k_norm.bias"])
            v = _lin(sd, at + "wv", a_in, bias=False)
            kv_y = []
            for y in ys:
                yn = _rms(y, sd[pre + "attention_y_norm.weight"], eps)
                kv_y.append((_ln(_lin(sd, at + "wk_y", yn, bias=False), sd[at + "ky_norm.weight"], sd[at + "ky_norm.bias"]),
                             _lin(sd, at + "wv_y", yn, bias=False)))
            heads = []
            for head in range(cfg.n_heads):
                kvs = slice((head // n_rep) * hd, (head // n_rep + 1) * hd)
                qs = rope(q[:, head * hd:(head + 1) * hd])
                out = _softmax_attend(qs, rope(k[:, kvs]), v[:, kvs], scale)
                cross = torch.zeros(N, hd, dtype=torch.float64)
                for r in rows_read:
                    inside = mask[r] > 0.5
                    if inside.any():
                        yk, yv = kv_y[r]
                        cross[inside] += _softmax_attend(qs[inside], yk[:, kvs], yv[:, kvs], 1 / math.sqrt(hd))
                heads.append(out + math.tanh(float(sd[at + "gate"][head])) * cross)
            attn = _lin(sd, at + "wo", torch.cat(heads, dim=-1), bias=False)
            h = h + torch.tanh(g_a) * _rms(attn, sd[pre + "attention_norm2.weight"], eps)
            f_in = _rms(h, sd[pre + "ffn_norm1.weight"], eps) * (1 + sc_f)
            ff = pre + "feed_forward."
            ffn = _lin(sd, ff + "w2", F.silu(_lin(sd, ff + "w1", f_in, bias=False)) * _lin(sd, ff + "w3", f_in, bias=False),
                       bias=False)
            h = h + torch.tanh(g_f) * _rms(ffn, sd[pre + "ffn_norm2.weight"], eps)
        sc = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c_vec))
        o = _lin(sd, "final_layer.linear", _ln(h, eps=1e-6) * (1 + sc))
        out = torch.zeros(cfg.out_channels, H, W, dtype=torch.float64)
        for i in range(rows):
            for j in range(cols):
                for pi in range(p):
                    for pj in range(p):
                        for ch in range(cfg.out_channels):
                            out[ch, i * p + pi, j * p + pj] = o[i * cols + j, (pi * p + pj) * cfg.out_channels + ch]
        outs.append(out[: cfg.in_channels])
    return torch.stack(outs)


def compositional_demo(model, z, captions, negative, global_caption, h_split, w_split, *, num_steps, cfg, t_shift,
                       region_id=original_region_id, proportional_attn=True, base_seqlen=4096):
    """The compositional demo's sampling: the time-shifted linspace(0, 1, num_steps), fixed-grid midpoint (the
    demo's default solver), `forward_with_cfg` on [z, z] guiding latent channels 0..2 and keeping the conditional
    channel 3. z [1, C, H, W]; returns the final latent [1, C, H, W] in float64."""
    t = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    t = t / (t + t_shift - t_shift * t)

    def forward_with_cfg(x, tt):
        out = compositional_forward(model, torch.cat([x, x]), torch.full((2,), tt), captions, negative,
                                    global_caption, h_split, w_split, region_id, proportional_attn, base_seqlen)
        cond, uncond = out[:1], out[1:]
        return torch.cat([uncond[:, :3] + cfg * (cond[:, :3] - uncond[:, :3]), cond[:, 3:]], dim=1)

    x = z.double()
    for i in range(num_steps - 1):
        t0, t1 = float(t[i]), float(t[i + 1])
        dt = t1 - t0
        x = x + dt * forward_with_cfg(x + dt / 2 * forward_with_cfg(x, t0), t0 + dt / 2)
    return x
