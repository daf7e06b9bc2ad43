"""
ReMamba: selective compression and adaptation, two forward passes over the prompt.

    Yuan et al., "ReMamba: Equip Mamba with Effective Long-Sequence Modeling" (arXiv 2408.15496).

A Mamba reading a long prompt forgets its beginning: every token multiplies the state by exp(Δ_t A).
ReMamba reads the prompt twice. Stage 1, a plain forward, scores a region of the prompt against the last
prompt token and keeps its top-K final hidden states. Stage 2 re-reads a shorter prompt in which the region
is replaced by those K states, and lets each kept state write into the SSM state in proportion to its score.
Generation then continues from stage 2's state. The cost is one extra forward over the prompt.

Stage 1, selective compression, for a prompt of L tokens with final-norm hidden states H (b, L, d_model):

    region [s, e):  s = ⌊start_ratio·L⌋,  e = min(s + max(⌈compress_ratio·L⌉, 1), L − 1),  K = ⌈(e − s)·ratio⌉
    q   = Q_proj(H[L−1])                        the last prompt token asks the question
    k_i = K_proj(H[i]),  i in [s, e)
    score_i = cos(k_i, q)                       importance of position i
    kept = top-K positions by score, re-sorted by position;   w = ReLU(score_kept)      (b, K)

Stage 2, selective adaptation: the base model reads the embeddings

    [E[:s], V_proj(H[kept]), E[e:]]             (b, s + K + L − e, d_model)

and, in every layer, at the K compressed positions only, the time step becomes

    Δ_i = softplus(δ_i · w_i + r + dt_proj.bias),   δ = dt_proj.weight @ dt_low_rank

with r = ret_bias[layer] (d_inner,), a new trainable bias per layer: the score scales the state's own part δ of
its time step, so a more important state writes more into h (Δ B x). This is mamba.py's method hook; other
positions and decoding steps are unchanged.

New parameters: Q_proj, K_proj, V_proj (each Linear → SiLU → Linear, d_model → d_model) and ret_bias
(n_layer, d_inner). They are trained end to end with the loss of the answer (`training_loss`): gradients reach
V_proj through the compressed states and Q_proj, K_proj through w via Δ. The authors' initialisation (init
"official") copies layer 0's weights: K_proj's two Linears from the x rows of in_proj, Q_proj's from its gate
rows, V_proj's from out_proj's two column halves, so the compressed states start as meaningful vectors.
init "zero_v" (an ablation) keeps PyTorch's init and a zero last Linear in V_proj: compressed states start as
zero vectors and the untrained model reads the prompt like the base model with the region cut out.

    rm = ReMamba.load(mamba.Mamba.from_pretrained(ckpt), os.path.join(ckpt, REMAMBA_FILE))
    new_ids = rm.generate(prompt_ids, max_new_tokens=8)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import mamba

REMAMBA_FILE = "remamba.pt"   # ReMamba's parameters inside a checkpoint directory
INITS = ("official", "zero_v")


def _ceil(x):
    """⌈x⌉, forgiving binary round-off: 0.3 · 10 is 3.0000000000000004 in floating point and must give 3."""
    return math.ceil(x - 1e-9)


def compression_region(L, ratio=0.1, compress_ratio=0.3, start_ratio=0.0):
    """Inference rule: region [s, e) of a prompt of L tokens and the number K of states kept from it. e stops
    before the last prompt token, the query; a region left empty (or ratio 0) means no compression, K = 0."""
    s = math.floor(start_ratio * L)
    e = min(s + max(_ceil(compress_ratio * L), 1), L - 1)
    return (s, e, _ceil((e - s) * ratio)) if e > s else (s, s, 0)


def training_region(L, L_train, rng):
    """Training rule, the authors' random schedule with its token counts made fractions of the training length.

    Official (2,000-token training length): a prompt longer than 1,600 tokens compresses its first
    min(⌈U(0.1, 0.3)·L⌉, L − 1,500) tokens, a shorter one its first ⌈0.1·L⌉; ratio ~ U(0.05, 0.2) in both.
    Here 1,600 and 1,500 become 0.8 and 0.75 of L_train. rng: numpy Generator. Returns (0, e, K)."""
    if L > 0.8 * L_train:
        length = min(_ceil(rng.uniform(0.1, 0.3) * L), L - _ceil(0.75 * L_train))
    else:
        length = _ceil(0.1 * L)
    length = min(max(length, 1), L - 1)
    return 0, length, _ceil(length * rng.uniform(0.05, 0.2))


def _mlp(d):
    return nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))


class ReMamba(nn.Module):
    """ReMamba around a base mamba.Mamba (a submodule: `save` writes only the new parameters)."""

    def __init__(self, base, ratio=0.1, compress_ratio=0.3, start_ratio=0.0, init="official"):
        super().__init__()
        assert init in INITS, init
        self.base = base
        self.kept = None   # after a prefill: the positions (b, K) whose states stage 2 read
        self.ratio, self.compress_ratio, self.start_ratio = ratio, compress_ratio, start_ratio
        c = base.config
        self.Q_proj, self.K_proj, self.V_proj = _mlp(c.d_model), _mlp(c.d_model), _mlp(c.d_model)
        self.ret_bias = nn.Parameter(torch.zeros(c.n_layer, c.d_inner))   # r: one (d_inner,) per layer
        with torch.no_grad():
            for proj in (self.Q_proj, self.K_proj, self.V_proj):
                proj[0].bias.zero_()
                proj[2].bias.zero_()
            if init == "official":   # layer 0's weights; d_inner = 2·d_model, so each block splits into two d × d
                mixer, d = base.backbone.layers[0].mixer, c.d_model
                x1, x2, g1, g2 = mixer.in_proj.weight.split(d)     # in_proj (2·d_inner, d): the x rows, the gate rows
                o1, o2 = mixer.out_proj.weight.split(d, dim=1)     # out_proj (d, d_inner)
                for proj, first, second in ((self.K_proj, x1, x2), (self.Q_proj, g1, g2), (self.V_proj, o1, o2)):
                    proj[0].weight.copy_(first)
                    proj[2].weight.copy_(second)
            else:
                self.V_proj[2].weight.zero_()
        self.to(base.lm_head.weight.device)

    def new_parameters(self):
        """ReMamba's own parameters (not the base model's)."""
        return [p for name, p in self.named_parameters() if not name.startswith("base.")]

    # ------------------------------------------------------------------------------------------------------
    # Stage 1: selective compression

    def select(self, hidden, region, query_at):
        """hidden (b, L, d_model) final-norm hidden states, region (s, e, K), query_at (b,) the query's position.
        Returns kept positions (b, K) in [s, e), sorted, and their weights w = ReLU(score) (b, K) float32."""
        s, e, K = region
        h = hidden.to(self.Q_proj[0].weight.dtype)
        q = self.Q_proj(h[torch.arange(h.shape[0], device=h.device), query_at])   # (b, d)
        k = self.K_proj(h[:, s:e])                                             # (b, e−s, d)
        scores = F.cosine_similarity(k, q[:, None], dim=-1)                    # (b, e−s): cos(k_i, q)
        top, index = scores.topk(K, dim=1)                                     # (b, K), by score
        index, order = index.sort(dim=1)                                       # by position
        return index + s, F.relu(top.gather(1, order)).float()                 # w = ReLU(score)

    def _stage2(self, ids, region, query_at):
        """ids (b, T): the prompt, possibly followed by a continuation. Returns stage 2's input embeddings
        (b, T − (e − s) + K, d), the hook that adapts Δ at the compressed positions, and the kept positions."""
        s, e, K = region
        # stage 1 is the plain model (causal: a continuation after the prompt changes nothing), without a graph
        # when the base is frozen (Q_proj, K_proj and V_proj train on its output alone)
        base_trains = any(p.requires_grad for p in self.base.parameters())
        with self.base.hooked(None), torch.set_grad_enabled(torch.is_grad_enabled() and base_trains):
            hidden = self.base.hidden_states(ids)                              # H (b, T, d)
        kept, w = self.select(hidden, region, query_at)
        compressed = self.V_proj(hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
                                 .to(self.V_proj[0].weight.dtype))             # V_proj(H[kept])  (b, K, d)
        E = self.base.backbone.embedding(ids)
        embeds = torch.cat([E[:, :s], compressed.to(E.dtype), E[:, e:]], dim=1)

        def adapt(layer_idx, dt, dt_bias):            # stage 2's hook; the scan adds dt_bias and takes softplus
            r = self.ret_bias[layer_idx].float()
            dt_kept = dt[:, :, s:s + K].float() * w[:, None] + r[:, None]      # δ·w + r  (b, d_inner, K)
            return torch.cat([dt[..., :s].float(), dt_kept, dt[..., s + K:].float()], dim=-1)

        return embeds, adapt, kept

    # ------------------------------------------------------------------------------------------------------
    # Using it

    def prefill(self, input_ids):
        """Stage 1 and stage 2 over a prompt (b, L): the last position's logits and the caches (Mamba.prefill).
        The positions stage 1 kept go to self.kept (b, K); with nothing to compress, this is the base model."""
        b, L = input_ids.shape
        region = compression_region(L, self.ratio, self.compress_ratio, self.start_ratio)
        if region[2] == 0:
            self.kept = input_ids.new_zeros(b, 0)
            with self.base.hooked(None):
                return self.base.prefill(input_ids)
        embeds, adapt, self.kept = self._stage2(input_ids, region, torch.full((b,), L - 1, device=input_ids.device))
        with self.base.hooked(adapt):
            return self.base.prefill(inputs_embeds=embeds)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=20, eos_token_id=None, min_new_tokens=0):
        """Greedy decoding from stage 2's state (decoding steps are never hooked): the new token ids
        (b, ≤ max_new_tokens), as Mamba.generate."""
        logits, caches = self.prefill(input_ids)
        return self.base.decode(logits, caches, max_new_tokens, eos_token_id=eos_token_id,
                                min_new_tokens=min_new_tokens)

    def training_loss(self, ids, weights, prompt_lengths, region):
        """The weighted next-token loss of a batch read through ReMamba.

        ids (b, T + 1): prompts followed by answers; weights (b, T) weigh the targets ids[:, 1:], non-zero only
        after the compressed region (the answer); prompt_lengths (b,): where each answer starts, so sample i's
        query is position prompt_lengths[i] − 1. region (0, e, K), shared by the batch (training_region)."""
        s, e, K = region
        inputs, targets = ids[:, :-1], ids[:, 1:]
        embeds, adapt, _ = self._stage2(inputs, region, prompt_lengths - 1)
        with self.base.hooked(adapt):
            logits = self.base(inputs_embeds=embeds)[:, s + K:]               # the positions e .. T − 1
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets[:, e:].flatten(), reduction="none")
        w = weights[:, e:]
        return ((ce.view_as(w) * w).sum(1) / w.sum(1)).mean()

    # ------------------------------------------------------------------------------------------------------
    # Save and load, beside the base checkpoint

    def save(self, path):
        """Write the new parameters and the ratios to `path` (a file)."""
        payload = {"settings": {k: getattr(self, k) for k in ("ratio", "compress_ratio", "start_ratio")},
                   "state_dict": {k: v.cpu() for k, v in self.state_dict().items()
                                  if not k.startswith("base.")}}
        mamba.atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, base, path):
        """A ReMamba for `base` with the parameters and ratios saved at `path`. A file that is not one raises
        ValueError naming it."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            model = cls(base, **payload["settings"], init="zero_v")
            loaded = model.load_state_dict(payload["state_dict"], strict=False)
            missing = [k for k in loaded.missing_keys if not k.startswith("base.")]   # the base's are not in the file
            if missing:
                raise KeyError(f"missing {missing}")
        except Exception as e:
            raise ValueError(f"{path}: not ReMamba parameters for this model ({type(e).__name__}: {e}); train them "
                             f"with `python train.py --method remamba --init <checkpoint> --out <new directory>`") \
                from None
        return model
