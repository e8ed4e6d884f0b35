"""The reference backend of the generation loop: the model's own PyTorch modules.

Plain PyTorch, no compiled code: the transformer's blocks with SDPA over a
preallocated KV cache, the tokenizer's bicubic / phi / area glue, the reference
IDDPM sampler.  It is what the conformance tests hold to the official outputs,
and the ground truth the fast backend (hart_fast.engine) is compared with.
See hart_fast.generation for the interface.
"""

from __future__ import annotations

from hart_fast.generation import first_rows
from hart_fast.model.diffusion import sample_residual
from hart_fast.model.transformer import KVCache
from hart_fast.pruning import block_forward_recording, pruned_block_forward
from hart_fast.sampling import cfg_combine, filter_top_k_top_p_


class ReferenceBackend:
    def __init__(self, transformer, tokenizer):
        self.tr, self.tok = transformer, tokenizer

    def begin(self, mods, head_mod, pos2, prune=None):
        cfg = self.tr.cfg
        w = self.tr.word_embed.weight
        self.mods, self.head_mod, self.pos2 = mods, head_mod, pos2
        self.cache = KVCache(cfg.depth, pos2.shape[0], cfg.num_heads, cfg.total_tokens, cfg.head_dim, w.device, w.dtype)
        self.prune = prune          # a hart_fast.pruning.PrunePlan, or None
        self.offset = 0             # the cache's filled length: where the next stage writes
        self.ref_outputs = None     # per block, the reference stage's (attention, FFN) outputs
        self.stage_work = []        # (stage, rows, tokens per block) of every pass: what really ran

    def stage(self, si, x_2BlC):
        tr, p = self.tr, self.prune
        rope = tr.stage_rope(si, self.pos2)
        tokens = x_2BlC.shape[1]
        if p is not None and si in p.keep:
            tokens, h = p.keep[si], x_2BlC
            for i, blk in enumerate(tr.blocks):
                h = pruned_block_forward(blk, h, self.mods[i], rope, self.cache, i, self.offset, tokens,
                                         self.ref_outputs[i], p.patch_nums[si])
        elif p is not None and si == p.reference_stage:
            h, self.ref_outputs = x_2BlC, []
            for i, blk in enumerate(tr.blocks):
                h, outs = block_forward_recording(blk, h, self.mods[i], rope, self.cache, i, self.offset)
                self.ref_outputs.append(outs)
        else:
            h = tr.forward_stage(x_2BlC, si, self.mods, rope, self.cache, self.offset)
        self.offset += tokens
        self.stage_work.append((si, x_2BlC.shape[0], tokens))
        return h, tr.logits(h, self.head_mod)

    def drop_unconditional(self):
        B = self.pos2.shape[0] // 2
        self.mods, self.head_mod, self.pos2 = first_rows(self.mods, B), first_rows(self.head_mod, B), self.pos2[:B]
        self.ref_outputs = first_rows(self.ref_outputs, B)
        # Views of the conditional rows: what earlier stages cached stays readable.
        self.cache.k = [k[:B] for k in self.cache.k]
        self.cache.v = [v[:B] for v in self.cache.v]

    @staticmethod
    def guide(logits_2BlV, t, top_k, top_p):
        if t is None:  # conditional rows only: no CFG
            return filter_top_k_top_p_(logits_2BlV.clone(), top_k, top_p)
        return filter_top_k_top_p_(cfg_combine(logits_2BlV, t), top_k, top_p)

    def next_scale_input(self, si, f_hat, h_BChw):
        return self.tok.next_scale_input(si, self.tr.cfg.patch_nums, f_hat, h_BChw)

    @staticmethod
    def sample_residual(net, z, t, sched, *, temperature, x_init_NC, noise_fn):
        return sample_residual(net, z, t, sched, temperature=temperature, x_init_NC=x_init_NC, noise_fn=noise_fn)


__all__ = ["ReferenceBackend"]
