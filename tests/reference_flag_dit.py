"""An independent, deliberately plain Flag-DiT forward written from SPEC.md, for checking the model.

It reads the state dict directly, runs one sample at a time in float64, drops padded text tokens instead of masking
them, uses explicit softmax attention and complex-number RoPE, and un-patchifies with index arithmetic. Slow; for
tiny models only.
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
    # q [Lq, D], k/v [Lk, D]
    w = torch.softmax((q @ k.T) * scale, dim=-1)
    return w @ v


def reference_forward(
    model, x, t, cap_feats, cap_mask, *, ntk_factor=1.0, softmax_scale=None, rope_scaling_factor=1.0
):
    cfg = model.config
    sd = {k: v.detach().double() for k, v in model.state_dict().items()}
    p = cfg.patch_size
    hd = cfg.head_dim
    n_rep = cfg.n_heads // cfg.kv_heads
    eps = cfg.norm_eps
    outs = []
    for b in range(x.shape[0]):
        img = x[b].double()
        C, H, W = img.shape
        # Tokens: for each patch row, the W/p patches then the eol token.
        tokens = []
        for i in range(H // p):
            for j in range(W // p):
                patch = img[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)  # order (c, pi, pj)
                tokens.append(_lin(sd, "x_embedder", patch))
            tokens.append(sd["eol_token"])
        h = torch.stack(tokens)
        L = h.shape[0]

        y = cap_feats[b][cap_mask[b].bool()].double()  # real text tokens only
        half = 128
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        args = float(t[b]) * freqs
        temb = torch.cat([torch.cos(args), torch.sin(args)])
        temb = _lin(sd, "t_embedder.mlp.2", F.silu(_lin(sd, "t_embedder.mlp.0", temb)))
        pooled = y.mean(0)
        cemb = _lin(sd, "cap_embedder.1", _ln(pooled, sd["cap_embedder.0.weight"], sd["cap_embedder.0.bias"]))
        c = temb + cemb

        theta = cfg.rope_theta * ntk_factor
        k_idx = torch.arange(hd // 2, dtype=torch.float64)
        inv = theta ** (-2 * k_idx / hd)
        pos = torch.arange(L, dtype=torch.float64) / rope_scaling_factor
        rot = torch.polar(torch.ones(L, hd // 2, dtype=torch.float64), pos[:, None] * inv[None])

        def rope(m):  # m [L, hd]
            mc = torch.complex(m[:, 0::2], m[:, 1::2]) * rot
            return torch.stack([mc.real, mc.imag], dim=-1).reshape(L, hd)

        scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(hd)
        for n in range(cfg.n_layers):
            pre = f"layers.{n}."
            mod = _lin(sd, pre + "adaLN_modulation.1", F.silu(c))
            sh_a, sc_a, g_a, sh_f, sc_f, g_f = mod.chunk(6)
            a_in = _rms(h, sd[pre + "attention_norm.weight"], eps) * (1 + sc_a) + sh_a
            at = pre + "attention."
            q = _lin(sd, at + "wq", a_in, bias=False)
            k = _lin(sd, at + "wk", a_in, bias=False)
            v = _lin(sd, at + "wv", a_in, bias=False)
            yn = _rms(y, sd[pre + "attention_y_norm.weight"], eps)
            yk = _lin(sd, at + "wk_y", yn, bias=False)
            yv = _lin(sd, at + "wv_y", yn, bias=False)
            if cfg.qk_norm:
                q = _ln(q, sd[at + "q_norm.weight"], sd[at + "q_norm.bias"])
                k = _ln(k, sd[at + "k_norm.weight"], sd[at + "k_norm.bias"])
                yk = _ln(yk, sd[at + "ky_norm.weight"], sd[at + "ky_norm.bias"])
            heads = []
            for head in range(cfg.n_heads):
                kvh = head // n_rep
                qs = rope(q[:, head * hd:(head + 1) * hd])
                ks = rope(k[:, kvh * hd:(kvh + 1) * hd])
                vs = v[:, kvh * hd:(kvh + 1) * hd]
                self_out = _softmax_attend(qs, ks, vs, scale)
                cross = _softmax_attend(qs, yk[:, kvh * hd:(kvh + 1) * hd], yv[:, kvh * hd:(kvh + 1) * hd], 1 / math.sqrt(hd))
                heads.append(self_out + torch.tanh(sd[at + "gate"][head]) * cross)
            h = h + g_a * _lin(sd, at + "wo", torch.cat(heads, dim=-1), bias=False)
            f_in = _rms(h, sd[pre + "ffn_norm.weight"], eps) * (1 + sc_f) + sh_f
            ff = pre + "feed_forward."
            gated = F.silu(_lin(sd, ff + "w1", f_in, bias=False)) * _lin(sd, ff + "w3", f_in, bias=False)
            h = h + g_f * _lin(sd, ff + "w2", gated, bias=False)

        sh, sc = _lin(sd, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2)
        o = _lin(sd, "final_layer.linear", _ln(h, eps=1e-6) * (1 + sc) + sh)  # [L, p*p*out], order (pi, pj, c)
        out = torch.zeros(cfg.out_channels, H, W, dtype=torch.float64)
        row_len = W // p + 1
        for i in range(H // p):
            for j in range(W // p):
                vec = o[i * row_len + j]
                for pi in range(p):
                    for pj in range(p):
                        for ch in range(cfg.out_channels):
                            out[ch, i * p + pi, j * p + pj] = vec[(pi * p + pj) * cfg.out_channels + ch]
        outs.append(out[: cfg.in_channels])
    return torch.stack(outs)
