"""The reference backend of the generation loop: the model's own PyTorch modules.

Plain PyTorch, no compiled code: the transformer's blocks with SDPA over a
preallocated KV cache, the tokenizer's bicubic / phi / area glue, the reference
IDDPM sampler.  It is what the conformance tests hold to the official outputs,
and the ground truth the fast backend (hart_fast.engine) is compared with.
See hart_fast.generation for the interface.
"""

from __future__ import annotations

from hart_fast.model.diffusion import sample_residual
from hart_fast.model.transformer import KVCache
from hart_fast.sampling import cfg_combine, filter_top_k_top_p_


class ReferenceBackend:
    def __init__(self, transformer, tokenizer):
        self.tr, self.tok = transformer, tokenizer

    def begin(self, mods, head_mod, pos2):
        cfg = self.tr.cfg
        w = self.tr.word_embed.weight
        self.mods, self.head_mod, self.pos2 = mods, head_mod, pos2
        self.cache = KVCache(cfg.depth, pos2.shape[0], cfg.num_heads, cfg.total_tokens, cfg.head_dim, w.device, w.dtype)

    def stage(self, si, x_2BlC):
        start, _ = self.tr.stage_slices()[si]
        h = self.tr.forward_stage(x_2BlC, si, self.mods, self.tr.stage_rope(si, self.pos2), self.cache, start)
        return h, self.tr.logits(h, self.head_mod)

    @staticmethod
    def guide(logits_2BlV, t, top_k, top_p):
        return filter_top_k_top_p_(cfg_combine(logits_2BlV, t), top_k, top_p)

    def next_scale_input(self, si, f_hat, h_BChw):
        return self.tok.next_scale_input(si, self.tr.cfg.patch_nums, f_hat, h_BChw)

    @staticmethod
    def sample_residual(net, z, t, sched, *, temperature, x_init_NC, noise_fn):
        return sample_residual(net, z, t, sched, temperature=temperature, x_init_NC=x_init_NC, noise_fn=noise_fn)


__all__ = ["ReferenceBackend"]
