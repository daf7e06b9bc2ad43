"""
ReMamba: selective compression and adaptation, two forward passes over the prompt.

    Yuan et al., "ReMamba: Equip Mamba with Effective Long-Sequence Modeling" (arXiv 2408.15496).

A Mamba reading a long prompt forgets its beginning: every token multiplies the state by exp(Δ_t A).
ReMamba reads the prompt twice. Stage 1, a plain forward, scores a region of the prompt against the last
prompt token and keeps its top-K final hidden states. Stage 2 re-reads a shorter prompt in which the region
is replaced by those K states, and lets each kept state write into the SSM state in proportion to its score.
Generation then continues from stage 2's state. The cost is one extra forward over the prompt.

Stage 1, selective compression, for a prompt of L tokens with final-norm hidden states H (B, L, d_model):

    region [s, e):  s = ⌊start_ratio·L⌋,  e = min(s + max(⌈compress_ratio·L⌉, 1), L − 1),  K = ⌈(e − s)·ratio⌉
    q   = Q_proj(H[L−1])                        the last prompt token asks the question
    k_i = K_proj(H[i]),  i in [s, e)
    score_i = cos(k_i, q)                       importance of position i
    kept = top-K positions by score, re-sorted by position;   w = ReLU(score_kept)      (B, K)

Stage 2, selective adaptation: the base model reads the embeddings

    [E[:s], V_proj(H[kept]), E[e:]]             (B, s + K + L − e, d_model)

and, in every layer, at the K compressed positions only, the time step becomes

    Δ_i = softplus(δ_i · w_i + r + dt_proj.bias),   δ = dt_proj.weight @ dt_low_rank

with r = ret_bias[layer] (d_inner,), a new trainable bias per layer. The score scales the state's own part δ of
its time step: w = 0 leaves only the biases, w = 1 and r = 0 give the base model's Δ. Δ sets both how much a
state writes into h (Δ B x) and how much h decays over it (exp(Δ A)). Other positions and decoding steps are
unchanged.
This goes through mamba.py's method hook (see its module docstring); the base model is not modified.

Q_proj, K_proj, V_proj (each Linear → SiLU → Linear, d_model → d_model) and ret_bias (n_layer, d_inner) are the
only new parameters; they are trained end to end with the language-model loss of the answer (training_loss):
gradients reach V_proj through the compressed states, and Q_proj, K_proj through w via Δ.

    base = mamba.Mamba.from_pretrained("checkpoints/passkey")
    rm = ReMamba.load(base, "checkpoints/passkey")          # reads checkpoints/passkey/remamba.pt
    new_ids = rm.generate(prompt_ids, max_new_tokens=8)

Reading order: region rules (inference, training) → ReMamba (select, stage 2, forward, generate, training loss)
→ save/load.
"""

import contextlib
import math
import numbers
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import mamba

REMAMBA_FILE = "remamba.pt"   # default file name of the ReMamba parameters inside a checkpoint directory
FINGERPRINT_KEYS = ("d_model", "n_layer", "d_inner", "d_state", "vocab_size")   # the base model a file fits


def _ceil(x):
    """⌈x⌉, forgiving binary round-off: 0.3 · 10 is 3.0000000000000004 in floating point and must give 3."""
    return math.ceil(x - 1e-9)


# ----------------------------------------------------------------------------------------------------------
# 1. Which part of the prompt is compressed


def compression_region(L, ratio, compress_ratio, start_ratio):
    """Inference rule: region [s, e) of a prompt of L tokens and the number K of states kept from it.

    e is clipped to L − 1 so the last prompt token is never compressed: its hidden state is the query, and its
    embedding must be the last thing stage 2 reads, since the next token is predicted from it. A prompt too
    short for that (L = 1, or s ≥ L − 1) gets an empty region and K = 0, i.e. no compression; so does ratio 0.
    """
    s = math.floor(start_ratio * L)
    e = min(s + max(_ceil(compress_ratio * L), 1), L - 1)
    if e <= s:
        return s, s, 0
    return s, e, _ceil((e - s) * ratio)


def training_region(L, train_length, rng):
    """Training rule: the official random schedule, with its token counts made fractions of the training length.

    Official (2k-token training prompts): a prompt longer than 1,600 tokens compresses its first
    min(⌈U(0.1, 0.3)·L⌉, L − 1,500) tokens, a shorter one its first max(⌈0.1·L⌉, 1) tokens; in both cases
    ratio ~ U(0.05, 0.2) (the authors' code draws it in both branches). Our prompts are a few hundred tokens,
    so 1,600 and 1,500 become 0.8 and 0.75 of `train_length` (1,600/2,000 and 1,500/2,000): a long prompt
    always keeps at least 3/4 of the training length uncompressed, as the official one does.
    rng: a random.Random or numpy.random.Generator (its uniform(low, high) draws).
    Returns (s, e, K) with s = 0, clipped like compression_region (e ≤ L − 1).
    """
    if not isinstance(train_length, numbers.Integral) or train_length < 1:
        raise ValueError(f"train_length must be the training sequence length in tokens (a positive int), "
                         f"got {train_length!r}")
    if L > 0.8 * train_length:
        length = min(_ceil(rng.uniform(0.1, 0.3) * L), L - _ceil(0.75 * train_length))
    else:
        length = _ceil(0.1 * L)
    length = min(max(length, 1), L - 1)
    ratio = rng.uniform(0.05, 0.2)
    return 0, length, _ceil(length * ratio)


def _mlp(d):
    return nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))


# ----------------------------------------------------------------------------------------------------------
# 2. The model


class ReMamba(nn.Module):
    """ReMamba around a base mamba.Mamba. The base model is held, not owned: it is not a submodule, so
    `state_dict()`, `parameters()` and `.to()` cover only the new parameters (move the base model yourself).
    Both stages run with the base model's hook replaced (stage 1 by none, stage 2 by ReMamba's); the hook that was
    set before is restored afterwards."""

    def __init__(self, base_model, ratio=0.1, compress_ratio=0.3, start_ratio=0.0):
        super().__init__()
        if not isinstance(base_model, mamba.Mamba):
            raise TypeError(f"ReMamba wraps a mamba.Mamba model, got {type(base_model).__name__}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio is the fraction of the region's states kept, in [0, 1]; got {ratio}")
        if not 0.0 < compress_ratio <= 1.0:
            raise ValueError(f"compress_ratio is the region's fraction of the prompt, in (0, 1]; got {compress_ratio}")
        if not 0.0 <= start_ratio < 1.0:
            raise ValueError(f"start_ratio is where the region starts, a fraction of the prompt in [0, 1); "
                             f"got {start_ratio}")
        self.__dict__["base"] = base_model   # a plain attribute: nn.Module would register it as a submodule
        self.ratio, self.compress_ratio, self.start_ratio = ratio, compress_ratio, start_ratio
        c = base_model.config
        self.Q_proj, self.K_proj, self.V_proj = _mlp(c.d_model), _mlp(c.d_model), _mlp(c.d_model)
        self.ret_bias = nn.Parameter(torch.zeros(c.n_layer, c.d_inner))   # r: one (d_inner,) per layer
        # Initialisation, chosen so that an untrained ReMamba reads the prompt like the base model minus the
        # region. The last Linear of V_proj starts at zero, so the compressed states are zero vectors; a zero
        # token stays exactly zero in the residual stream (RMSNorm(0) = 0, in_proj(0) = 0, gate SiLU(0) = 0): it
        # emits nothing, and touches the state only as K extra steps of decay (plus what the causal conv carries
        # over from its neighbours). ret_bias starts at zero, as in the authors' code. Q_proj and K_proj keep
        # PyTorch's default weights with zero biases (as the authors' post_init does): random projections roughly
        # preserve the cosine geometry of H, a sensible first ranking. V_proj's first Linear gets gradients once
        # its last one has moved off zero (as LoRA's A once B has).
        with torch.no_grad():
            for proj in (self.Q_proj, self.K_proj, self.V_proj):
                proj[0].bias.zero_()
                proj[2].bias.zero_()
            self.V_proj[2].weight.zero_()
        self.to(base_model.lm_head.weight.device)

    def region(self, L):
        """(s, e, K) for a prompt of L tokens with this model's ratios; see compression_region."""
        return compression_region(L, self.ratio, self.compress_ratio, self.start_ratio)

    def trainable_parameters(self, train_base=False):
        """The parameters to optimise: the new ones, plus the whole base model if train_base. Also sets
        requires_grad on the base model (frozen unless train_base), so that stage 1 runs without a graph."""
        self.base.requires_grad_(train_base)
        return list(self.parameters()) + (list(self.base.parameters()) if train_base else [])

    # ------------------------------------------------------------------------------------------------------
    # Stage 1: selective compression

    def select(self, hidden, region=None):
        """hidden (B, L, d_model): final-norm hidden states of the prompt. region: (s, e, K), by default
        self.region(L). Returns kept positions (B, K) in [s, e), sorted, and their weights w = ReLU(score) (B, K)."""
        batch, L, _ = hidden.shape
        s, e, K = region if region is not None else self.region(L)
        if not (0 <= s <= e <= L - 1 and 0 <= K <= e - s):
            raise ValueError(f"bad compression region (s={s}, e={e}, K={K}) for a prompt of {L} tokens: need "
                             f"0 ≤ s ≤ e ≤ L − 1 (the last token is never compressed) and 0 ≤ K ≤ e − s")
        if K == 0:
            return (torch.zeros(batch, 0, dtype=torch.long, device=hidden.device),
                    hidden.new_zeros(batch, 0, dtype=torch.float32))
        h = hidden.to(self.Q_proj[0].weight.dtype)
        q = self.Q_proj(h[:, L - 1])                                           # (B, d)
        k = self.K_proj(h[:, s:e])                                             # (B, e−s, d)
        scores = F.cosine_similarity(k, q[:, None], dim=-1)                    # (B, e−s): cos(k_i, q)
        top, index = scores.topk(K, dim=1)                                     # (B, K), by score
        index, order = index.sort(dim=1)                                       # by position
        weights = F.relu(top.gather(1, order)).float()                         # w = ReLU(score)
        return index + s, weights

    def _stage2_inputs(self, ids, L, region):
        """ids (B, L + n): the prompt and a continuation. Returns stage 2's embeddings (B, s + K + L − e + n, d)
        and the weights (B, K) of the compressed states at positions s .. s+K−1."""
        s, e, K = region
        base_trains = any(p.requires_grad for p in self.base.parameters())
        # stage 1 is a plain forward; causal, so the continuation does not change H[:, :L]. Its graph is needed
        # only to train the base model: Q/K/V_proj act on H after it.
        with self._hook_set(None), torch.set_grad_enabled(torch.is_grad_enabled() and base_trains):
            hidden = self.base.hidden_states(ids)[:, :L]                       # (B, L, d)
        kept, weights = self.select(hidden, region)                            # (B, K), (B, K)
        compressed = self.V_proj(hidden.gather(1, kept[..., None].expand(-1, -1, hidden.shape[-1]))
                                 .to(self.V_proj[0].weight.dtype))             # V_proj(H[kept])  (B, K, d)
        E = self.base.backbone.embedding(ids)                                  # (B, L + n, d)
        return torch.cat([E[:, :s], compressed.to(E.dtype), E[:, e:]], dim=1), weights

    # ------------------------------------------------------------------------------------------------------
    # Stage 2: selective adaptation, through the base model's hook

    def _adaptation_hook(self, start, weights):
        """The hook that rescales Δ at the compressed positions start .. start+K−1 of stage 2, in every layer."""
        K = weights.shape[1]
        w = weights[:, None, :]                                                # (B, 1, K)

        def hook(layer_idx, hidden_states, dt, delta, is_step):
            if is_step:  # decoding continues from the adapted state; new tokens keep their own Δ
                return delta
            dt_bias = self.base.backbone.layers[layer_idx].mixer.dt_proj.bias.float()
            r = self.ret_bias[layer_idx].float()
            dt_kept = dt[:, :, start:start + K].float()                        # δ (B, d_inner, K), before bias
            delta_kept = F.softplus(dt_kept * w + r[:, None] + dt_bias[:, None])   # softplus(δ·w + r + b)
            return torch.cat([delta[..., :start], delta_kept, delta[..., start + K:]], dim=-1)

        return hook

    @contextlib.contextmanager
    def _hook_set(self, hook):
        """Set the base model's hook for the duration; restore whatever was there before, even on error."""
        previous = self.base.hook
        self.base.set_hook(hook)
        try:
            yield
        finally:
            self.base.set_hook(previous)

    # ------------------------------------------------------------------------------------------------------
    # Using it

    def _as_batch(self, ids, what):
        ids = torch.as_tensor(ids, device=self.base.lm_head.weight.device)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise ValueError(f"{what} must be token ids of shape (length,) or (batch, length), "
                             f"got shape {tuple(ids.shape)}")
        return ids

    def _prompt(self, input_ids):
        prompt = self._as_batch(input_ids, "input_ids")
        if prompt.shape[1] == 0:
            raise ValueError("the prompt is empty; ReMamba needs at least one prompt token")
        return prompt

    def _logits(self, prompt_ids, continuation_ids=None, region=None):
        prompt = self._prompt(prompt_ids)
        L = prompt.shape[1]
        region = region if region is not None else self.region(L)
        ids = prompt
        if continuation_ids is not None:
            continuation = self._as_batch(continuation_ids, "continuation_ids")
            if continuation.shape[0] != prompt.shape[0]:
                raise ValueError(f"input_ids has batch {prompt.shape[0]} but continuation_ids has batch "
                                 f"{continuation.shape[0]}")
            ids = torch.cat([prompt, continuation], dim=1)
        if region[2] == 0:  # nothing to compress: stage 2 is the plain forward
            with self._hook_set(None):
                return self.base(ids)
        embeds, weights = self._stage2_inputs(ids, L, region)
        with self._hook_set(self._adaptation_hook(region[0], weights)):
            return self.base(inputs_embeds=embeds)

    def forward(self, input_ids, continuation_ids=None):
        """Stage-2 logits (B, s + K + L − e [+ n], padded_vocab) of the prompt input_ids (B, L), compressed,
        followed by continuation_ids (B, n) if given, which stage 2 reads uncompressed after the prompt (as
        generation does token by token, and as training scores the answer). The last prompt position predicts
        the first new token."""
        return self._logits(input_ids, continuation_ids)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=20, temperature=0.0, top_k=None, eos_token_id=None):
        """Stage 1, stage-2 prefill, then recurrent decoding from stage 2's state (mamba.Mamba.generate's
        arguments and output: new token ids (B, n ≤ max_new_tokens))."""
        prompt = self._prompt(input_ids)
        L = prompt.shape[1]
        region = self.region(L)
        decode = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, eos_token_id=eos_token_id)
        if region[2] == 0:
            with self._hook_set(None):
                return self.base.generate(prompt, **decode)
        embeds, weights = self._stage2_inputs(prompt, L, region)
        with self._hook_set(self._adaptation_hook(region[0], weights)):
            return self.base.generate(inputs_embeds=embeds, **decode)

    def training_loss(self, ids_list, answer_starts, rng, weights=None, *, train_length):
        """Supervised fine-tuning loss: cross-entropy of the answer after a randomly compressed prompt.

        ids_list:      samples, each a LongTensor (n,): the prompt ids[:a], then the answer ids[a:] (for passkey
                       samples, the key's digits and the closing ".").
        answer_starts: a for each sample (1 ≤ a < n).
        rng:           random.Random or numpy.random.Generator; draws each sample's region and ratio
                       (training_region).
        weights:       optional loss weights per sample, (n − 1,) in passkey.training_example's convention
                       (weights[i] weighs the prediction of ids[i + 1]); only the answer's part weights[a − 1:]
                       is used, since the prompt is not predicted in stage 2. Default: 1 on every answer token.
        train_length:  the training sequence length the schedule's thresholds are fractions of.
        Returns the mean over samples of each sample's weighted mean cross-entropy (a scalar with a graph).
        """
        if len(ids_list) == 0 or len(ids_list) != len(answer_starts):
            raise ValueError(f"need one answer start per sample and at least one sample; got {len(ids_list)} "
                             f"samples and {len(answer_starts)} answer starts")
        if weights is not None and len(weights) != len(ids_list):
            raise ValueError(f"weights must hold one array per sample: got {len(weights)} for {len(ids_list)} samples")
        losses = []
        for i, (ids, a) in enumerate(zip(ids_list, answer_starts)):
            ids = torch.as_tensor(ids, device=self.base.lm_head.weight.device)
            if ids.dim() != 1 or not 1 <= a < len(ids):
                raise ValueError(f"sample {i}: need token ids of shape (n,) and an answer start 1 ≤ a < n; got "
                                 f"shape {tuple(ids.shape)} and a = {a}")
            answer = ids[a:]                                                   # (m,) targets
            logits = self._logits(ids[:a], ids[a:-1], training_region(a, train_length, rng))
            predictions = logits[0, -len(answer):, :self.base.config.vocab_size].float()   # (m, V)
            ce = F.cross_entropy(predictions, answer, reduction="none")       # (m,)
            if weights is None:
                losses.append(ce.mean())
                continue
            w = torch.as_tensor(weights[i], dtype=torch.float32, device=ce.device)
            if w.shape != (len(ids) - 1,):
                raise ValueError(f"sample {i}: weights must have shape ({len(ids) - 1},) (one per target "
                                 f"ids[1:]), got {tuple(w.shape)}")
            w = w[a - 1:]
            if float(w.sum()) <= 0:
                raise ValueError(f"sample {i}: the answer's loss weights weights[{a - 1}:] sum to zero")
            losses.append((ce * w).sum() / w.sum())
        return torch.stack(losses).mean()

    # ------------------------------------------------------------------------------------------------------
    # 3. Save and load, beside the base checkpoint

    def save(self, path):
        """Write the new parameters, the ratios and the base model's fingerprint, atomically. path: a file, or a
        checkpoint directory (then the file is REMAMBA_FILE inside it)."""
        if os.path.isdir(path):
            path = os.path.join(path, REMAMBA_FILE)
        c = self.base.config
        payload = {"method": "remamba",
                   "ratio": self.ratio, "compress_ratio": self.compress_ratio, "start_ratio": self.start_ratio,
                   "base_fingerprint": {k: getattr(c, k) for k in FINGERPRINT_KEYS},
                   "state_dict": {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}}
        mamba.atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, base_model, path):
        """A ReMamba for base_model with the parameters and ratios saved at path (a file, or a checkpoint
        directory holding REMAMBA_FILE)."""
        if os.path.isdir(path):
            path = os.path.join(path, REMAMBA_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no ReMamba parameters at {path}; train them with "
                                    f"`python train.py --method remamba --init <checkpoint>`")
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path} is not a ReMamba parameter file ({type(e).__name__}: {e})") from None
        fields = {"method", "ratio", "compress_ratio", "start_ratio", "base_fingerprint", "state_dict"}
        if not isinstance(payload, dict) or payload.get("method") != "remamba" or not fields <= payload.keys():
            raise ValueError(f"{path} is not a ReMamba parameter file (written by ReMamba.save); is it a base "
                             f"model's weights?")
        c = base_model.config
        mismatched = {k: (v, getattr(c, k)) for k, v in payload["base_fingerprint"].items() if getattr(c, k) != v}
        if mismatched:
            details = ", ".join(f"{k} {saved} in the file but {now} in the model"
                                for k, (saved, now) in mismatched.items())
            raise ValueError(f"{path} was trained for a different base model ({details}); load the base "
                             f"checkpoint it was saved beside")
        model = cls(base_model, payload["ratio"], payload["compress_ratio"], payload["start_ratio"])
        model.load_state_dict(payload["state_dict"])
        return model
