"""A deliberately simple, independent EMAG written from the method description (docs/method.md) for the tests.

Nothing here imports the emag package. It uses its own attention processors (explicit softmax maps),
runs a second FULL forward pass at every step exactly as the reference scripts do, keeps the spec's
update order (SD3: score before the update, EMA fed by the perturbed pass; DiT: EMA fed by the cond
then uncond normal passes, score after the update) and spells the combinations as the reference does.

``fused_when_idle=True`` makes an observing-but-not-replacing layer output the fused attention (as
the library does, so outputs can be compared tightly); ``False`` computes ``P V`` explicitly in every
pass at the candidate layers, as the reference code does.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F


def ref_k2idx(k: float, n: int) -> int:
    return max(0, min(n - 1, int(round(k * (n - 1) / 250.0))))


class _State:
    def __init__(self, beta, lam, dtype, score_after):
        self.beta, self.lam, self.dtype, self.score_after = beta, lam, dtype, score_after
        self.E = None
        self.D = None
        self.D_rows = None
        self.entropy = None
        self.do_ema = 0
        self.apply = False  # False, True or a row mask

    def update(self, live):
        x = live.detach().to(self.dtype)
        if self.E is None:
            self.E = x.clone()
            self.D = torch.tensor(0.0, dtype=self.dtype)
            self.D_rows = torch.zeros(x.shape[0], dtype=self.dtype)
        else:
            if not self.score_after:
                self.D = (self.E - x).abs().mean()
                self.D_rows = (self.E - x).abs().flatten(1).mean(1)
            self.E.mul_(self.beta)
            self.E.add_(x, alpha=1.0 - self.beta)
            if self.score_after:
                self.D = (self.E - x).abs().mean()
                self.D_rows = (self.E - x).abs().flatten(1).mean(1)
        ent = -(x * x.clamp_min(1e-12).log()).sum(-1)
        self.entropy = ent.mean(-2).mean(-1)

    def replaced(self, live):
        new = self.lam * self.E.to(live.dtype) + (1 - self.lam) * live
        if isinstance(self.apply, torch.Tensor):
            new = torch.where(self.apply.view(-1, *([1] * (live.dim() - 1))), new, live)
        return new


class RefJointProcessor:
    """SD3 joint attention ([image ; text]) with EMAG, written out in full."""

    def __init__(self, state: _State, variant: str, rows: str, fused_when_idle: bool):
        self.s, self.variant, self.rows, self.fused_when_idle = state, variant, rows, fused_when_idle

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        b, n_img = hidden_states.shape[:2]
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        tq = split(attn.add_q_proj(encoder_hidden_states))
        tk = split(attn.add_k_proj(encoder_hidden_states))
        tv = split(attn.add_v_proj(encoder_hidden_states))
        if attn.norm_added_q is not None:
            tq = attn.norm_added_q(tq)
        if attn.norm_added_k is not None:
            tk = attn.norm_added_k(tk)
        s = self.s
        if self.variant == "q":
            for _ in range(int(s.do_ema)):
                s.update(q)
            if s.apply is not False:
                q = s.replaced(q)
            qj, kj, vj = torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
            out = F.scaled_dot_product_attention(qj, kj, vj)
        else:
            qj, kj, vj = torch.cat([q, tq], 2), torch.cat([k, tk], 2), torch.cat([v, tv], 2)
            d = q.shape[-1]
            probs = (torch.matmul(qj, kj.transpose(-2, -1)) * d ** -0.5).softmax(dim=-1)
            cols = {"image_rows": slice(None), "img2img": slice(None, n_img), "img2txt": slice(n_img, None)}[self.rows]
            live = probs[:, :, :n_img, cols]
            for _ in range(int(s.do_ema)):
                s.update(live)
            if s.apply is not False:
                new_probs = probs.clone()
                new_probs[:, :, :n_img, cols] = s.lam * s.E.to(probs.dtype) + (1 - s.lam) * live
                if self.rows != "image_rows":
                    r = new_probs[:, :, :n_img, :]
                    new_probs[:, :, :n_img, :] = r / r.sum(-1, keepdim=True).clamp_min(1e-12)
                if isinstance(s.apply, torch.Tensor):
                    new_probs = torch.where(s.apply.view(-1, 1, 1, 1), new_probs, probs)
                out = torch.matmul(new_probs, vj).to(q.dtype)
            elif self.fused_when_idle:
                out = F.scaled_dot_product_attention(qj, kj, vj)
            else:
                out = torch.matmul(probs, vj).to(q.dtype)
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        img, txt = out[:, :n_img], out[:, n_img:]
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        img = attn.to_out[1](attn.to_out[0](img))
        return img, txt


def _choose(states: dict, layers: list[int], mode: int, per_sample: bool, batch: int, top_k: int = 5):
    """Reference selection: sort a block-ordered list with a stable sort; median over the batch."""
    if mode == 0:
        return {l: True for l in layers}
    if per_sample:
        masks = {l: torch.zeros(batch, dtype=torch.bool) for l in layers}
        for r in range(batch):
            scored = [(float(states[l].D_rows[r]), l) for l in layers if states[l].D_rows is not None]
            if not scored:
                for l in layers:
                    masks[l][r] = True
                continue
            scored.sort(key=lambda x: x[0], reverse=True)
            masks[scored[0][1]][r] = True
        return {l: m for l, m in masks.items() if m.any()}
    if mode == 2:
        scored = [(float(states[l].D.median()), l) for l in layers if states[l].D is not None]
        if not scored:
            return {l: True for l in layers}
        scored.sort(key=lambda x: x[0], reverse=True)
        return {scored[0][1]: True}
    ent = [(float(states[l].entropy.median()), l) for l in layers]
    ent.sort(key=lambda x: x[0])
    if mode == 1:
        return {ent[0][1]: True}
    pool = [x[1] for x in ent[:top_k]]
    scored = [(float(states[l].D.median()), l) for l in layers if l in pool]
    scored.sort(key=lambda x: x[0], reverse=True)
    return {scored[0][1]: True}


def ref_sd3_sample(pipe, embeds, latents, num_steps, cfg_scale, emag_scale, layers, *, beta=0.988, lam=1.0,
                   variant="full", rows="image_rows", mode=2, combo="No", ema_dtype=torch.float16,
                   per_sample=False, fused_when_idle=True):
    """Straightforward SD3 EMAG sampling (docs/method.md section 7.1): two full calls on the doubled batch per step.

    "Only_EMAG" keeps the doubled batch while the CFG flag is on (``cfg_scale > 1``): its unconditional
    rows feed the EMA and the batch-global score, their output is unused."""
    tr, sched = pipe.transformer, pipe.scheduler
    states = {l: _State(beta, lam, ema_dtype, score_after=False) for l in layers}
    originals = {l: tr.transformer_blocks[l].attn.processor for l in layers}
    for l in layers:
        tr.transformer_blocks[l].attn.set_processor(RefJointProcessor(states[l], variant, rows, fused_when_idle))
    try:
        sched.set_timesteps(num_steps)
        single = combo == "Only_EMAG" and cfg_scale <= 1
        if single:
            pe, ppe = embeds["prompt_embeds"], embeds["pooled_prompt_embeds"]
        else:
            pe = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
            ppe = torch.cat([embeds["negative_pooled_prompt_embeds"], embeds["pooled_prompt_embeds"]])
        start, delta, stop = ref_k2idx(250, num_steps), ref_k2idx(50, num_steps), ref_k2idx(50, num_steps)
        lat = latents.clone()
        for i, t in enumerate(sched.timesteps):
            s = num_steps - 1 - i
            x = lat if single else torch.cat([lat, lat])
            ts = t.expand(x.shape[0])
            normal = tr(hidden_states=x, timestep=ts, encoder_hidden_states=pe, pooled_projections=ppe,
                        return_dict=False)[0]
            do_ema = stop <= s <= start
            do_apply = stop <= s <= start - delta
            chosen = _choose(states, layers, mode, per_sample, x.shape[0]) if do_apply else {}
            for l in layers:
                states[l].do_ema = do_ema
                states[l].apply = chosen.get(l, False)
            pert = tr(hidden_states=x, timestep=ts, encoder_hidden_states=pe, pooled_projections=ppe,
                      return_dict=False)[0]
            for l in layers:
                states[l].do_ema, states[l].apply = False, False
            if combo == "Only_EMAG":
                c, c_e = (normal, pert) if single else (normal.chunk(2)[1], pert.chunk(2)[1])
                v = c_e + emag_scale * (c - c_e)
            else:
                u, c = normal.chunk(2)
                u_e, c_e = pert.chunk(2)
                if combo == "No":
                    c2 = c_e + emag_scale * (c - c_e)
                    v = u + cfg_scale * (c2 - u)
                elif combo == "CFG":
                    v = u + cfg_scale * (c - u) + emag_scale * (c - u_e)
                else:
                    raise ValueError(combo)
            lat = sched.step(v, t, lat, return_dict=False)[0]
        return lat, states
    finally:
        for l, p in originals.items():
            tr.transformer_blocks[l].attn.set_processor(p)


class RefSelfProcessor:
    """DiT self-attention with EMAG, as the reference's timm-style module: Q scaled before Q K^T."""

    def __init__(self, state: _State, fused_when_idle: bool, variant: str = "full"):
        self.s, self.fused_when_idle, self.variant = state, fused_when_idle, variant

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *a, **k):
        b, n, _ = hidden_states.shape
        heads = attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        q, kk, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        s = self.s
        if self.variant == "q":
            for _ in range(int(s.do_ema)):
                s.update(q)
            if s.apply is not False:
                q = s.replaced(q)
            out = F.scaled_dot_product_attention(q, kk, v)
        else:
            probs = ((q * q.shape[-1] ** -0.5) @ kk.transpose(-2, -1)).softmax(dim=-1)
            for _ in range(int(s.do_ema)):
                s.update(probs)
            if s.apply is not False:
                out = (s.replaced(probs) @ v).to(q.dtype)
            elif self.fused_when_idle:
                out = F.scaled_dot_product_attention(q, kk, v)
            else:
                out = probs @ v
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def ref_dit_sample(pipe, labels, latents, num_steps, cfg_scale, emag_scale, layers, generator, *, ema=(50, 150),
                   apply=(50, 100), mode=2, combo="cond", beta=0.988, variant="full", per_sample=False,
                   fused_when_idle=True, channels=3):
    """Straightforward DiT EMAG sampling (docs/method.md section 7.2): three unbatched passes per step, or the additive
    reference with a doubled batch. ``ema`` / ``apply`` are inclusive bounds on steps remaining."""
    tr, sched = pipe.transformer, pipe.scheduler
    states = {l: _State(beta, 1.0, torch.float32, score_after=True) for l in layers}
    originals = {l: tr.transformer_blocks[l].attn1.processor for l in layers}
    for l in layers:
        tr.transformer_blocks[l].attn1.set_processor(RefSelfProcessor(states[l], fused_when_idle, variant))
    b = latents.shape[0]
    y = torch.tensor(labels)
    null = torch.full_like(y, 1000)

    def f(x, t, yy):
        return tr(x, timestep=t.expand(x.shape[0]), class_labels=yy).sample

    try:
        sched.set_timesteps(num_steps)
        x = latents.clone()
        for i, t in enumerate(sched.timesteps):
            curr = num_steps - 1 - i
            do_ema = ema[0] <= curr <= ema[1]
            for l in layers:
                states[l].do_ema = do_ema
            if combo in ("cond", "uncond"):
                yy = y if combo == "cond" else null
                out = f(x, t, yy)
                out_u = f(x, t, null)
                for l in layers:
                    states[l].do_ema = False
                chosen = _choose(states, layers, mode, per_sample, b) if apply[0] <= curr <= apply[1] else {}
                for l in layers:
                    states[l].apply = chosen.get(l, False)
                out_e = f(x, t, yy)
                for l in layers:
                    states[l].apply = False
                eps, rest, eps_u, eps_e = out[:, :channels], out[:, channels:], out_u[:, :channels], out_e[:, :channels]
                if combo == "cond":
                    eps2 = eps_e + emag_scale * (eps - eps_e)
                    final = eps_u + cfg_scale * (eps2 - eps_u)
                else:
                    final = eps_e + emag_scale * (eps_u - eps_e)
                x = sched.step(torch.cat([final, rest], 1), t, x, generator=generator).prev_sample
            elif combo == "additive":
                x2, y2 = torch.cat([x, x]), torch.cat([y, null])
                out = f(x2, t, y2)
                for l in layers:
                    states[l].do_ema = False
                chosen = _choose(states, layers, mode, per_sample, 2 * b) if curr <= apply[1] else {}
                for l in layers:
                    states[l].apply = chosen.get(l, False)
                out_e = f(x2, t, y2)
                for l in layers:
                    states[l].apply = False
                cond, uncond = out[:, :channels].chunk(2)
                _, uncond_e = out_e[:, :channels].chunk(2)
                final = cfg_scale * cond + (1 - cfg_scale) * uncond + emag_scale * (cond - uncond_e)
                model_out = torch.cat([torch.cat([final, final]), out[:, channels:]], 1)
                x = sched.step(model_out, t, x2, generator=generator).prev_sample[:b]
            else:
                raise ValueError(combo)
        return x, states
    finally:
        for l, p in originals.items():
            tr.transformer_blocks[l].attn1.set_processor(p)


def ref_respaced_ddpm(num_train: int = 1000, steps: int = 250):
    """Original-DiT respacing computed independently (float64): used timesteps and log-variance bounds.

    Returns (timesteps descending, betas of the respaced chain, posterior variance) in the original
    respace.py sense: steps taken at round(i * (T - 1) / (steps - 1)).
    """
    betas = torch.linspace(1e-4, 0.02, num_train, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    stride = (num_train - 1) / (steps - 1)
    use = sorted({int(round(i * stride)) for i in range(steps)})
    new_betas, last = [], 1.0
    for t in use:
        new_betas.append(1 - abar[t].item() / last)
        last = abar[t].item()
    nb = torch.tensor(new_betas, dtype=torch.float64)
    nabar = torch.cumprod(1 - nb, 0)
    nabar_prev = torch.cat([torch.ones(1, dtype=torch.float64), nabar[:-1]])
    post_var = nb * (1 - nabar_prev) / (1 - nabar)
    return torch.tensor(use[::-1]), nb.flip(0), post_var.flip(0)


