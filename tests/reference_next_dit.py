"""An independent, deliberately plain Next-DiT forward written from SPEC.md §8 and the original `NextDiT`, for
checking the model.

It reads the state dict directly, runs one sample at a time in float64, drops padded caption tokens instead of
masking them, uses explicit softmax attention, builds the 2-D RoPE table as the original does (a complex table of
row frequencies and one of column frequencies, concatenated per frequency) and un-patchifies with index
arithmetic. Slow; for tiny models only.
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


def _attend(q, k, v, scale):
    logits = (q @ k.T) * scale
    weights = torch.exp(logits - logits.max(dim=-1, keepdim=True).values)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights @ v


def _rope_table(rows, cols, head_dim, theta, linear):
    """Complex [rows, cols, head_dim/2]: entry 2i turns with the row, 2i+1 with the column, at frequency i."""
    quarter = head_dim // 4
    freqs = torch.tensor([1.0 / theta ** (4 * i / head_dim) / linear for i in range(quarter)], dtype=torch.float64)
    table = torch.zeros(rows, cols, 2 * quarter, dtype=torch.complex128)
    for r in range(rows):
        for c in range(cols):
            for i in range(quarter):
                table[r, c, 2 * i] = complex(math.cos(r * freqs[i]), math.sin(r * freqs[i]))
                table[r, c, 2 * i + 1] = complex(math.cos(c * freqs[i]), math.sin(c * freqs[i]))
    return table.reshape(rows * cols, 2 * quarter)


def reference_forward(
    model, x, t, cap_feats, cap_mask, *, scale_factor=1.0, scale_watershed=1.0, proportional_attn=False,
    base_seqlen=None,
):
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    p = cfg.patch_size
    hd = cfg.head_dim
    n_rep = cfg.n_heads // cfg.kv_heads
    eps = cfg.norm_eps
    # One t decides the RoPE scaling for the whole batch (the original reads t[0]).
    if float(t[0]) < scale_watershed:
        theta, linear = cfg.rope_theta, scale_factor
    else:
        theta, linear = cfg.rope_theta * scale_factor, 1.0
    outs = []
    for b in range(x.shape[0]):
        img = x[b].double()
        C, H, W = img.shape
        rows, cols = H // p, W // p
        tokens = []
        for i in range(rows):
            for j in range(cols):
                patch = img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)  # order (c, pi, pj)
                tokens.append(_lin(sd, "x_embedder", patch))
        h = torch.stack(tokens)
        N = h.shape[0]
        rot = _rope_table(rows, cols, hd, theta, linear)

        def rope(m):  # m [N, hd], consecutive channel pairs as complex numbers
            mc = torch.complex(m[:, 0::2], m[:, 1::2]) * rot
            return torch.stack([mc.real, mc.imag], dim=-1).reshape(N, hd)

        y = cap_feats[b][cap_mask[b].bool()].double()  # real caption tokens only
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        args = float(t[b]) * freqs
        temb = torch.cat([torch.cos(args), torch.sin(args)])
        temb = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", temb)))
        cemb = _lin(sd, "cap_embedder.1", _ln(y.mean(0), sd["cap_embedder.0.weight"], sd["cap_embedder.0.bias"]))
        c = temb + cemb

        if proportional_attn:
            scale = math.sqrt(math.log(N) / math.log(base_seqlen) / hd)
        else:
            scale = 1 / math.sqrt(hd)
        for n in range(cfg.n_layers):
            pre = f"layers.{n}."
            sc_a, g_a, sc_f, g_f = _lin(sd, pre + "adaLN_modulation.1", F.silu(c)).chunk(4)
            a_in = _rms(h, sd[pre + "attention_norm1.weight"], eps) * (1 + sc_a)
            at = pre + "attention."
            q = _ln(_lin(sd, at + "wq", a_in, bias=False), sd[at + "q_norm.weight"], sd[at + "q_norm.bias"])
            k = _ln(_lin(sd, at + "wk", a_in, bias=False), sd[at + "k_norm.weight"], sd[at + "k_norm.bias"])
            v = _lin(sd, at + "wv", a_in, bias=False)
            yn = _rms(y, sd[pre + "attention_y_norm.weight"], eps)
            yk = _ln(_lin(sd, at + "wk_y", yn, bias=False), sd[at + "ky_norm.weight"], sd[at + "ky_norm.bias"])
            yv = _lin(sd, at + "wv_y", yn, bias=False)
            heads = []
            for head in range(cfg.n_heads):
                g = head // n_rep  # the kv head serving this query head
                kv = slice(g * hd, (g + 1) * hd)
                qs = rope(q[:, head * hd:(head + 1) * hd])
                self_out = _attend(qs, rope(k[:, kv]), v[:, kv], scale)
                cross = _attend(qs, yk[:, kv], yv[:, kv], 1 / math.sqrt(hd))
                heads.append(self_out + math.tanh(float(sd[at + "gate"][head])) * cross)
            attn = _lin(sd, at + "wo", torch.cat(heads, dim=-1), bias=False)
            h = h + torch.tanh(g_a) * _rms(attn, sd[pre + "attention_norm2.weight"], eps)
            f_in = _rms(h, sd[pre + "ffn_norm1.weight"], eps) * (1 + sc_f)
            ff = pre + "feed_forward."
            gated = F.silu(_lin(sd, ff + "w1", f_in, bias=False)) * _lin(sd, ff + "w3", f_in, bias=False)
            ffn = _lin(sd, ff + "w2", gated, bias=False)
            h = h + torch.tanh(g_f) * _rms(ffn, sd[pre + "ffn_norm2.weight"], eps)

        sc = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c))
        o = _lin(sd, "final_layer.linear", _ln(h, eps=1e-6) * (1 + sc))  # [N, p*p*out], order (pi, pj, c)
        out = torch.zeros(cfg.out_channels, H, W, dtype=torch.float64)
        for i in range(rows):
            for j in range(cols):
                vec = o[i * cols + j]
                for pi in range(p):
                    for pj in range(p):
                        for ch in range(cfg.out_channels):
                            out[ch, i * p + pi, j * p + pj] = vec[(pi * p + pj) * cfg.out_channels + ch]
        outs.append(out[: cfg.in_channels])
    return torch.stack(outs)
