"""An independent, deliberately plain Lumina-Image-2.0 DiT ("Unified Next-DiT", NextDiT_2B_GQA_patch2_Adaln_Refiner)
forward, written from the original github:Alpha-VLLM/Lumina-Image-2.0 models/model.py and models/components.py.

It works from a state dict with the ORIGINAL key names (`layers.N.attention.qkv.weight`, ...), in fp32 by default
(`dtype=torch.float64` for a tighter truth), with explicit softmax attention over a key-padding mask, real-valued
RoPE math on adjacent channel pairs (2i, 2i+1) and index-arithmetic (un)patchify. Conventions, all as the original:
x [B, C, H, W] (H, W multiples of the patch size, non-square fine), t [B] in [0, 1] with 0 = noise and 1 = data
(no x1000), output = velocity toward data (data - noise, transport/path.py ICPlan); cap_mask [B, L] bool,
right-padded. Patch vectors are ordered (pH, pW, C) with C fastest, tokens row-major. The caption passes the context
refiners alone (positions (j, 0, 0)), the image tokens the noise refiners alone (positions (cap_len, r, c)), then each
sample's sequence is [valid caption tokens] + [image tokens], zero-padded to the batch's longest, and runs the joint
layers. q_norm/k_norm are `RMSNorm(head_dim)` with the class default eps: 1e-6 with the fallback RMSNorm of
components.py (apex is not in requirements.txt), 1e-5 if apex's FusedRMSNorm was importable; cfg["qk_norm_eps"]
overrides (default 1e-6). `norm_final.weight` is built by NextDiT.__init__ but never used in forward.
"""

import math

import torch

LUMINA2_RELEASED = dict(
    dim=2304, n_layers=26, n_refiner_layers=2, n_heads=24, n_kv_heads=8, multiple_of=256, ffn_dim_multiplier=None,
    norm_eps=1e-5, cap_feat_dim=2304, axes_dims=(32, 32, 32), axes_lens=(300, 512, 512), rope_theta=10000.0,
    patch_size=2, in_channels=16,
)

T_FREQ_DIM = 256  # TimestepEmbedder frequency_embedding_size


# ----------------------------------------------------------------------------------------------- shapes / weights

def _head_dim(cfg):
    return cfg["dim"] // cfg["n_heads"]


def _ffn_hidden(cfg):
    hidden = 4 * cfg["dim"]
    if cfg.get("ffn_dim_multiplier") is not None:
        hidden = int(cfg["ffn_dim_multiplier"] * hidden)
    m = cfg["multiple_of"]
    return m * ((hidden + m - 1) // m)


def _block_shapes(prefix, cfg, modulated):
    d, hd, hid = cfg["dim"], _head_dim(cfg), _ffn_hidden(cfg)
    kv = cfg.get("n_kv_heads") or cfg["n_heads"]
    s = {
        f"{prefix}.attention.qkv.weight": ((cfg["n_heads"] + 2 * kv) * hd, d),
        f"{prefix}.attention.out.weight": (d, cfg["n_heads"] * hd),
    }
    if cfg.get("qk_norm", True):
        s[f"{prefix}.attention.q_norm.weight"] = (hd,)
        s[f"{prefix}.attention.k_norm.weight"] = (hd,)
    s[f"{prefix}.feed_forward.w1.weight"] = (hid, d)
    s[f"{prefix}.feed_forward.w2.weight"] = (d, hid)
    s[f"{prefix}.feed_forward.w3.weight"] = (hid, d)
    for n in ("attention_norm1", "ffn_norm1", "attention_norm2", "ffn_norm2"):
        s[f"{prefix}.{n}.weight"] = (d,)
    if modulated:
        s[f"{prefix}.adaLN_modulation.1.weight"] = (4 * d, min(d, 1024))
        s[f"{prefix}.adaLN_modulation.1.bias"] = (4 * d,)
    return s


def expected_shapes(cfg):
    """Every key of the original NextDiT state dict (registration order) -> shape."""
    d, p, c, te = cfg["dim"], cfg["patch_size"], cfg["in_channels"], min(cfg["dim"], 1024)
    s = {"x_embedder.weight": (d, p * p * c), "x_embedder.bias": (d,)}
    for i in range(cfg["n_refiner_layers"]):
        s.update(_block_shapes(f"noise_refiner.{i}", cfg, True))
    for i in range(cfg["n_refiner_layers"]):
        s.update(_block_shapes(f"context_refiner.{i}", cfg, False))
    s.update({"t_embedder.mlp.0.weight": (te, T_FREQ_DIM), "t_embedder.mlp.0.bias": (te,),
              "t_embedder.mlp.2.weight": (te, te), "t_embedder.mlp.2.bias": (te,),
              "cap_embedder.0.weight": (cfg["cap_feat_dim"],),
              "cap_embedder.1.weight": (d, cfg["cap_feat_dim"]), "cap_embedder.1.bias": (d,)})
    for i in range(cfg["n_layers"]):
        s.update(_block_shapes(f"layers.{i}", cfg, True))
    # NextDiT builds a top-level RMSNorm `norm_final` that forward() never calls; it is in the released checkpoint.
    # (FinalLayer's own LayerNorm has no affine parameters, so it contributes no key.)
    s["norm_final.weight"] = (d,)
    s.update({"final_layer.linear.weight": (p * p * c, d), "final_layer.linear.bias": (p * p * c,),
              "final_layer.adaLN_modulation.1.weight": (d, te), "final_layer.adaLN_modulation.1.bias": (d,)})
    return s


def random_state_dict(cfg, seed=0):
    """fp32, seeded: 2-D weights N(0,1)/sqrt(fan_in), norm weights 1 + 0.1 N, biases 0.1 N (nothing zero)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in expected_shapes(cfg).items():
        w = torch.randn(shape, generator=g, dtype=torch.float32)
        if len(shape) == 2:
            w = w / math.sqrt(shape[1])
        elif name.endswith(".bias"):
            w = 0.1 * w
        else:
            w = 1.0 + 0.1 * w
        sd[name] = w
    return sd


# ----------------------------------------------------------------------------------------------- pieces

def _linear(sd, name, x):
    y = x @ sd[name + ".weight"].T
    return y + sd[name + ".bias"] if name + ".bias" in sd else y


def _rms_norm(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _layer_norm(x, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def timestep_features(t, dtype=torch.float32):
    """256-d sinusoid of the raw t, [cos | sin], max period 10000."""
    half = T_FREQ_DIM // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half).to(dtype)
    args = t.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_cos_sin(pos, cfg, dtype):
    """pos [B, N, 3] integer positions -> (cos, sin) [B, N, head_dim/2]. Axis k owns head channels
    [sum(d_<k), sum(d_<=k)); its pair i turns at pos_k * theta^(-2i/d_k). Angles are formed in float64 and rounded
    to float32 as the original's complex64 table is."""
    angles = []
    for k, d in enumerate(cfg["axes_dims"]):
        freq = 1.0 / cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(pos[..., k:k + 1].to(torch.float64) * freq)
    ang = torch.cat(angles, dim=-1).to(torch.float32).to(dtype)
    return torch.cos(ang), torch.sin(ang)


def _rotate(x, cos, sin):
    """x [B, N, heads, hd]; rotate each adjacent pair (2i, 2i+1) by the angle of pair i."""
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)


def _attention(sd, pre, cfg, x, mask, cos, sin):
    B, N, _ = x.shape
    hd, nh = _head_dim(cfg), cfg["n_heads"]
    nkv = cfg.get("n_kv_heads") or nh
    qkv = _linear(sd, pre + ".qkv", x)
    q = qkv[..., :nh * hd].reshape(B, N, nh, hd)
    k = qkv[..., nh * hd:(nh + nkv) * hd].reshape(B, N, nkv, hd)
    v = qkv[..., (nh + nkv) * hd:].reshape(B, N, nkv, hd)
    if cfg.get("qk_norm", True):
        eps = cfg.get("qk_norm_eps", 1e-6)
        q = _rms_norm(q, sd[pre + ".q_norm.weight"], eps)
        k = _rms_norm(k, sd[pre + ".k_norm.weight"], eps)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    kv_of = torch.arange(nh) // (nh // nkv)  # query head h reads kv head h // n_rep
    k, v = k[:, :, kv_of], v[:, :, kv_of]
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * math.sqrt(1.0 / hd)
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    w = torch.exp(logits - logits.amax(dim=-1, keepdim=True))
    w = w / w.sum(dim=-1, keepdim=True)
    out = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(B, N, nh * hd)
    return _linear(sd, pre + ".out", out)


def _ffn(sd, pre, x):
    h1, h3 = _linear(sd, pre + ".w1", x), _linear(sd, pre + ".w3", x)
    return _linear(sd, pre + ".w2", h1 * torch.sigmoid(h1) * h3)


def _block(sd, pre, cfg, x, mask, cos, sin, temb=None):
    eps = cfg["norm_eps"]
    n = lambda name, y: _rms_norm(y, sd[f"{pre}.{name}.weight"], eps)
    if temb is None:  # context refiner: no modulation, no gates
        x = x + n("attention_norm2", _attention(sd, pre + ".attention", cfg, n("attention_norm1", x), mask, cos, sin))
        return x + n("ffn_norm2", _ffn(sd, pre + ".feed_forward", n("ffn_norm1", x)))
    mod = _linear(sd, pre + ".adaLN_modulation.1", temb * torch.sigmoid(temb))
    scale_msa, gate_msa, scale_mlp, gate_mlp = (m[:, None, :] for m in mod.chunk(4, dim=-1))
    h = _attention(sd, pre + ".attention", cfg, n("attention_norm1", x) * (1 + scale_msa), mask, cos, sin)
    x = x + torch.tanh(gate_msa) * n("attention_norm2", h)
    h = _ffn(sd, pre + ".feed_forward", n("ffn_norm1", x) * (1 + scale_mlp))
    return x + torch.tanh(gate_mlp) * n("ffn_norm2", h)


def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)*(W/p), p*p*C]; token r*(W/p)+c, vector index (ph*p + pw)*C + ch."""
    B, C, H, W = x.shape
    out = x.new_empty(B, (H // p) * (W // p), p * p * C)
    for r in range(H // p):
        for c in range(W // p):
            tile = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p]  # [B, C, ph, pw]
            out[:, r * (W // p) + c] = tile.permute(0, 2, 3, 1).reshape(B, -1)
    return out


def unpatchify(tokens, C, H, W, p):
    B = tokens.shape[0]
    x = tokens.new_empty(B, C, H, W)
    for r in range(H // p):
        for c in range(W // p):
            x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p] = tokens[:, r * (W // p) + c].reshape(B, p, p, C).permute(
                0, 3, 1, 2)
    return x


# ----------------------------------------------------------------------------------------------- forward

def reference_forward(sd, cfg, x, t, cap_feats, cap_mask, dtype=torch.float32):
    """Velocity toward data, [B, C, H, W], computed in `dtype` (fp32 by default) and returned in it."""
    sd = {k: v.to(dtype) for k, v in sd.items()}
    x, cap_feats, cap_mask = x.to(dtype), cap_feats.to(dtype), cap_mask.bool()
    B, C, H, W = x.shape
    p, D = cfg["patch_size"], cfg["dim"]
    Ht, Wt = H // p, W // p
    n_img, L = Ht * Wt, cap_feats.shape[1]
    cap_lens = [int(n) for n in cap_mask.sum(dim=1)]

    temb = _linear(sd, "t_embedder.mlp.0", timestep_features(t, dtype))
    temb = _linear(sd, "t_embedder.mlp.2", temb * torch.sigmoid(temb))

    # caption: RMSNorm + Linear, then the context refiners on the caption alone; positions (j, 0, 0)
    cap = _linear(sd, "cap_embedder.1", _rms_norm(cap_feats, sd["cap_embedder.0.weight"], cfg["norm_eps"]))
    cap_pos = torch.zeros(B, L, 3, dtype=torch.long)
    cap_pos[:, :, 0] = torch.arange(L)
    cos, sin = rope_cos_sin(cap_pos, cfg, dtype)
    for i in range(cfg["n_refiner_layers"]):
        cap = _block(sd, f"context_refiner.{i}", cfg, cap, cap_mask, cos, sin)

    # image: patchify, x_embedder, the noise refiners on the image tokens alone; positions (cap_len, r, c)
    img_pos = torch.zeros(B, n_img, 3, dtype=torch.long)
    for b in range(B):
        img_pos[b, :, 0] = cap_lens[b]
    img_pos[:, :, 1] = torch.arange(Ht).repeat_interleave(Wt)
    img_pos[:, :, 2] = torch.arange(Wt).repeat(Ht)
    img = _linear(sd, "x_embedder", patchify(x, p))
    cos, sin = rope_cos_sin(img_pos, cfg, dtype)
    img_mask = torch.ones(B, n_img, dtype=torch.bool)
    for i in range(cfg["n_refiner_layers"]):
        img = _block(sd, f"noise_refiner.{i}", cfg, img, img_mask, cos, sin, temb)

    # joint: [valid caption] + [image], zero-padded at the end to the batch's longest
    N = max(cap_lens) + n_img
    seq = torch.zeros(B, N, D, dtype=dtype)
    pos = torch.zeros(B, N, 3, dtype=torch.long)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b, n in enumerate(cap_lens):
        seq[b, :n], seq[b, n:n + n_img] = cap[b, :n], img[b]
        pos[b, :n], pos[b, n:n + n_img] = cap_pos[b, :n], img_pos[b]
        mask[b, :n + n_img] = True
    cos, sin = rope_cos_sin(pos, cfg, dtype)
    for i in range(cfg["n_layers"]):
        seq = _block(sd, f"layers.{i}", cfg, seq, mask, cos, sin, temb)

    # final layer: LayerNorm (no affine, eps 1e-6) * (1 + scale(SiLU(temb))), Linear; then the image tokens back
    scale = _linear(sd, "final_layer.adaLN_modulation.1", temb * torch.sigmoid(temb))[:, None, :]
    out = _linear(sd, "final_layer.linear", _layer_norm(seq, 1e-6) * (1 + scale))
    img_out = torch.stack([out[b, n:n + n_img] for b, n in enumerate(cap_lens)])
    return unpatchify(img_out, C, H, W, p)


TINY = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, n_kv_heads=2, multiple_of=16, ffn_dim_multiplier=None,
            norm_eps=1e-5, cap_feat_dim=32, axes_dims=(4, 6, 6), axes_lens=(300, 512, 512), rope_theta=10000.0,
            patch_size=2, in_channels=16)

if __name__ == "__main__":
    torch.manual_seed(0)
    sd = random_state_dict(TINY, seed=0)
    x = torch.randn(2, 16, 6, 10)
    t = torch.tensor([0.3, 0.8])
    cap = torch.randn(2, 7, TINY["cap_feat_dim"])
    cap_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    out = reference_forward(sd, TINY, x, t, cap, cap_mask)
    out64 = reference_forward(sd, TINY, x, t, cap, cap_mask, dtype=torch.float64)
    print("tiny output", tuple(out.shape), "finite", bool(torch.isfinite(out).all()),
          f"fp32 vs fp64 max diff {(out.double() - out64).abs().max().item():.2e}")
    shapes = expected_shapes(LUMINA2_RELEASED)
    print("released keys", len(shapes), "params", f"{sum(math.prod(s) for s in shapes.values()):,}")
